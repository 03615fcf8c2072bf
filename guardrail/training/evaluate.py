"""Fitting heads on features, and measuring them honestly: per source, on data training never saw.

Leave-one-source-out (LOSO) is the metric that counts: for each source, a head
is trained without any of its rows (nor its variants) and scored on them
against the other label's rows of the test split (which training never reads).
A random split of the same sources would measure memorised style.
The text-only baseline (hashed character n-grams + logistic regression, trained
on the same rows) is always reported beside the head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from guardrail._json import json_safe
from guardrail.head import LEXICAL, FeatureBlock, Head, ModelFingerprint
from guardrail.head.lexical import HashedNgrams
from guardrail.head.model import LinearModel, MLPModel, Standardizer, sigmoid
from guardrail.runtime.encodings import encoded_risk

from .extraction import Features, PlainFeatures
from .metrics import auroc, by_group, summarize, threshold_at_fpr
from .trainer import balanced_weights, fit_temperature, train_logreg, train_mlp


@dataclass(frozen=True)
class HeadRecipe:
    """What a head reads and how it is fitted."""

    blocks: tuple[str, ...]           # hidden-state blocks, e.g. ("l_out-20/probe",)
    lexical: bool = True
    kind: str = "logreg"              # logreg | mlp
    l2: float = 1e-2
    hidden: int = 64
    seeds: int = 1                    # an MLP fitted from this many seeds, logits averaged (MLPModel.averaged)
    target_fpr: float = 0.03
    lexical_buckets: int = 2 ** 15

    def __post_init__(self) -> None:
        if self.seeds < 1 or (self.seeds > 1 and self.kind != "mlp"):
            raise ValueError(f"seeds={self.seeds}: an average over seeds is for an MLP (a logistic fit is convex)")

    def describe(self) -> str:
        parts = list(self.blocks) + ([LEXICAL] if self.lexical else [])
        kind = self.kind if self.seeds == 1 else f"{self.kind}x{self.seeds}"
        return f"{kind}[{' + '.join(parts)}]"


@dataclass
class Labelled:
    """Features with what each row is: label, source, split."""

    features: Features
    labels: np.ndarray
    sources: np.ndarray
    splits: np.ndarray
    plain: PlainFeatures | None = None  # encoded or split requests' plain readings, which the query check reads too


def fit_head(data: Labelled, train: np.ndarray, val: np.ndarray, recipe: HeadRecipe,
             fingerprint: ModelFingerprint, *, probe_text: str = "", layers: Sequence[int] = (),
             seed: int = 0) -> Head:
    """A calibrated head from rows ``train`` (fit) and ``val`` (early stopping, temperature, threshold)."""
    f = data.features
    blocks, scalers, parts_train, parts_val = [], [], [], []
    for name in recipe.blocks:
        x_train, x_val = f.blocks[name][train], f.blocks[name][val]
        scaler = Standardizer.fit(x_train)
        blocks.append(FeatureBlock(name, x_train.shape[1]))
        scalers.append(scaler)
        parts_train.append(scaler.transform(x_train))
        parts_val.append(scaler.transform(x_val))
    lexical = None
    if recipe.lexical:
        lexical = HashedNgrams(n_buckets=recipe.lexical_buckets).fit([f.texts[i] for i in train])
        blocks.append(FeatureBlock(LEXICAL, recipe.lexical_buckets))
        scalers.append(Standardizer.identity(recipe.lexical_buckets))
        parts_train.append(lexical.transform([f.texts[i] for i in train]))
        parts_val.append(lexical.transform([f.texts[i] for i in val]))
    X, X_val = np.concatenate(parts_train, axis=1), np.concatenate(parts_val, axis=1)
    y, y_val = data.labels[train], data.labels[val]
    w = balanced_weights(y, data.sources[train])
    w_val = balanced_weights(y_val, data.sources[val])
    model: LinearModel | MLPModel
    if recipe.kind == "mlp":
        model = MLPModel.averaged([train_mlp(X, y, sample_weight=w, l2=recipe.l2, X_val=X_val, y_val=y_val,
                                             w_val=w_val, seed=seed + k, hidden=recipe.hidden)
                                   for k in range(recipe.seeds)])
    else:
        model = train_logreg(X, y, sample_weight=w, l2=recipe.l2, X_val=X_val, y_val=y_val, w_val=w_val, seed=seed)
    logits_val = model.logits(X_val)
    temperature = fit_temperature(logits_val, y_val, sample_weight=w_val)
    p_val = sigmoid(logits_val / temperature)
    threshold = float(threshold_at_fpr(p_val[y_val == 0], recipe.target_fpr))
    return Head(fingerprint=fingerprint, blocks=tuple(blocks), scalers=tuple(scalers), model=model,
                temperature=float(temperature), threshold=threshold, target_fpr=recipe.target_fpr,
                layers=tuple(layers), pooling=tuple(sorted({b.split("/")[1] for b in recipe.blocks if "/" in b})),
                probe_text=probe_text, lexical=lexical)


def score_rows(head: Head, data: Labelled, rows: np.ndarray) -> np.ndarray:
    """The head's probabilities for ``rows``; where a row's request reads as encoded or split and ``data`` holds
    its plain readings, weighed as the loop's query check weighs them (``encodings.encoded_risk``)."""
    def scored(features: Features, index: np.ndarray) -> np.ndarray:
        feats = {b.name: features.blocks[b.name][index] for b in head.blocks if b.name != LEXICAL}
        return head.score(feats, [features.texts[i] for i in index])

    p = scored(data.features, rows)
    if data.plain is None:
        return p
    at = data.plain.of[rows]
    read = np.flatnonzero(at >= 0)
    if read.size:
        p = p.copy()
        p[read] = encoded_risk(p[read], *(scored(f, at[read]) for f in (data.plain.alone, data.plain.in_place,
                                                                        data.plain.around)))
    return p


