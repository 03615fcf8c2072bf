"""Where a model's safety head is found: shipped with guardrail, or trained by the user.

A head is looked up by the sha256 of the model file it was trained for, so the
same weights find their head under any file name: first the user's own, which
``guardrail train --model PATH`` saves under ``<cache>/heads/<sha256>.gguf``, then
the heads that ship in the package (for the known models).
"""

from __future__ import annotations

from pathlib import Path

from guardrail.errors import HeadError

from .hashes import OLLAMA_BLOB
from .models import KNOWN_MODELS
from .stores import ollama_names_for
from .wheels import cache_dir

SHIPPED_HEADS = Path(__file__).parent / "heads"


def user_heads_dir() -> Path:
    return cache_dir() / "heads"


def user_head_path(model_sha: str) -> Path:
    """Where ``guardrail train --model`` saves the head for the model with this sha256."""
    return user_heads_dir() / f"{model_sha}.gguf"


def locate_head(model_sha: str) -> tuple[Path, str] | None:
    """(path, "trained" | "shipped") of the head for the model with this sha256, or None.

    A head the user trained (`guardrail train` without --out) is a deliberate choice,
    so it wins over the one that ships for a known model."""
    mine = user_head_path(model_sha)
    if mine.is_file():
        return mine, "trained"
    for name, known in KNOWN_MODELS.items():
        shipped = SHIPPED_HEADS / f"{name}.gguf"
        if known.sha256 == model_sha and shipped.is_file():
            return shipped, "shipped"
    return None


def find_head(model_sha: str, model_name: str) -> Path:
    """The head for a model file (by its sha256): the user's own first, then the shipped one."""
    found = locate_head(model_sha)
    if found:
        return found[0]
    if OLLAMA_BLOB.fullmatch(Path(model_name).name):  # a blob's file name means nothing to a user
        model_name = next(iter(ollama_names_for(model_sha)), model_name)
    raise HeadError(f"no safety head for {model_name} yet: run `guardrail train --model {model_name}` "
                    "once (it saves one where guardrail finds it), or pass one with --head")


def known_heads() -> list[Path]:
    """Every head guardrail would find: the shipped ones, then the user's."""
    shipped = sorted(SHIPPED_HEADS.glob("*.gguf"))
    mine = sorted(user_heads_dir().glob("*.gguf")) if user_heads_dir().is_dir() else []
    return shipped + mine
