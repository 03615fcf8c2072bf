"""guardrail: explicit, cheap, visible safety signals inside llama.cpp's decoding loop.

The data flows one way: engine (model, context) -> capture (hidden states) ->
head (a probability) -> probe/schedule (when and what to re-read) -> policy
(intervene or not) -> guard (the public API) -> surfaces (CLI, UI, server).
"""

# llama.cpp is loaded before numpy on purpose: on some Python builds the
# reverse order crashed model loading (see README, "Import order").
import llama_cpp  # noqa: F401

from .errors import (  # noqa: E402
    CaptureError,
    ContextError,
    ContextOverflowError,
    DataError,
    GuardrailError,
    HeadError,
    ModelError,
)

__version__ = "0.1.0"

__all__ = [
    "Guard",
    "CaptureError",
    "ContextError",
    "ContextOverflowError",
    "DataError",
    "GuardrailError",
    "HeadError",
    "ModelError",
    "__version__",
]


def __getattr__(name: str):
    """``from guardrail import Guard`` without loading the whole stack on ``import guardrail``."""
    if name == "Guard":
        from guardrail.runtime.guard import Guard

        return Guard
    raise AttributeError(f"module 'guardrail' has no attribute {name!r}")
