"""Every GGUF chat model on this machine, described from its metadata: what `guardrail models` lists.

The stores are guardrail's own cache (``<cache>/models``), Ollama, the Hugging
Face cache and LM Studio (:mod:`guardrail.artifacts.stores`). A file's metadata
is read with the ``gguf`` package's reader (a memory map of the header: no
llama.cpp model is loaded, so listing is fast), and its head is found by the
sha256 the file is known by without hashing it (an Ollama blob's name, or the
fingerprint cache); ``hash_missing`` hashes the rest once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from .hashes import known_sha256, model_sha256
from .heads import locate_head
from .models import KNOWN_MODELS
from .stores import StoredModel, loadable_ggufs, model_parts, stored_models
from .wheels import cache_dir

# GGUF files that are not chat models: vision projectors, LoRA adapters, guardrail's heads.
NOT_MODELS = {"clip", "guardrail.head"}
NOT_MODEL_TYPES = {"adapter", "mmproj"}


def guardrail_models() -> list[StoredModel]:
    """The models in guardrail's own cache: a known model by its name, any other file by its path."""
    folder = cache_dir() / "models"
    names = {known.filename: name for name, known in KNOWN_MODELS.items()}
    files = loadable_ggufs(p.name for p in folder.glob("*.gguf") if p.is_file()) if folder.is_dir() else []
    return [StoredModel(names.get(f, str(folder / f)), "guardrail", folder / f, model_parts(folder / f))
            for f in files]


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (UnicodeDecodeError, IndexError, ValueError):
        return None


def _quantization(reader: gguf.GGUFReader) -> str | None:
    """The file type as llama.cpp names it (``Q4_K_M``), else the most common tensor type."""
    file_type = _field(reader, "general.file_type")
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        pass
    kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2]
    return max(set(kinds), key=kinds.count) if kinds else None


def gguf_summary(path: Path) -> dict[str, Any]:
    """A GGUF's architecture, quantization and shape from its header; ``chat_model`` False for a file
    that is not one (a projector, an adapter, a vocabulary only). Raises on a file that is not GGUF."""
    reader = gguf.GGUFReader(path, "r")
    arch = _field(reader, "general.architecture")
    kind = _field(reader, "general.type")
    return {
        "architecture": arch, "name": _field(reader, "general.name"), "quantization": _quantization(reader),
        "n_layer": _field(reader, f"{arch}.block_count"), "n_embd": _field(reader, f"{arch}.embedding_length"),
        "n_ctx_train": _field(reader, f"{arch}.context_length"),
        "chat_template": _field(reader, "tokenizer.chat_template") is not None,
        "chat_model": bool(reader.tensors) and arch not in NOT_MODELS and kind not in NOT_MODEL_TYPES,
    }


def _head(path: Path, hash_missing: bool) -> dict[str, Any]:
    """The model's sha256 (if known or ``hash_missing``) and the head guardrail would use for it."""
    try:
        sha = model_sha256(path) if hash_missing else known_sha256(path)
    except OSError:
        sha = None
    if sha is None:
        return {"sha256": None, "head": "unknown", "head_path": None}
    found = locate_head(sha)
    return {"sha256": sha, "head": found[1] if found else "none", "head_path": str(found[0]) if found else None}


def describe(model: StoredModel, hash_missing: bool = False) -> dict[str, Any] | None:
    """One row of `guardrail models`; None for a GGUF that is not a chat model. An unreadable file is
    listed with its error (one line), not skipped."""
    row: dict[str, Any] = {"model": model.spec, "store": model.store, "path": str(model.path),
                           "size_bytes": sum(p.stat().st_size for p in model.parts if p.exists())}
    try:
        summary = gguf_summary(model.path)
    except Exception as exc:  # the gguf reader fails in many ways on bad bytes; all mean the same here
        return row | {"error": f"not a readable GGUF file ({' '.join(str(exc).split())[:120] or type(exc).__name__})"}
    if not summary.pop("chat_model"):
        return None
    return row | summary | _head(model.path, hash_missing) | {"train": f"guardrail train --model {model.spec}"}


def list_models(hash_missing: bool = False) -> list[dict[str, Any]]:
    """Every GGUF chat model found: guardrail's cache, Ollama, the Hugging Face cache, LM Studio."""
    rows = (describe(m, hash_missing) for m in guardrail_models() + stored_models())
    return [row for row in rows if row is not None]
