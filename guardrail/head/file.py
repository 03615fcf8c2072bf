"""The safety head's file: GGUF (architecture ``guardrail.head``), int8 weights, checked on load.

Weights are int8 in blocks of 32 along each row with one float32 scale per
block; biases, standardisation and idf are float32. Metadata records the format
version, the base model's fingerprint, the feature blocks, the probe text,
threshold, temperature, tau, the training manifest and the metrics. The
companions are stored in the same file, each under its own prefix: the per-token
head (metadata ``guardrail.token.``, tensors ``token.``), the text baseline
(``baseline.``) and the answer-stage head (``answer.``, its rule, window and how its
threshold was chosen in its ``extra["answer_stage"]``). Every fault in a file
becomes a one-line :class:`~guardrail.errors.HeadError`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from guardrail._json import json_safe
from guardrail.errors import HeadError

from .core import LEXICAL, QUANT_BLOCK, FeatureBlock, Head, ModelFingerprint, dequantize_rows, quantize_rows
from .lexical import HashedNgrams
from .model import LinearModel, MLPModel, Standardizer

ARCHITECTURE = "guardrail.head"
FORMAT_VERSION = 1
TOKEN_PREFIX = "token."  # the companion head: tensors "token.*", metadata "guardrail.token.*"
BASELINE_PREFIX = "baseline."  # the text baseline: tensors "baseline.*", metadata "guardrail.baseline.*"
ANSWER_PREFIX = "answer."  # the answer-stage head: tensors "answer.*", metadata "guardrail.answer.*"
COMPANIONS = (("token_head", TOKEN_PREFIX, "per-token companion head"), ("baseline", BASELINE_PREFIX, "text baseline"),
              ("answer_head", ANSWER_PREFIX, "answer-stage head"))
MAX_QUANT_BLOCK = 4096
MAX_LEXICAL_DIM = 1 << 22
_STATE_BLOCK = re.compile(r"l_out-(\d+)/([a-z_]+)")

# Metadata keys (all under "guardrail."); those of one head move under a prefix with ``_key``.
K_VERSION = "guardrail.format_version"
K_BASE_SHA = "guardrail.base_model.sha256"
K_BASE_ARCH = "guardrail.base_model.architecture"
K_BASE_EMBD = "guardrail.base_model.n_embd"
K_BASE_LAYER = "guardrail.base_model.n_layer"
K_BLOCK_NAMES = "guardrail.blocks.names"
K_BLOCK_DIMS = "guardrail.blocks.dims"
K_LAYERS = "guardrail.layers"
K_POOLING = "guardrail.pooling"
K_PROBE = "guardrail.probe_text"
K_KIND = "guardrail.model.kind"
K_HIDDEN = "guardrail.model.hidden"
K_QUANT_BLOCK = "guardrail.quant.block_size"
K_TEMPERATURE = "guardrail.temperature"
K_THRESHOLD = "guardrail.threshold"
K_TARGET_FPR = "guardrail.target_fpr"
K_TAU = "guardrail.tau"
K_LEXICAL = "guardrail.lexical.config"
K_MANIFEST = "guardrail.manifest"
K_METRICS = "guardrail.metrics"
K_EXTRA = "guardrail.extra"
K_CREATED_BY = "guardrail.created_by"

_INT_TYPES = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
              gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
              gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
_FLOAT_TYPES = {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64}


# ---- writing ---------------------------------------------------------------------------------

def _key(key: str, prefix: str) -> str:
    """A per-head metadata key of the head stored under ``prefix`` (``guardrail.x`` -> ``guardrail.token.x``)."""
    return key.replace("guardrail.", f"guardrail.{prefix}", 1)


def _weight_tensors(model: LinearModel | MLPModel) -> dict[str, np.ndarray]:
    """Tensor name -> array for the model's parameters (2-D weights are stored row-major, rows = outputs)."""
    out: dict[str, np.ndarray] = {}
    if isinstance(model, LinearModel):
        matrices = {"head.w": model.w[None, :]}
        out["head.b"] = np.array([model.b], dtype=np.float32)
    else:
        matrices = {"head.w1": model.w1.T, "head.w2": model.w2[None, :]}
        out["head.b1"] = np.asarray(model.b1, dtype=np.float32)
        out["head.b2"] = np.array([model.b2], dtype=np.float32)
    for name, matrix in matrices.items():
        q, scale = quantize_rows(np.asarray(matrix, dtype=np.float32))
        out[f"{name}.q8"], out[f"{name}.scale"] = q, scale
    return out


