"""Hashed character n-gram TF-IDF features of raw text.

Used both when a head is trained and inside the head at run time, so the
bucket of an n-gram must never depend on the process: n-grams are hashed with
a fixed polynomial hash over Unicode code points (uint64 arithmetic, then the
splitmix64 finaliser), never with Python's salted ``hash()``. The hashing is
vectorised with numpy, so one short text costs well under a millisecond.

Text is lowercased and its whitespace collapsed; each word is padded with one
space on both sides and only n-grams inside a padded word are counted (the
"char_wb" scheme), so " kil", "kill", "ill " are features but nothing spans
two words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HASH_SCHEME = "poly31-splitmix64-v1"
_PRIME = np.uint64(1_000_003)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def normalize(text: str) -> str:
    """Lowercase and collapse runs of whitespace, so layout does not change features."""
    return " ".join(text.lower().split())


def _splitmix64(h: np.ndarray) -> np.ndarray:
    """Scramble the polynomial hash so its low bits (the bucket) are well mixed."""
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return np.asarray(h ^ (h >> np.uint64(31)))


def ngram_buckets(text: str, n_buckets: int, ngram_range: tuple[int, int] = (3, 5)) -> np.ndarray:
    """Bucket index of every word-padded character n-gram of ``text`` (with repeats)."""
    words = normalize(text)
    if not words:
        return np.zeros(0, dtype=np.int64)
    padded = " " + words.replace(" ", "  ") + " "
    codes = np.frombuffer(padded.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    is_space = codes == ord(" ")
    spaces_before = np.concatenate(([0], np.cumsum(is_space)))
    lo, hi = ngram_range
    length = codes.size
    h = np.zeros(length, dtype=np.uint64)
    out = []
    for n in range(1, hi + 1):
        starts = length - n + 1
        if starts <= 0:
            break
        # h[i] becomes the hash of padded[i:i+n] (uint64 arithmetic wraps, by design).
        h = h[:starts] * _PRIME + codes[n - 1:n - 1 + starts]
        if n < lo:
            continue
        idx = np.arange(starts)
        # A space strictly inside the window means it crosses a word boundary.
        inner = spaces_before[idx + n - 1] - spaces_before[idx + 1]
        keep = h[inner == 0]
        out.append(_splitmix64(keep ^ np.uint64(n)) % np.uint64(n_buckets))
    if not out:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(out).astype(np.int64)


@dataclass(eq=False)
class HashedNgrams:
    """TF-IDF over hashed character n-grams: sublinear tf, smoothed idf, L2-normalised rows."""

    n_buckets: int = 2 ** 15
    ngram_range: tuple[int, int] = (3, 5)
    idf: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        lo, hi = self.ngram_range
        if not 1 <= lo <= hi or self.n_buckets < 1:
            raise ValueError(f"bad featurizer config: n_buckets={self.n_buckets}, ngram_range={self.ngram_range}")
        self.ngram_range = (int(lo), int(hi))
        if self.idf is not None:
            self.idf = np.asarray(self.idf, dtype=np.float32)
            if self.idf.shape != (self.n_buckets,):
                raise ValueError(f"idf has shape {self.idf.shape}, expected ({self.n_buckets},)")

    def config(self) -> dict[str, Any]:
        """Everything besides ``idf`` needed to rebuild the same featurizer (JSON-safe)."""
        return {"n_buckets": self.n_buckets, "ngram_range": list(self.ngram_range), "hash": HASH_SCHEME}

    @classmethod
    def from_config(cls, config: dict[str, Any], idf: np.ndarray) -> HashedNgrams:
        """Rebuild a fitted featurizer; refuses configs hashed by another scheme."""
        if config.get("hash") != HASH_SCHEME:
            raise ValueError(f"unknown n-gram hash scheme {config.get('hash')!r}")
        lo, hi = config["ngram_range"]
        return cls(n_buckets=int(config["n_buckets"]), ngram_range=(int(lo), int(hi)), idf=idf)

    def _tf(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(buckets, 1 + log tf) of one text: the sparse row before idf."""
        buckets, counts = np.unique(ngram_buckets(text, self.n_buckets, self.ngram_range), return_counts=True)
        return buckets, (1.0 + np.log(counts)).astype(np.float32)

    def fit(self, texts: Sequence[str]) -> HashedNgrams:
        """Fit the smoothed idf, log((1 + n) / (1 + df)) + 1, on training texts."""
        df = np.zeros(self.n_buckets, dtype=np.int64)
        for text in texts:
            df[self._tf(text)[0]] += 1
        self.idf = (np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def sparse_row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(sorted bucket indices, float32 values) of one text's row; empty for an empty text."""
        if self.idf is None:
            raise ValueError("HashedNgrams used before fit")
        buckets, tf = self._tf(text)
        values = tf * self.idf[buckets]
        norm = float(np.sqrt(np.dot(values, values)))
        return buckets, (values / norm if norm > 0.0 else values)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Dense float32 rows (len(texts), n_buckets)."""
        out = np.zeros((len(texts), self.n_buckets), dtype=np.float32)
        for row, text in enumerate(texts):
            buckets, values = self.sparse_row(text)
            out[row, buckets] = values
        return out
