"""De-duplication across sources and a deterministic, leak-free split.

A request that appears in two sources would let a held-out source leak into
training, so roots are de-duplicated on their normalised request text before
anything is derived from them. A request found with both labels is ambiguous
and dropped everywhere. The split is a hash of the normalised text of each
example's ORIGIN, so every variant of one request lands in the same split.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from guardrail.errors import DataError

from .format import Example

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.1, 0.2)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}“”‘’«»…—–]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed: the identity of a request."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def request_key(example: Example) -> str:
    return normalise(example.request_text())


@dataclass
class DedupReport:
    """What de-duplication removed, for the manifest."""

    duplicates: int = 0                        # same request, same label: later copies dropped
    conflicts: int = 0                         # requests seen with both labels: all copies dropped
    duplicates_by_source: dict[str, int] = field(default_factory=dict)
    conflicts_by_source: dict[str, int] = field(default_factory=dict)
    conflict_samples: list[str] = field(default_factory=list)


def deduplicate(examples: Sequence[Example]) -> tuple[list[Example], DedupReport]:
    """Keep the first root of each request (sources in the given order), drop conflicting labels.

    A dropped duplicate hands its answers (``meta["answers"]``) to the root
    kept in its place, so scored responses are not lost with it. Non-root
    examples follow their root: dropped with it, kept with it.
    """
    roots = [e for e in examples if e.is_root]
    labels: dict[str, set[int]] = defaultdict(set)
    for root in roots:
        labels[request_key(root)].add(root.label)
    report = DedupReport()
    kept: dict[str, Example] = {}
    for root in roots:
        key = request_key(root)
        if len(labels[key]) > 1:
            report.conflicts += 1
            _count(report.conflicts_by_source, root.source)
            if len(report.conflict_samples) < 20 and key not in report.conflict_samples:
                report.conflict_samples.append(key)
        elif key in kept:
            report.duplicates += 1
            _count(report.duplicates_by_source, root.source)
            kept[key] = _merge_answers(kept[key], root)
        else:
            kept[key] = root
    by_id = {root.id: root for root in kept.values()}
    return [by_id.get(e.id, e) for e in examples
            if e.origin in by_id and (not e.is_root or e.id in by_id)], report


def _count(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def _merge_answers(kept: Example, dropped: Example) -> Example:
    have = list(kept.meta.get("answers", []))
    texts = {a["text"] for a in have}
    extra = [a for a in dropped.meta.get("answers", []) if a["text"] not in texts]
    if not extra:
        return kept
    return replace(kept, meta={**kept.meta, "answers": have + extra})


def split_for(origin_text: str, seed_text: str = "guardrail-v1",
              ratios: Sequence[float] = DEFAULT_RATIOS) -> str:
    """The split of a request, from sha256 of its normalised text (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed_text}\x1f{normalise(origin_text)}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2 ** 64
    total = sum(ratios)
    edge = 0.0
    for name, ratio in zip(SPLITS, ratios):
        edge += ratio / total
        if point < edge:
            return name
    return SPLITS[-1]


def origin_texts(examples: Iterable[Example]) -> dict[str, str]:
    """Origin id -> the root's request text, for splitting derived examples."""
    return {e.id: e.request_text() for e in examples if e.is_root}


def split_of(example: Example, origins: Mapping[str, str], seed_text: str = "guardrail-v1",
             ratios: Sequence[float] = DEFAULT_RATIOS) -> str:
    """The split of any example: that of its origin's request."""
    try:
        return split_for(origins[example.origin], seed_text, ratios)
    except KeyError:
        raise DataError(
            f"example {example.id!r} has origin {example.origin!r}, which is not among the roots") from None


def assign_splits(examples: Sequence[Example], seed_text: str = "guardrail-v1",
                  ratios: Sequence[float] = DEFAULT_RATIOS) -> dict[str, list[Example]]:
    origins = origin_texts(examples)
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for example in examples:
        out[split_of(example, origins, seed_text, ratios)].append(example)
    return out


def leakage(splits: Mapping[str, Sequence[Example]]) -> list[str]:
    """Everything that ties one split to another: shared ids, origins or request texts of roots.

    An empty list means the held-out splits are clean.
    """
    seen: dict[str, dict[str, str]] = {"id": {}, "origin": {}, "request": {}}
    problems = []
    for name, examples in splits.items():
        for e in examples:
            keys = {"id": e.id, "origin": e.origin}
            if e.is_root:
                keys["request"] = request_key(e)
            for kind, value in keys.items():
                first = seen[kind].setdefault(value, name)
                if first != name:
                    problems.append(f"{kind} {value[:80]!r} is in both {first} and {name}")
    return problems
