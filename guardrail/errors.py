"""guardrail's own exceptions.

Raised where a fault is found; turned into one-line messages only at the
surfaces (CLI, HTTP). Every message is written to be shown to a user as is.
"""

from __future__ import annotations


class GuardrailError(Exception):
    """Base class: anything guardrail refuses to do, with a user-facing message."""


class ArtifactError(GuardrailError):
    """A model or data file could not be fetched, extracted or verified."""


class ModelError(GuardrailError):
    """A model file is missing, not GGUF, truncated, or llama.cpp refused it."""


class ContextError(GuardrailError):
    """A llama.cpp context could not be created or a decode failed."""


class ContextOverflowError(ContextError):
    """The prompt (plus what must still be generated) does not fit the context."""


class CaptureError(GuardrailError):
    """The native capture cannot run against this llama.cpp build or model."""


class HeadError(GuardrailError):
    """A safety head file is missing, corrupt, or was trained for another model."""


class OptionsError(GuardrailError):
    """A guard option (policy, schedule, threshold, tau, window) has an invalid value."""


class DataError(GuardrailError):
    """Labelled data is malformed or a data source could not be read."""


class GuardBusyError(GuardrailError):
    """A Guard was asked for a second generation while one is still running (it runs one at a time)."""


class LlamaCppError(GuardrailError, ImportError):
    """llama-cpp-python is missing, fails to load, or lacks the low-level API guardrail binds."""
