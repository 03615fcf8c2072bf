"""The safety head: named feature blocks -> calibrated probability that a conversation is malicious.

A head reads blocks of features (hidden states such as ``l_out-20/last``
captured from the host model, and optionally ``lexical``, computed here from
the text), standardises each with its stored mean/std, and applies a logistic
regression or a one-hidden-layer MLP; p = sigmoid(logit / temperature). A row
is flagged when p >= threshold. A head may carry a companion head for the
per-token signal (each generated token's own hidden state).

A head records the base model it was trained for (:class:`ModelFingerprint`),
so it is never silently used with a model whose hidden states mean something
else. Weights are stored as int8 (``quantized`` shows a head exactly as its
file will give it back). This module knows numpy arrays and text only.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from guardrail._version import __version__
from guardrail.artifacts.hashes import model_sha256
from guardrail.errors import HeadError

from .lexical import HashedNgrams
from .model import LinearModel, MLPModel, Standardizer, sigmoid

QUANT_BLOCK = 32
LEXICAL = "lexical"


@dataclass(frozen=True)
class ModelFingerprint:
    """Identifies the base model whose hidden states a head was trained on."""

    sha256: str
    architecture: str
    n_embd: int
    n_layer: int

    def describe(self) -> str:
        return f"{self.architecture} {self.sha256[:12]} (n_embd {self.n_embd}, n_layer {self.n_layer})"

    def same_shape(self, other: ModelFingerprint) -> bool:
        """Same architecture and size: another checkpoint whose states line up dimensionally."""
        return (self.architecture, self.n_embd, self.n_layer) == (other.architecture, other.n_embd, other.n_layer)


@dataclass(frozen=True)
class FeatureBlock:
    """One named input of a head, e.g. ``l_out-20/last`` (dim n_embd) or ``lexical``."""

    name: str
    dim: int


@dataclass(frozen=True)
class _BlockPlan:
    """Precomputed per-block arrays for scoring one row without concatenating."""

    name: str
    mean: np.ndarray
    inv_std: np.ndarray
    weight: np.ndarray  # this block's rows of the first layer, (dim, k)
    offset: np.ndarray  # (mean * inv_std) @ weight, used by the sparse lexical path


@dataclass(frozen=True, eq=False)
class Head:
    """A trained safety head; build a changed copy with ``dataclasses.replace``.

    ``baseline`` is the text-only rival it was measured against (n-grams + logistic
    regression, fitted on the same rows), shipped so evaluation needs no training data.
    ``token_head`` is an optional companion that scores single generated tokens
    (while this head scores the probe); it is stored in the same file. ``answer_head``
    is the answer stage's own head, trained on the model's own answers: the checks during
    an answer read it (its ``extra["answer_stage"]`` holds its window, its rule and how
    its threshold was chosen), while this head decides the query check.
    """

    fingerprint: ModelFingerprint
    blocks: tuple[FeatureBlock, ...]
    scalers: tuple[Standardizer, ...]
    model: LinearModel | MLPModel
    temperature: float = 1.0
    threshold: float = 0.5
    target_fpr: float = 0.01
    tau: int = 3
    layers: tuple[int, ...] = ()
    pooling: tuple[str, ...] = ()
    probe_text: str = ""
    lexical: HashedNgrams | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_by: str = f"guardrail {__version__}"
    token_head: Head | None = None
    baseline: Head | None = None
    answer_head: Head | None = None

    def __post_init__(self) -> None:
        problem = _inconsistency(self)
        if problem:
            raise HeadError(f"inconsistent safety head: {problem}")

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def caveat(self) -> str | None:
        """A line a user should read before relying on this head, from its own metadata; None if none.

        A quick-preset head saw about 2,000 conversations and chose its threshold on a couple of
        hundred: measured on unseen data such heads read weaker than full-preset ones (README,
        "Your own model"), and nothing else about the file would tell a user so. An answer stage
        whose threshold is 1.0 never cuts, which a user expecting checks during the answer
        should know too: its validation answers were too few for its promise, or the query
        check used the whole per-answer budget."""
        notes = [note for note in (self._quick_note(), self._answer_stage_note()) if note]
        return "; ".join(notes) if notes else None

    def _answer_stage_note(self) -> str | None:
        if self.answer_head is None or self.answer_head.threshold < 1.0:
            return None
        stage = self.answer_head.extra.get("answer_stage") or {}
        if isinstance(stage.get("max_cuts"), int) and stage["max_cuts"] < 0:
            why = "the query check used the whole per-answer budget on validation answers"
        elif isinstance(stage.get("n_benign"), int):
            why = f"{stage['n_benign']} benign validation answers are too few for its promise"
        else:
            why = "its validation answers could not support its promise"
        return f"its answer stage never cuts ({why}): only the query check acts"

    def _quick_note(self) -> str | None:
        if self.extra.get("preset") != "quick":
            return None
        test = (self.metrics.get("test") or {}).get("overall") or {}
        measured = ""
        if test.get("tpr") is not None and test.get("fpr") is not None:
            measured = (f"; on its own test split it flags {test['tpr']:.0%} of harmful requests "
                        f"at {test['fpr']:.1%} of benign")
        examples = self.manifest.get("examples")
        seen = f"{examples:,} conversations" if isinstance(examples, int) else "a few thousand conversations"
        return (f"a quick-preset head ({seen}){measured}; quick heads read weaker on unseen data than "
                "full-preset ones: `guardrail train --preset full` for a head you rely on")

    @property
    def n_features(self) -> int:
        return sum(b.dim for b in self.blocks)

    def _block_rows(self, block: FeatureBlock, features: Mapping[str, np.ndarray],
                    texts: Sequence[str] | None) -> np.ndarray:
        """The raw (n, dim) input of one block, from the captured features or from text."""
        if block.name == LEXICAL:
            if texts is None or self.lexical is None:
                raise HeadError("this safety head reads the text too, but no text was given")
            return self.lexical.transform(texts)
        if block.name not in features:
            raise HeadError(f"the safety head needs feature block {block.name!r}, which was not captured")
        rows = np.asarray(features[block.name], dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != block.dim:
            raise HeadError(f"feature block {block.name!r} has shape {rows.shape}, the head expects (n, {block.dim})")
        return rows

    def logits(self, features: Mapping[str, np.ndarray], texts: Sequence[str] | None = None) -> np.ndarray:
        """Uncalibrated logits of a batch (before the temperature)."""
        parts = [s.transform(self._block_rows(b, features, texts)) for b, s in zip(self.blocks, self.scalers)]
        if len({p.shape[0] for p in parts}) != 1:
            raise HeadError(f"feature blocks disagree on the number of rows: {[p.shape[0] for p in parts]}")
        return self.model.logits(np.concatenate(parts, axis=1))

    def score(self, features: Mapping[str, np.ndarray], texts: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities (n,) float32 that each row is malicious; a row whose logit is not finite (finite
        weights can still overflow) fails closed at 1.0, as :meth:`probability` does for one."""
        with np.errstate(over="ignore", invalid="ignore"):
            logits = self.logits(features, texts)
            p = sigmoid(logits / np.float32(self.temperature)).astype(np.float32)
        return np.where(np.isfinite(logits) & np.isfinite(p), p, np.float32(1.0)).astype(np.float32)

    @cached_property
    def _plans(self) -> tuple[_BlockPlan, ...]:
        first = self.model.w[:, None] if isinstance(self.model, LinearModel) else self.model.w1
        plans, start = [], 0
        for block, scaler in zip(self.blocks, self.scalers):
            weight = np.ascontiguousarray(first[start:start + block.dim])
            inv_std = (1.0 / scaler.std).astype(np.float32)
            offset = ((scaler.mean.astype(np.float64) * inv_std) @ weight.astype(np.float64)).astype(np.float32)
            plans.append(_BlockPlan(block.name, scaler.mean, inv_std, weight, offset))
            start += block.dim
        return tuple(plans)

    def linear_terms(self) -> tuple[list[tuple[str, np.ndarray]], float] | None:
        """The logit as ``bias + sum(direction . block)`` when the head is linear in its state blocks
        (a logistic regression without text features), else None. With it a check costs a few
        scalar operations (see ``runtime.features.LinearCheck``)."""
        if not isinstance(self.model, LinearModel) or self.lexical is not None:
            return None
        terms, bias = [], float(self.model.b)
        for plan in self._plans:
            direction = plan.weight[:, 0].astype(np.float64) * plan.inv_std.astype(np.float64)
            terms.append((plan.name, direction))
            bias -= float(plan.mean.astype(np.float64) @ direction)
        return terms, bias

    def probability(self, logit: float) -> float:
        """Calibrated probability of a logit; a non-finite logit fails closed (1.0: malicious)."""
        if not math.isfinite(logit):
            return 1.0
        p = float(sigmoid(np.float64(logit / self.temperature)))
        return p if math.isfinite(p) else 1.0

    def score_one(self, features: Mapping[str, np.ndarray], text: str | None = None) -> float:
        """Probability for a single row: no batch concatenation, sparse lexical block."""
        acc = np.zeros(self._plans[0].weight.shape[1], dtype=np.float32)
        for plan in self._plans:
            if plan.name == LEXICAL:
                if text is None or self.lexical is None:
                    raise HeadError("this safety head reads the text too, but no text was given")
                idx, values = self.lexical.sparse_row(text)
                acc += (values * plan.inv_std[idx]) @ plan.weight[idx] - plan.offset
                continue
            if plan.name not in features:
                raise HeadError(f"the safety head needs feature block {plan.name!r}, which was not captured")
            x = np.asarray(features[plan.name], dtype=np.float32).reshape(-1)
            if x.shape[0] != plan.mean.shape[0]:
                raise HeadError(f"feature block {plan.name!r} has {x.shape[0]} values, the head expects {plan.mean.shape[0]}")
            acc += ((x - plan.mean) * plan.inv_std) @ plan.weight
        if isinstance(self.model, LinearModel):
            logit = float(acc[0]) + self.model.b
        else:
            logit = float(np.maximum(acc + self.model.b1, 0.0) @ self.model.w2) + self.model.b2
        return self.probability(logit)


