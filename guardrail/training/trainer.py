"""Numpy trainers for the safety head: logistic regression and a one-hidden-layer MLP.

Both minimise sample-weighted binary cross-entropy plus an L2 penalty on the
weights (not the biases) with minibatch Adam, and stop early on the loss of a
validation set (or, without one, on the training objective), keeping the
parameters of the best epoch. Everything is float32 and seeded, so the same
inputs give the same model. Label 1 is harmful.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from guardrail.head.model import LinearModel, MLPModel, TrainLog, sigmoid

__all__ = ["balanced_weights", "fit_temperature", "train_logreg", "train_mlp"]

Params = dict[str, np.ndarray]
Gradient = Callable[[Params, np.ndarray, np.ndarray, np.ndarray], Params]


def _bce(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted mean binary cross-entropy of logits ``z`` against labels ``y``."""
    per_row = np.logaddexp(0.0, z.astype(np.float64)) - y * z
    return float(np.dot(w, per_row) / w.sum())


def balanced_weights(labels: Sequence[int] | np.ndarray, sources: Sequence[str],
                     base: np.ndarray | None = None) -> np.ndarray:
    """Row weights (mean 1) that stop big sources and the bigger class from dominating.

    Within a class every (source, label) group gets the same total weight;
    then each class present gets the same total. Inside a group, rows share its
    total in proportion to ``base`` (equally without it)."""
    lab = np.asarray(labels).astype(np.int64)
    src = np.asarray(sources, dtype=object)
    if lab.size != src.size:
        raise ValueError("balanced_weights: labels and sources must have the same length")
    share = np.ones(lab.size, np.float64) if base is None else np.asarray(base, np.float64)
    weights = np.zeros(lab.size, dtype=np.float64)
    classes = np.unique(lab)
    for c in classes:
        in_class = lab == c
        groups = np.unique(src[in_class])
        for g in groups:
            rows = in_class & (src == g)
            weights[rows] = share[rows] / (share[rows].sum() * len(classes) * len(groups))
    return (weights * lab.size).astype(np.float32)