def _json(value: Any) -> str:
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False)


def _add_text(writer: gguf.GGUFWriter, key: str, value: str) -> None:
    """A string key even when empty (``GGUFWriter.add_string`` silently drops empty strings)."""
    writer.add_key_value(key, value, gguf.GGUFValueType.STRING)


def _write_file_metadata(writer: gguf.GGUFWriter, head: Head) -> None:
    """What the whole file shares, companion included: format, base model, provenance."""
    writer.add_uint32(K_VERSION, FORMAT_VERSION)
    _add_text(writer, "general.name", "guardrail safety head")
    _add_text(writer, K_BASE_SHA, head.fingerprint.sha256)
    _add_text(writer, K_BASE_ARCH, head.fingerprint.architecture)
    writer.add_uint32(K_BASE_EMBD, head.fingerprint.n_embd)
    writer.add_uint32(K_BASE_LAYER, head.fingerprint.n_layer)
    _add_text(writer, K_MANIFEST, _json(head.manifest))
    _add_text(writer, K_CREATED_BY, head.created_by)


def _write_head_metadata(writer: gguf.GGUFWriter, head: Head, prefix: str) -> None:
    """What one head has of its own, under ``prefix`` so a companion can sit beside the main head."""
    def k(key: str) -> str:
        return _key(key, prefix)

    writer.add_array(k(K_BLOCK_NAMES), [b.name for b in head.blocks])
    writer.add_key_value(k(K_BLOCK_DIMS), [b.dim for b in head.blocks], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.UINT32)
    if head.layers:  # GGUF has no empty arrays: absent means none
        writer.add_key_value(k(K_LAYERS), list(head.layers), gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.INT32)
    if head.pooling:
        writer.add_array(k(K_POOLING), list(head.pooling))
    _add_text(writer, k(K_PROBE), head.probe_text)
    _add_text(writer, k(K_KIND), head.kind)
    writer.add_uint32(k(K_HIDDEN), head.model.hidden if isinstance(head.model, MLPModel) else 0)
    writer.add_uint32(k(K_QUANT_BLOCK), QUANT_BLOCK)
    writer.add_float64(k(K_TEMPERATURE), head.temperature)
    writer.add_float64(k(K_THRESHOLD), head.threshold)
    writer.add_float64(k(K_TARGET_FPR), head.target_fpr)
    writer.add_uint32(k(K_TAU), head.tau)
    if head.lexical is not None:
        _add_text(writer, k(K_LEXICAL), _json(head.lexical.config()))
    _add_text(writer, k(K_METRICS), _json(head.metrics))
    _add_text(writer, k(K_EXTRA), _json(head.extra))


def _head_tensors(head: Head, prefix: str) -> dict[str, np.ndarray]:
    """Tensor name (under ``prefix``) -> array: int8 weights, per-block standardisation, lexical idf."""
    tensors = _weight_tensors(head.model)
    for i, scaler in enumerate(head.scalers):
        tensors[f"block.{i}.mean"], tensors[f"block.{i}.std"] = scaler.mean, scaler.std
    if head.lexical is not None and head.lexical.idf is not None:
        tensors["lexical.idf"] = head.lexical.idf
    return {prefix + name: array for name, array in tensors.items()}


def save_head(head: Head, path: str | os.PathLike[str]) -> None:
    """Write the head (and its companion) as GGUF, atomically (a crash never leaves a half-written head behind)."""
    target = Path(path)
    parts = [(head, "")] + [(getattr(head, attr), prefix) for attr, prefix, _ in COMPANIONS
                            if getattr(head, attr) is not None]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
            _write_file_metadata(writer, head)
            for part, prefix in parts:
                _write_head_metadata(writer, part, prefix)
            for part, prefix in parts:
                for name, array in _head_tensors(part, prefix).items():
                    writer.add_tensor(name, np.ascontiguousarray(array))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shipped head from other users
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise HeadError(f"could not write safety head {target}: {exc.strerror or exc}") from None


# ---- reading ---------------------------------------------------------------------------------