def _inconsistency(head: Head) -> str:
    """What is wrong with a head's parts, or '' when they fit together."""
    names = [b.name for b in head.blocks]
    if not head.blocks:
        return "no feature blocks"
    if len(set(names)) != len(names) or any(b.dim <= 0 for b in head.blocks):
        return f"feature blocks must have distinct names and positive dims: {head.blocks}"
    if len(head.scalers) != len(head.blocks):
        return f"{len(head.scalers)} standardizers for {len(head.blocks)} blocks"
    for block, scaler in zip(head.blocks, head.scalers):
        if scaler.mean.shape != (block.dim,) or scaler.std.shape != (block.dim,):
            return f"standardizer of {block.name!r} does not have {block.dim} values"
        if not (np.all(np.isfinite(scaler.mean)) and np.all(scaler.std > 0) and np.all(np.isfinite(scaler.std))):
            return f"standardizer of {block.name!r} has non-finite values or non-positive std"
    if head.model.n_features != head.n_features:
        return f"model takes {head.model.n_features} features, blocks give {head.n_features}"
    if (LEXICAL in names) != (head.lexical is not None):
        return "a lexical block needs a fitted featurizer and vice versa"
    if head.lexical is not None:
        lex_dim = head.blocks[names.index(LEXICAL)].dim
        if head.lexical.idf is None or head.lexical.n_buckets != lex_dim:
            return f"lexical featurizer is unfitted or does not give {lex_dim} features"
    if not (math.isfinite(head.temperature) and head.temperature > 0):
        return f"temperature must be positive, got {head.temperature}"
    if not (0.0 <= head.threshold <= 1.0 and 0.0 <= head.target_fpr <= 1.0):
        return f"threshold {head.threshold} or target FPR {head.target_fpr} is out of range"
    if head.tau < 1:
        return f"tau must be at least 1, got {head.tau}"
    return _companion_inconsistency(head)


