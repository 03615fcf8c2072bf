"""The native capture (native/capture.c), a C extension: guardrail loads it with ctypes by its file,
so its Python surface is only the module itself (see capture._load_native)."""
