"""What the server needs from a guard: the part of :class:`~guardrail.Guard` it calls.

The server is written against this Protocol, and so is the test double its
tests serve; a test checks that both the real Guard and the double satisfy it,
so the double cannot drift from the Guard it stands in for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from guardrail.runtime.events import Event


class HeadLike(Protocol):
    """The head's defaults a client's options are compared against."""

    threshold: float
    tau: int


class OptionsLike(Protocol):
    """The runtime's guard options: ``updated`` is its validation (raises OptionsError)."""

    def updated(self, **changes: Any) -> Any: ...


class VerdictLike(Protocol):
    """``Guard.score``'s answer: the first check's probability and verdict."""

    risk: float
    malicious: bool
    threshold: float


@runtime_checkable
class GuardLike(Protocol):
    """One model under one head, running one generation at a time."""

    head: HeadLike
    options: OptionsLike

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = ..., temperature: float = ...,
             top_p: float = ..., top_k: int = ..., min_p: float = ..., seed: int | None = ...,
             repeat_penalty: float = ..., stop: Sequence[str] | str | None = ...,
             **guard: Any) -> Iterator[Event]: ...

    def complete(self, prompt: str, *, max_tokens: int = ..., temperature: float = ..., top_p: float = ...,
                 top_k: int = ..., min_p: float = ..., seed: int | None = ..., repeat_penalty: float = ...,
                 stop: Sequence[str] | str | None = ..., **guard: Any) -> Iterator[Event]: ...

    def score(self, messages: Sequence[Mapping[str, str]], **guard: Any) -> VerdictLike: ...

    def close(self) -> None: ...