class _Fields:
    """Typed access to a GGUF file's metadata; every fault becomes a one-line HeadError."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def any_under(self, prefix: str) -> bool:
        return any(key.startswith(prefix) for key in self._fields)

    def _raw(self, key: str, required: bool) -> Any:
        found = self._fields.get(key)
        if found is None:
            if required:
                raise HeadError(f"{self._path} is not a complete safety head: metadata {key} is missing")
            return None
        return found

    def _bad(self, key: str, want: str) -> HeadError:
        return HeadError(f"{self._path} is corrupt: metadata {key} is not {want}")

    def _value(self, key: str, allowed: set[gguf.GGUFValueType], want: str, sub: set[gguf.GGUFValueType] | None,
               required: bool) -> Any:
        found = self._raw(key, required)
        if found is None:
            return None
        types = found.types
        ok = (types[:1] == [gguf.GGUFValueType.ARRAY] and len(types) == 2 and types[1] in sub) if sub \
            else (len(types) == 1 and types[0] in allowed)
        if not ok:
            raise self._bad(key, want)
        try:
            return found.contents()
        except (UnicodeDecodeError, IndexError, ValueError):
            raise self._bad(key, want) from None

    def text(self, key: str, default: str | None = None) -> str:
        value = self._value(key, {gguf.GGUFValueType.STRING}, "a string", None, default is None)
        return str(default if value is None else value)  # value is None only when a default was given

    def integer(self, key: str) -> int:
        return int(self._value(key, _INT_TYPES, "an integer", None, True))

    def number(self, key: str) -> float:
        return float(self._value(key, _FLOAT_TYPES, "a number", None, True))

    def texts(self, key: str, required: bool = True) -> list[str]:
        return self._value(key, set(), "a list of strings", {gguf.GGUFValueType.STRING}, required) or []

    def integers(self, key: str, required: bool = True) -> list[int]:
        return [int(v) for v in self._value(key, set(), "a list of integers", _INT_TYPES, required) or []]

    def json_value(self, key: str, default: str | None = "{}") -> Any:
        text = self.text(key, default)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise self._bad(key, "valid JSON") from None


class _Tensors:
    """Checked, copied tensor data of a GGUF file by name."""

    _TYPES = {"f32": (gguf.GGMLQuantizationType.F32, np.float32), "i8": (gguf.GGMLQuantizationType.I8, np.int8)}

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self._tensors = {t.name: t for t in reader.tensors}
        self._path = path

    def any_under(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self._tensors)

    def get(self, name: str, shape: tuple[int, ...], kind: str = "f32") -> np.ndarray:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise HeadError(f"{self._path} is not a complete safety head: tensor {name} is missing")
        ggml_type, dtype = self._TYPES[kind]
        if tensor.tensor_type != ggml_type or tuple(tensor.data.shape) != shape:
            raise HeadError(f"{self._path} is corrupt: tensor {name} is {tensor.tensor_type.name} "
                            f"{tuple(tensor.data.shape)}, expected {ggml_type.name} {shape}")
        data = np.array(tensor.data, dtype=dtype, copy=True)
        if kind == "f32" and not np.all(np.isfinite(data)):
            raise HeadError(f"{self._path} is corrupt: tensor {name} has non-finite values")
        return data


def _read_matrix(tensors: _Tensors, name: str, rows: int, cols: int, block: int) -> np.ndarray:
    q = tensors.get(f"{name}.q8", (rows, cols), "i8")
    scale = tensors.get(f"{name}.scale", (rows, -(-cols // block)))
    return dequantize_rows(q, scale, block)


def _read_model(fields: _Fields, tensors: _Tensors, n_features: int, path: Path,
                prefix: str) -> LinearModel | MLPModel:
    kind, hidden = fields.text(_key(K_KIND, prefix)), fields.integer(_key(K_HIDDEN, prefix))
    block = fields.integer(_key(K_QUANT_BLOCK, prefix))
    if not 1 <= block <= MAX_QUANT_BLOCK:  # dequantizing repeats each scale ``block`` times
        raise HeadError(f"{path} is corrupt: quantisation block size {block} (1 to {MAX_QUANT_BLOCK})")
    head = f"{prefix}head"
    if kind == LinearModel.kind:
        w = _read_matrix(tensors, f"{head}.w", 1, n_features, block)[0]
        return LinearModel(w, float(tensors.get(f"{head}.b", (1,))[0]))
    if kind == MLPModel.kind and hidden > 0:
        w1 = _read_matrix(tensors, f"{head}.w1", hidden, n_features, block).T.copy()
        w2 = _read_matrix(tensors, f"{head}.w2", 1, hidden, block)[0]
        return MLPModel(w1, tensors.get(f"{head}.b1", (hidden,)), w2, float(tensors.get(f"{head}.b2", (1,))[0]))
    raise HeadError(f"{path} has an unknown head model kind {kind!r} (hidden size {hidden})")


def _read_lexical(fields: _Fields, tensors: _Tensors, dim: int, path: Path, prefix: str) -> HashedNgrams:
    try:
        return HashedNgrams.from_config(fields.json_value(_key(K_LEXICAL, prefix), None),
                                        tensors.get(f"{prefix}lexical.idf", (dim,)))
    except KeyError as exc:
        raise HeadError(f"{path} has an unusable lexical featurizer: its config lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise HeadError(f"{path} has an unusable lexical featurizer: {exc}") from None


def _read_head(fields: _Fields, tensors: _Tensors, path: Path, prefix: str, **shared: Any) -> Head:
    """One head stored under ``prefix``; ``shared`` gives what the file holds once (fingerprint, manifest, ...)."""
    def k(key: str) -> str:
        return _key(key, prefix)

    names, dims = fields.texts(k(K_BLOCK_NAMES)), fields.integers(k(K_BLOCK_DIMS))
    if len(names) != len(dims) or not names or min(dims) <= 0:
        raise HeadError(f"{path} is corrupt: {len(names)} block names for {len(dims)} block dims")
    blocks = tuple(FeatureBlock(n, d) for n, d in zip(names, dims))
    _check_blocks(blocks, shared["fingerprint"], path)
    scalers = tuple(Standardizer(tensors.get(f"{prefix}block.{i}.mean", (b.dim,)),
                                 tensors.get(f"{prefix}block.{i}.std", (b.dim,)))
                    for i, b in enumerate(blocks))
    lexical = _read_lexical(fields, tensors, dims[names.index(LEXICAL)], path, prefix) if LEXICAL in names else None
    return Head(
        blocks=blocks, scalers=scalers, model=_read_model(fields, tensors, sum(dims), path, prefix),
        temperature=fields.number(k(K_TEMPERATURE)), threshold=fields.number(k(K_THRESHOLD)),
        target_fpr=fields.number(k(K_TARGET_FPR)), tau=fields.integer(k(K_TAU)),
        layers=tuple(fields.integers(k(K_LAYERS), required=False)),
        pooling=tuple(fields.texts(k(K_POOLING), required=False)),
        probe_text=fields.text(k(K_PROBE)), lexical=lexical,
        metrics=fields.json_value(k(K_METRICS)), extra=fields.json_value(k(K_EXTRA)), **shared,
    )


def _check_blocks(blocks: tuple[FeatureBlock, ...], fingerprint: ModelFingerprint, path: Path) -> None:
    """Every block is the text (``lexical``) or a state of a layer the base model has, as wide as its states."""
    for block in blocks:
        if block.name == LEXICAL:
            if block.dim > MAX_LEXICAL_DIM:
                raise HeadError(f"{path} is corrupt: lexical block of {block.dim} features (at most {MAX_LEXICAL_DIM})")
            continue
        match = _STATE_BLOCK.fullmatch(block.name)
        if match is None:
            raise HeadError(f"{path} asks for feature block {block.name!r}, which is neither 'lexical' nor a layer's "
                            "state ('l_out-N/pooling')")
        layer = int(match.group(1))
        if layer >= fingerprint.n_layer:
            raise HeadError(f"{path} reads layer {layer}, but its base model has {fingerprint.n_layer} layers")
        if block.dim != fingerprint.n_embd:
            raise HeadError(f"{path} is corrupt: block {block.name} has {block.dim} features, "
                            f"the base model's states have {fingerprint.n_embd}")


def _read_companion(fields: _Fields, tensors: _Tensors, path: Path, prefix: str, what: str,
                    **shared: Any) -> Head | None:
    """A companion when any trace of it is stored; a partial one is a fault, not an absence."""
    if not (fields.any_under(_key("guardrail.", prefix)) or tensors.any_under(prefix)):
        return None
    try:
        return _read_head(fields, tensors, path, prefix, **shared)
    except HeadError as exc:
        raise HeadError(f"{exc} (in the {what})") from None


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise HeadError(f"safety head {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except OSError as exc:
        raise HeadError(f"cannot read safety head {path}: {exc.strerror or exc}") from None
    except Exception:  # the gguf reader fails in many ways on bad bytes; all mean the same here
        raise HeadError(f"{path} is not a valid GGUF file (empty, truncated or corrupt)") from None
    arch_field = reader.fields.get("general.architecture")
    try:
        arch = arch_field.contents() if arch_field is not None else None
    except (UnicodeDecodeError, IndexError, ValueError):
        arch = None
    if arch != ARCHITECTURE:
        raise HeadError(f"{path} is a GGUF file but not a guardrail safety head (architecture {arch!r})")
    return reader


def _check_fingerprint(trained: ModelFingerprint, expect: ModelFingerprint | None, allow_mismatch: bool) -> None:
    if expect is None or trained == expect:
        return
    told = f"head was trained for {trained.describe()}, this model is {expect.describe()}"
    if not trained.same_shape(expect):
        raise HeadError(f"{told}; its hidden states do not fit this head")
    if not allow_mismatch:
        raise HeadError(f"{told}; train a head for this model, or allow the mismatch to try it anyway")
    warnings.warn(f"{told}: same architecture and size but a different checkpoint, "
                  "so the head's probabilities may be off", stacklevel=3)


def load_head(path: str | os.PathLike[str], *, expect: ModelFingerprint | None = None,
              allow_mismatch: bool = False) -> Head:
    """Read and verify a head file; refuse one trained for another model unless allowed.

    With ``allow_mismatch`` a head for another checkpoint of the same
    architecture, width and depth is accepted with a warning; a head for a
    model of another shape is always refused.
    """
    file = Path(path)
    reader = _open(file)
    fields, tensors = _Fields(reader, file), _Tensors(reader, file)
    version = fields.integer(K_VERSION)
    if version != FORMAT_VERSION:
        raise HeadError(f"{file} is safety head format v{version}; this guardrail reads v{FORMAT_VERSION}")
    fingerprint = ModelFingerprint(fields.text(K_BASE_SHA), fields.text(K_BASE_ARCH),
                                   fields.integer(K_BASE_EMBD), fields.integer(K_BASE_LAYER))
    _check_fingerprint(fingerprint, expect, allow_mismatch)
    shared = {"fingerprint": fingerprint, "manifest": fields.json_value(K_MANIFEST),
              "created_by": fields.text(K_CREATED_BY, "")}
    companions = {attr: _read_companion(fields, tensors, file, prefix, what, **shared)
                  for attr, prefix, what in COMPANIONS}
    return _read_head(fields, tensors, file, "", **companions, **shared)




def describe_head(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `guardrail heads` lists of a head file: its model, when it was made, how it measured.

    A file that cannot be read is listed with its error instead (one line), not skipped."""
    file = Path(path)
    row: dict[str, Any] = {"path": str(file)}
    try:
        head = load_head(file)
    except HeadError as exc:
        return row | {"error": str(exc)}
    metrics = head.metrics
    test = (metrics.get("test") or {}).get("overall") or {}
    # Per answer, not per request: what a user meets over the model's own held-out answers, as the head
    # file last recorded it (`train`, `calibrate`, or `calibrate --keep-thresholds` after a loop change).
    answers = (head.answer_head.metrics if head.answer_head is not None else {}) or {}
    answer_test = answers.get("test") or {}
    return row | {
        "model_sha256": head.fingerprint.sha256, "architecture": head.fingerprint.architecture,
        "n_layer": head.fingerprint.n_layer, "n_embd": head.fingerprint.n_embd,
        "created": head.extra.get("created") or _mtime(file), "created_by": head.created_by,
        "blocks": [b.name for b in head.blocks], "threshold": head.threshold,
        "examples": head.manifest.get("examples"), "preset": head.extra.get("preset"),
        "loso_mean_auroc": (metrics.get("loso") or {}).get("mean_auroc"),
        "loso_min_auroc": (metrics.get("loso") or {}).get("min_auroc"),
        "test_auroc": test.get("auroc"), "test_tpr_at_threshold": test.get("tpr"), "test_fpr": test.get("fpr"),
        "answers_benign_cut": answer_test.get("benign_cut"), "answers_harmful_stopped": answer_test.get("harmful_stopped"),
        "answers_measured": answers.get("remeasured") or answers.get("calibrated") or head.extra.get("created"),
        "caveat": head.caveat,
    }


def _mtime(path: Path) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
