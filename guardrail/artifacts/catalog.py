"""Every GGUF chat model on this machine, described from its metadata: what `guardrail models` lists.

The stores are guardrail's own cache (``<cache>/models``), Ollama, the Hugging
Face cache and LM Studio (:mod:`guardrail.artifacts.stores`). A file's metadata
is read from its header alone (:mod:`guardrail.artifacts.gguf_header`: no llama.cpp
model is loaded and no vocabulary parsed, so listing is fast), and its head is
found by the sha256 the file is known by without hashing it (an Ollama blob's
name, or the fingerprint cache); ``hash_missing`` hashes the rest once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from .gguf_header import GGUFHeader, GGUFHeaderError, read_header
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


def _quantization(header: GGUFHeader) -> str | None:
    """The file type as llama.cpp names it (``Q4_K_M``), else the most common type of its matrices."""
    try:
        return gguf.LlamaFileType(int(header.fields["general.file_type"])).name.removeprefix(
            "MOSTLY_").removeprefix("ALL_")
    except (KeyError, TypeError, ValueError):
        pass
    kinds = [t.type for t in header.tensors if len(t.shape) >= 2]
    if not kinds:
        return None
    common = max(sorted(set(kinds)), key=kinds.count)
    try:
        return gguf.GGMLQuantizationType(common).name
    except ValueError:
        return f"type {common}"


def gguf_summary(path: Path) -> dict[str, Any]:
    """A GGUF's architecture, quantization and shape from its header; ``chat_model`` False for a file
    that is not one (a projector, an adapter, a vocabulary only). Raises OSError or GGUFHeaderError."""
    header = read_header(path)
    fields = header.fields

    def text(key: str) -> str | None:
        return fields[key] if isinstance(fields.get(key), str) else None

    def number(key: str) -> int | None:
        value = fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    arch = text("general.architecture")
    return {
        "architecture": arch, "name": text("general.name"), "quantization": _quantization(header),
        "n_layer": number(f"{arch}.block_count"), "n_embd": number(f"{arch}.embedding_length"),
        "n_ctx_train": number(f"{arch}.context_length"), "chat_template": "tokenizer.chat_template" in fields,
        "chat_model": bool(header.tensors) and arch not in NOT_MODELS and text("general.type") not in NOT_MODEL_TYPES,
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
    except OSError as exc:
        return row | {"error": f"cannot read it: {exc.strerror or exc}"}
    except GGUFHeaderError as exc:
        return row | {"error": f"not a readable GGUF file: {exc}"}
    if not summary.pop("chat_model"):
        return None
    return row | summary | _head(model.path, hash_missing) | {"train": f"guardrail train --model {model.spec}"}


def list_models(hash_missing: bool = False) -> list[dict[str, Any]]:
    """Every GGUF chat model found: guardrail's cache, Ollama, the Hugging Face cache, LM Studio."""
    rows = (describe(m, hash_missing) for m in guardrail_models() + stored_models())
    return [row for row in rows if row is not None]