class _Adam:
    """Adam state for a dict of float32 parameters, updated in place."""

    def __init__(self, params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps, self.t = lr, beta1, beta2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        scale = self.lr * math.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        for k, g in grads.items():
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * g * g
            params[k] -= (scale * self.m[k] / (np.sqrt(self.v[k]) + self.eps)).astype(np.float32)


def _adam_fit(params: Params, gradient: Gradient, predict: Callable[[Params, np.ndarray], np.ndarray],
              X: np.ndarray, y: np.ndarray, sw: np.ndarray,
              val: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
              *, lr: float, max_epochs: int, patience: int, batch_size: int, penalty: Callable[[Params], float],
              rng: np.random.Generator) -> tuple[Params, TrainLog]:
    """Minibatch Adam with best-epoch early stopping; returns the kept params and the log."""
    adam = _Adam(params, lr)
    best, best_loss, best_epoch, since_best = {k: v.copy() for k, v in params.items()}, math.inf, -1, 0
    train_hist: list[float] = []
    val_hist: list[float] = []
    for epoch in range(max_epochs):
        order = rng.permutation(X.shape[0])
        for start in range(0, order.size, batch_size):
            rows = order[start:start + batch_size]
            adam.step(params, gradient(params, X[rows], y[rows], sw[rows]))
        train_hist.append(_bce(predict(params, X), y, sw) + penalty(params))
        if val is not None:
            val_hist.append(_bce(predict(params, val[0]), val[1], val[2]))
        monitored = val_hist[-1] if val is not None else train_hist[-1]
        if monitored < best_loss - 1e-6:  # ignore improvements lost in float32 noise
            best, best_loss, best_epoch, since_best = {k: v.copy() for k, v in params.items()}, monitored, epoch, 0
        else:
            since_best += 1
            if since_best >= patience:
                return best, TrainLog(train_hist, val_hist, best_epoch, stopped_early=True)
    return best, TrainLog(train_hist, val_hist, best_epoch, stopped_early=False)


def _prepare(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None, X_val: np.ndarray | None,
             y_val: np.ndarray | None, w_val: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Cast to float32 and check shapes once, so the loops do no conversions."""
    X32 = np.asarray(X, dtype=np.float32)
    y32 = np.asarray(y, dtype=np.float32)
    if X32.ndim != 2 or y32.shape != (X32.shape[0],):
        raise ValueError(f"X must be (n, d) and y (n,), got {X32.shape} and {y32.shape}")
    sw = np.ones_like(y32) if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    val = None
    if X_val is not None and y_val is not None:
        Xv = np.asarray(X_val, dtype=np.float32)
        yv = np.asarray(y_val, dtype=np.float32)
        if Xv.ndim != 2 or Xv.shape[1] != X32.shape[1] or yv.shape != (Xv.shape[0],):
            raise ValueError(f"X_val must be (m, {X32.shape[1]}) and y_val (m,), got {Xv.shape} and {yv.shape}")
        wv = np.ones_like(yv) if w_val is None else np.asarray(w_val, dtype=np.float32)
        val = (Xv, yv, wv)
    return X32, y32, sw, val


def train_logreg(X: np.ndarray, y: np.ndarray, *, sample_weight: np.ndarray | None = None, l2: float = 1e-3,
                 X_val: np.ndarray | None = None, y_val: np.ndarray | None = None, w_val: np.ndarray | None = None,
                 max_epochs: int = 100, lr: float = 1e-3, patience: int = 5, batch_size: int = 256,
                 seed: int = 0) -> LinearModel:
    """L2-regularised logistic regression (the default head)."""
    X32, y32, sw, val = _prepare(X, y, sample_weight, X_val, y_val, w_val)

    def predict(p: Params, A: np.ndarray) -> np.ndarray:
        return A @ p["w"] + p["b"][0]

    def gradient(p: Params, A: np.ndarray, t: np.ndarray, w: np.ndarray) -> Params:
        z = predict(p, A)
        g = (w * (sigmoid(z) - t) / w.sum()).astype(np.float32)
        return {"w": A.T @ g + np.float32(l2) * p["w"], "b": np.array([g.sum()], dtype=np.float32)}

    params = {"w": np.zeros(X32.shape[1], dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}
    best, log = _adam_fit(params, gradient, predict, X32, y32, sw, val, lr=lr, max_epochs=max_epochs,
                          patience=patience, batch_size=batch_size,
                          penalty=lambda p: 0.5 * l2 * float(np.dot(p["w"], p["w"])),
                          rng=np.random.default_rng(seed))
    return LinearModel(best["w"], float(best["b"][0]), log)


def train_mlp(X: np.ndarray, y: np.ndarray, *, hidden: int = 64, sample_weight: np.ndarray | None = None,
              l2: float = 1e-3, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
              w_val: np.ndarray | None = None, max_epochs: int = 100, lr: float = 1e-3, patience: int = 5,
              batch_size: int = 128, seed: int = 0) -> MLPModel:
    """One ReLU hidden layer; ``l2`` acts as weight decay on both weight matrices."""
    X32, y32, sw, val = _prepare(X, y, sample_weight, X_val, y_val, w_val)
    rng = np.random.default_rng(seed)
    d = X32.shape[1]

    def predict(p: Params, A: np.ndarray) -> np.ndarray:
        return np.maximum(A @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"][0]

    def gradient(p: Params, A: np.ndarray, t: np.ndarray, w: np.ndarray) -> Params:
        pre = A @ p["w1"] + p["b1"]
        h = np.maximum(pre, 0.0)
        z = h @ p["w2"] + p["b2"][0]
        g = (w * (sigmoid(z) - t) / w.sum()).astype(np.float32)
        dpre = np.outer(g, p["w2"]) * (pre > 0)
        return {"w1": A.T @ dpre + np.float32(l2) * p["w1"], "b1": dpre.sum(axis=0),
                     "w2": h.T @ g + np.float32(l2) * p["w2"], "b2": np.array([g.sum()], dtype=np.float32)}

    params = {
        "w1": (rng.standard_normal((d, hidden)) * math.sqrt(2.0 / d)).astype(np.float32),
        "b1": np.zeros(hidden, dtype=np.float32),
        "w2": (rng.standard_normal(hidden) * math.sqrt(1.0 / hidden)).astype(np.float32),
        "b2": np.zeros(1, dtype=np.float32),
    }
    best, log = _adam_fit(params, gradient, predict, X32, y32, sw, val, lr=lr, max_epochs=max_epochs,
                          patience=patience, batch_size=batch_size,
                          penalty=lambda p: 0.5 * l2 * float(np.sum(p["w1"] ** 2) + np.dot(p["w2"], p["w2"])),
                          rng=rng)
    return MLPModel(best["w1"], best["b1"], best["w2"], float(best["b2"][0]), log)


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, sample_weight: np.ndarray | None = None) -> float:
    """Temperature T minimising the NLL of sigmoid(logit / T), within [0.01, 1000].

    The NLL is convex in s = 1/T, so bisection on the sign of its derivative
    finds the minimum; a separable set drives T to the lower bound.
    """
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    w = np.ones_like(z) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)

    def slope(log_s: float) -> float:
        s = math.exp(log_s)
        return float(np.dot(w, (sigmoid(s * z) - t) * z))

    lo, hi = math.log(1e-3), math.log(1e2)
    if slope(hi) <= 0.0:
        return 1.0 / math.exp(hi)
    if slope(lo) >= 0.0:
        return 1.0 / math.exp(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    return 1.0 / math.exp(0.5 * (lo + hi))