def loso(data: Labelled, recipe: HeadRecipe, fingerprint: ModelFingerprint, *,
         sources: Sequence[str] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Per held-out source: AUROC against the other label's test rows, and the share flagged
    at the threshold the head chose on its own validation rows."""
    out: dict[str, dict] = {}
    names = list(sources) if sources is not None else sorted(set(data.sources.tolist()))
    test_pool = data.splits == "test"
    for name in names:
        own = data.sources == name
        train = np.flatnonzero(~own & (data.splits == "train"))
        val = np.flatnonzero(~own & (data.splits == "val"))
        head = fit_head(data, train, val, recipe, fingerprint)
        own_labels = set(data.labels[own].tolist())
        other = np.zeros_like(own)
        if own_labels == {1}:
            other = test_pool & ~own & (data.labels == 0)
        elif own_labels == {0}:
            other = test_pool & ~own & (data.labels == 1)
        rows = np.flatnonzero(own | other)
        p = score_rows(head, data, rows)
        y = data.labels[rows]
        mine = own[rows]
        out[name] = json_safe({
            "n": int(own.sum()), "label": sorted(own_labels),
            "auroc": auroc(y, p),
            "flagged": float(np.mean(p[mine] >= head.threshold)),
        })
        if progress:
            progress(name)
    values = [v["auroc"] for v in out.values() if v["auroc"] is not None]
    return {"recipe": recipe.describe(), "sources": out,
            "mean_auroc": float(np.mean(values)) if values else None,
            "min_auroc": float(np.min(values)) if values else None}


def evaluate_head(head: Head, data: Labelled, rows: np.ndarray, forms: Sequence[str] | None = None) -> dict:
    """AUROC, TPR at 1%/5% FPR and the share flagged at the head's threshold, overall and per source;
    with ``forms`` (one per row), per form of request too (:func:`~.metrics.by_group`)."""
    p = score_rows(head, data, rows)
    report = summarize(data.labels[rows], p, head.threshold, data.sources[rows].tolist())
    if forms is not None:
        report["forms"] = by_group(data.labels[rows], p, head.threshold, forms)
    return report


def baseline_head(data: Labelled, train: np.ndarray, val: np.ndarray, fingerprint: ModelFingerprint) -> Head:
    """The text-only rival every head must beat: n-grams + logistic regression on the same rows."""
    return fit_head(data, train, val, HeadRecipe(blocks=(), lexical=True), fingerprint)


def quantization_report(head_float: Head, head_quant: Head, features: Mapping[str, np.ndarray],
                        texts: Sequence[str] | None, labels: Sequence[int] | np.ndarray) -> dict[str, float]:
    """How far int8 storage moved the probabilities, and whether ranking quality changed."""
    p_float = head_float.score(features, texts).astype(np.float64)
    p_quant = head_quant.score(features, texts).astype(np.float64)
    return json_safe({"max_abs_diff": float(np.max(np.abs(p_float - p_quant))) if p_float.size else 0.0,
                      "auroc_float": auroc(labels, p_float), "auroc_quant": auroc(labels, p_quant)})
