"""guardrail's version, in a module of its own: the numpy-only parts (head, data) read it
without importing anything that loads llama.cpp. pyproject.toml says the same (a test holds it)."""

__version__ = "0.1.0"
