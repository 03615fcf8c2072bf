"""The head's maths: standardisation, a linear or small MLP model, the logistic function.

Shared by the trainer (which fits them) and the head file (which stores and
scores them); nothing here knows how they were fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.asarray(np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)))


@dataclass
class TrainLog:
    """How a training run went: losses per epoch and which epoch was kept."""

    train_loss: list[float]
    val_loss: list[float]
    best_epoch: int
    stopped_early: bool

    @property
    def epochs(self) -> int:
        return len(self.train_loss)


@dataclass(eq=False)
class LinearModel:
    """logit = x . w + b"""

    w: np.ndarray
    b: float
    log: TrainLog | None = field(default=None, repr=False)
    kind: ClassVar[str] = "logreg"

    @property
    def n_features(self) -> int:
        return int(self.w.shape[0])

    def logits(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(np.asarray(X, dtype=np.float32) @ self.w + np.float32(self.b))


@dataclass(eq=False)
class MLPModel:
    """logit = relu(x W1 + b1) . w2 + b2"""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float
    log: TrainLog | None = field(default=None, repr=False)
    kind: ClassVar[str] = "mlp"

    @property
    def n_features(self) -> int:
        return int(self.w1.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[1])

    def logits(self, X: np.ndarray) -> np.ndarray:
        h = np.maximum(np.asarray(X, dtype=np.float32) @ self.w1 + self.b1, np.float32(0.0))
        return np.asarray(h @ self.w2 + np.float32(self.b2))

    @classmethod
    def averaged(cls, models: Sequence[MLPModel]) -> MLPModel:
        """Fits from several seeds as one MLP whose logit is their mean: their hidden layers side by side.

        Averaging seeds cuts the variance a single fit has on data it never saw, and the
        result is still one MLP, so the head file and the runtime need nothing new."""
        if not models:
            raise ValueError("averaged() needs at least one model")
        k = np.float32(len(models))
        return cls(np.concatenate([m.w1 for m in models], axis=1), np.concatenate([m.b1 for m in models]),
                   np.concatenate([m.w2 for m in models]) / k, float(sum(m.b2 for m in models) / len(models)))


@dataclass(eq=False)
class Standardizer:
    """Per-feature (x - mean) / std, fitted on training rows only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, *, min_std: float = 1e-6) -> Standardizer:
        """Constant features get std 1 so they map to 0 instead of blowing up."""
        X64 = np.asarray(X, dtype=np.float64)
        std = X64.std(axis=0)
        std[std < min_std] = 1.0
        return cls(X64.mean(axis=0).astype(np.float32), std.astype(np.float32))

    @classmethod
    def identity(cls, dim: int) -> Standardizer:
        """For blocks already on a sensible scale (e.g. L2-normalised TF-IDF)."""
        return cls(np.zeros(dim, dtype=np.float32), np.ones(dim, dtype=np.float32))

    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.asarray((np.asarray(X, dtype=np.float32) - self.mean) / self.std, dtype=np.float32)
