"""guardrail: explicit, cheap, visible safety signals inside llama.cpp's decoding loop.

The data flows one way: engine (model, context) -> capture (hidden states) ->
head (a probability) -> probe/schedule (when and what to re-read) -> policy
(intervene or not) -> guard (the public API) -> surfaces (CLI, UI, server).
"""

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

__version__ = "0.1.0"

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


def _check_llama_cpp() -> None:
    """Fail at import, in one line, when llama-cpp-python cannot serve guardrail (never later, in ctypes)."""
    hint = f"pip install 'llama-cpp-python{LLAMA_CPP_SUPPORTED}'"
    try:
        # llama.cpp is loaded before numpy on purpose: on some Python builds the
        # reverse order crashed model loading (see README, "Import order").
        import llama_cpp
        import llama_cpp.llama_cpp as low
    except ImportError as exc:
        raise LlamaCppError(f"guardrail needs llama-cpp-python{LLAMA_CPP_SUPPORTED}, which is not installed "
                            f"({exc}); {hint}") from None
    except Exception as exc:  # its native library failed to load (RuntimeError, OSError)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise LlamaCppError(f"llama-cpp-python is installed but its native library does not load ({reason}); "
                            f"reinstall it: {hint}") from None
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
                            f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); {hint}")


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
]


def __getattr__(name: str):
    """``from guardrail import Guard`` without loading the whole stack on ``import guardrail``."""
    if name == "Guard":
        from guardrail.runtime.guard import Guard

        return Guard
    raise AttributeError(f"module 'guardrail' has no attribute {name!r}")