def _companion_inconsistency(head: Head) -> str:
    """A companion is stored beside the main head, so it can be neither nested nor for another model."""
    for what, companion in (("token head", head.token_head), ("text baseline", head.baseline),
                            ("answer-stage head", head.answer_head)):
        if companion is None:
            continue
        if companion.token_head is not None or companion.baseline is not None or companion.answer_head is not None:
            return f"the companion {what} has a companion of its own"
        if companion.fingerprint != head.fingerprint:
            return (f"the companion {what} was trained for {companion.fingerprint.describe()}, "
                    f"the head for {head.fingerprint.describe()}")
    if head.baseline is not None and [b.name for b in head.baseline.blocks] != [LEXICAL]:
        return "the text baseline must read the text alone"
    if head.answer_head is not None:
        prefill = (head.answer_head.extra.get("answer_stage") or {}).get("prefill")
        value = prefill.get("threshold") if isinstance(prefill, Mapping) else None
        if prefill is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not 0.0 <= value <= 1.0):
            return f"the answer stage's prefill threshold must be a number between 0 and 1, got {value!r}"
    return ""


# ---- int8 quantisation ----------------------------------------------------------------------

def quantize_rows(w: np.ndarray, block: int = QUANT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of ``block`` values along each row: (q (r, c) int8, scale (r, ceil(c/block)) f32)."""
    rows, cols = w.shape
    n_blocks = -(-cols // block)
    padded = np.zeros((rows, n_blocks * block), dtype=np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, n_blocks, block)
    scale = (np.abs(blocks).max(axis=2) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, :, None]
    q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8)
    return q.reshape(rows, -1)[:, :cols], scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray, block: int = QUANT_BLOCK) -> np.ndarray:
    """Inverse of ``quantize_rows`` (up to rounding): float32 (r, c)."""
    cols = q.shape[1]
    return (q.astype(np.float32) * np.repeat(scale, block, axis=1)[:, :cols]).astype(np.float32)


def _roundtrip(w: np.ndarray) -> np.ndarray:
    return dequantize_rows(*quantize_rows(w))


def _quantized_model(model: LinearModel | MLPModel) -> LinearModel | MLPModel:
    if isinstance(model, LinearModel):
        return LinearModel(_roundtrip(model.w[None, :])[0], model.b)
    return MLPModel(_roundtrip(model.w1.T).T.copy(), model.b1, _roundtrip(model.w2[None, :])[0], model.b2)


def quantized(head: Head) -> Head:
    """The head (and its companion) exactly as ``load_head`` will see it after ``save_head``: weights through int8."""
    token = None if head.token_head is None else quantized(head.token_head)
    baseline = None if head.baseline is None else quantized(head.baseline)
    answer = None if head.answer_head is None else quantized(head.answer_head)
    return dataclasses.replace(head, model=_quantized_model(head.model), token_head=token, baseline=baseline,
                               answer_head=answer)


# ---- base-model fingerprint ------------------------------------------------------------------

def fingerprint_file(path: str | os.PathLike[str], architecture: str, n_embd: int, n_layer: int) -> ModelFingerprint:
    """Fingerprint of a model file, its sha256 found without re-hashing where possible.

    A multi-gigabyte model is hashed at most once: an Ollama blob's name is its
    sha256, and any other file's is cached by (absolute path, size, mtime_ns)
    (``guardrail.artifacts.hashes``); touching or replacing the file invalidates it.
    """
    model = Path(path).resolve()
    try:
        digest = model_sha256(model)
    except OSError as exc:
        raise HeadError(f"cannot fingerprint model {model}: {exc.strerror or exc}") from None
    return ModelFingerprint(digest, architecture, n_embd, n_layer)
