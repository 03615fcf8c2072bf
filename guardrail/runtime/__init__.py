"""The guarded decoding loop, step by step: engine -> capture -> features -> probe/schedule -> policy -> guard."""

from guardrail import require_llama_cpp

require_llama_cpp()  # the engine binds llama.cpp: without it, one LlamaCppError line here, never a ctypes failure later
