"""guardrail: explicit, cheap, visible safety signals inside llama.cpp's decoding loop.

The data flows one way: engine (model, context) -> capture (hidden states) ->
head (a probability) -> probe/schedule (when and what to re-read) -> policy
(intervene or not) -> guard (the public API) -> surfaces (CLI, UI, server).
"""

from ._version import __version__
from .errors import (
    CaptureError,
    ContextError,
    ContextOverflowError,
    DataError,
    GuardrailError,
    HeadError,
    LlamaCppError,
    ModelError,
)

# The llama-cpp-python releases guardrail is tested against (pyproject.toml says the same).
LLAMA_CPP_SUPPORTED = ">=0.3.15,<0.4"

# The low-level API guardrail binds: functions, with the argument count where releases changed it.
_LLAMA_FUNCTIONS = {
    "llama_tokenize": (7,), "llama_token_to_piece": (6,), "llama_batch_init": (3,), "llama_decode": (2,),
    "llama_memory_seq_cp": (5,), "llama_memory_seq_rm": (4,), "llama_memory_seq_pos_max": (2,),
    "llama_memory_clear": (2,), "llama_get_memory": (1,), "llama_model_chat_template": (2,),
    "llama_sampler_init_penalties": (4, 5),  # 0.3.35 put n_vocab back in front
    "llama_model_load_from_file": (2,), "llama_init_from_model": (2,), "llama_model_get_vocab": (1,),
    "llama_vocab_get_attr": (2,), "llama_vocab_get_text": (2,), "llama_vocab_is_eog": (2,),
}
_LLAMA_FIELDS = {
    "llama_context_params": ("cb_eval", "cb_eval_user_data", "kv_unified", "n_seq_max", "embeddings", "pooling_type"),
    "llama_model_params": ("vocab_only", "n_gpu_layers"),
    "llama_batch": ("token", "pos", "n_seq_id", "seq_id", "logits"),
}


_HINT = f"pip install 'llama-cpp-python{LLAMA_CPP_SUPPORTED}'"


def _load_llama_cpp() -> LlamaCppError | None:
    """Import llama-cpp-python first; the one-line error when it is missing or its library does not load.

    Returned, not raised: the numpy-only parts (the head, the data) work without llama.cpp,
    so ``import guardrail.head`` must not need it; whatever needs the engine asks
    :func:`require_llama_cpp`, which raises the line."""
    try:
        # llama.cpp is loaded before numpy on purpose: on some Python builds the
        # reverse order crashed model loading (see README, "Import order").
        import llama_cpp  # noqa: F401
        import llama_cpp.llama_cpp  # noqa: F401
    except ImportError as exc:
        return LlamaCppError(f"guardrail needs llama-cpp-python{LLAMA_CPP_SUPPORTED}, which is not installed "
                             f"({exc}); {_HINT}")
    except Exception as exc:  # its native library failed to load (RuntimeError, OSError)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        return LlamaCppError(f"llama-cpp-python is installed but its native library does not load ({reason}); "
                             f"reinstall it: {_HINT}")
    return None


def require_llama_cpp() -> None:
    """Raise the one-line :class:`LlamaCppError` when llama-cpp-python is missing or does not load
    (the runtime, and so Guard, the server and the CLI, call this before they touch llama.cpp)."""
    if _UNAVAILABLE is not None:
        raise _UNAVAILABLE


def _check_llama_cpp() -> None:
    """Fail at import, in one line, when the llama-cpp-python that loaded is not the API guardrail binds
    (never later, in ctypes)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    problems = []
    for name, arities in _LLAMA_FUNCTIONS.items():
        function = getattr(low, name, None)
        if function is None:
            problems.append(f"no {name}")
        elif len(getattr(function, "argtypes", None) or ()) not in arities:
            problems.append(f"{name} takes {len(function.argtypes or ())} arguments, not {arities[-1]}")
    for struct, fields in _LLAMA_FIELDS.items():
        have = {entry[0] for entry in getattr(getattr(low, struct, None), "_fields_", ())}
        problems += [f"no {struct}.{f}" for f in fields if f not in have]
    if problems:
        version = getattr(llama_cpp, "__version__", "of unknown version")
        raise LlamaCppError(f"llama-cpp-python {version} lacks the low-level API guardrail binds "
                            f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); {_HINT}")


_UNAVAILABLE = _load_llama_cpp()
if _UNAVAILABLE is None:
    _check_llama_cpp()

__all__ = [
    "Guard",
    "CaptureError",
    "ContextError",
    "ContextOverflowError",
    "DataError",
    "GuardrailError",
    "HeadError",
    "LlamaCppError",
    "ModelError",
    "__version__",
    "require_llama_cpp",
]


def __getattr__(name: str) -> object:
    """``from guardrail import Guard`` without loading the whole stack on ``import guardrail``."""
    if name == "Guard":
        from guardrail.runtime.guard import Guard

        return Guard
    raise AttributeError(f"module 'guardrail' has no attribute {name!r}")
