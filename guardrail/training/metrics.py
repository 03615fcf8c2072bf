"""Detection metrics for a head's scores: AUROC, TPR at a fixed FPR, per-source summaries.

Conventions used everywhere in guardrail: label 1 is harmful, 0 benign; a row
is flagged when its score is ``>= threshold``. Results are JSON-safe (NaN,
for a metric that is undefined on the rows given, becomes ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from guardrail._json import json_safe

FPR_POINTS = (0.01, 0.05)


def _rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks with tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    ends = np.concatenate((starts[1:], [values.size]))
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(y: Sequence[int] | np.ndarray, s: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN with one class."""
    labels = np.asarray(y).astype(bool)
    scores = np.asarray(s, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _rank_average(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_at_fpr(scores_benign: Sequence[float] | np.ndarray, fpr: float) -> float:
    """Smallest threshold at which at most ``fpr`` of the benign scores are ``>=`` it.

    It sits one float32 step above the highest benign score that must not be
    flagged, so it survives storage as float32 and works with ``>`` as well.
    """
    benign = np.sort(np.asarray(scores_benign, dtype=np.float64))[::-1]
    if benign.size == 0:
        raise ValueError("threshold_at_fpr needs at least one benign score")
    allowed = int(math.floor(fpr * benign.size + 1e-9))
    if allowed >= benign.size:
        return float(np.nextafter(np.float32(benign[-1]), np.float32(-np.inf)))
    return float(np.nextafter(np.float32(benign[allowed]), np.float32(np.inf)))


def _mean_or_nan(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else math.nan


def tpr_at_fpr(y: Sequence[int] | np.ndarray, s: Sequence[float] | np.ndarray, fpr: float) -> float:
    """Share of harmful rows flagged at the threshold set on this set's own benign rows."""
    labels = np.asarray(y).astype(bool)
    scores = np.asarray(s, dtype=np.float64)
    if labels.all() or not labels.any():
        return math.nan
    return _mean_or_nan(scores[labels] >= threshold_at_fpr(scores[~labels], fpr))


def rates_at_threshold(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
                       thr: float) -> dict[str, float]:
    """TPR, FPR and share of all rows flagged at ``thr`` (NaN where a class is absent)."""
    labels = np.asarray(y).astype(bool)
    flagged = np.asarray(p, dtype=np.float64) >= thr
    return {"tpr": _mean_or_nan(flagged[labels]), "fpr": _mean_or_nan(flagged[~labels]),
            "flagged": _mean_or_nan(flagged)}


def loso_pairs(sources: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Per source, row indices for scoring it against the pool of the other sources.

    A harmful-only source is paired with every other source's benign rows, a
    benign-only one with every other source's harmful rows, so a single-label
    source still gets an AUROC; a mixed source is scored on its own rows.
    """
    src = np.asarray(sources, dtype=object)
    lab = np.asarray(labels).astype(bool)
    pairs: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(src.tolist()):
        own = src == name
        need_benign = not (~lab[own]).any()
        need_harmful = not lab[own].any()
        extra = ~own & ((need_benign & ~lab) | (need_harmful & lab))
        pairs[name] = np.flatnonzero(own | extra)
    return pairs


def _block(y: np.ndarray, p: np.ndarray, thr: float, fpr_thresholds: dict[float, float | None]) -> dict[str, Any]:
    """Metrics of one group of rows; TPRs use thresholds set on all benign rows."""
    harmful = y.astype(bool)
    stats: dict[str, Any] = {"n": int(y.size), "n_harmful": int(harmful.sum()),
                             "n_benign": int((~harmful).sum()), "auroc": auroc(y, p)}
    for fpr, cut in fpr_thresholds.items():
        stats[f"tpr@{round(fpr * 100)}%fpr"] = math.nan if cut is None else _mean_or_nan(p[harmful] >= cut)
    stats.update(rates_at_threshold(y, p, thr))
    return stats


def by_group(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, thr: float,
             groups: Sequence[str]) -> dict[str, Any]:
    """Per group (a form of request): rows of each label, AUROC within the group (None when one label
    is absent) and each label's share flagged at ``thr``, JSON-safe.

    A group's own AUROC says whether the head reads the group at all: where it is near 0.5 the
    head's output is a prior for the form, and which side of the threshold it falls is the fit's."""
    labels = np.asarray(y).astype(np.int64)
    probs = np.asarray(p, dtype=np.float64)
    names = np.asarray(groups, dtype=object)
    if not labels.size == probs.size == names.size:
        raise ValueError("by_group: y, p and groups must have the same length")
    out: dict[str, Any] = {}
    for name in sorted(set(names.tolist())):
        own = names == name
        y_own, p_own = labels[own], probs[own]
        out[name] = {"n_benign": int((y_own == 0).sum()), "n_harmful": int((y_own == 1).sum()),
                     "auroc": auroc(y_own, p_own),
                     "benign_flagged": _mean_or_nan(p_own[y_own == 0] >= thr),
                     "harmful_flagged": _mean_or_nan(p_own[y_own == 1] >= thr)}
    return json_safe(out)


def summarize(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, thr: float,
              sources: Sequence[str]) -> dict[str, Any]:
    """Overall and per-source metrics, JSON-safe.

    Per source: n, n_harmful, n_benign, auroc (None when single-class),
    auroc_vs_pool (the source against the other label's rows of the other
    sources, see ``loso_pairs``), tpr@1%fpr and tpr@5%fpr at thresholds set
    on *all* benign rows (so sources are comparable), and tpr/fpr/flagged at ``thr``.
    """
    labels = np.asarray(y).astype(np.int64)
    probs = np.asarray(p, dtype=np.float64)
    src = np.asarray(sources, dtype=object)
    if not labels.size == probs.size == src.size:
        raise ValueError("summarize: y, p and sources must have the same length")
    benign = probs[labels == 0]
    cuts = {f: threshold_at_fpr(benign, f) if benign.size else None for f in FPR_POINTS}
    per_source: dict[str, Any] = {}
    for name, idx in loso_pairs(src, labels).items():
        own = src == name
        stats = _block(labels[own], probs[own], thr, cuts)
        stats["auroc_vs_pool"] = auroc(labels[idx], probs[idx])
        per_source[name] = stats
    return json_safe({"overall": _block(labels, probs, thr, cuts), "sources": per_source})
