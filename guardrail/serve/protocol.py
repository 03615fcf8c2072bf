"""What the server needs from a guard: the part of :class:`~guardrail.Guard` it calls.

The server is written against this Protocol, and the type checker (``make typecheck``)
holds both the real Guard and the tests' double to it: a renamed argument or a missing
method is a type error in CI, not a surprise in production. A small runtime test calls
each member the way the server does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from guardrail.runtime.events import Event
from guardrail.runtime.options import ResolvedOptions


class VerdictLike(Protocol):
    """``Guard.score``'s answer: the first check's probability and verdict."""

    @property
    def risk(self) -> float: ...

    @property
    def malicious(self) -> bool: ...

    @property
    def threshold(self) -> float: ...


@runtime_checkable
class GuardLike(Protocol):
    """One model under one head, running one generation at a time."""

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    def resolve_options(self, **overrides: Any) -> ResolvedOptions: ...

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = ..., temperature: float = ...,
             top_p: float = ..., top_k: int = ..., min_p: float = ..., seed: int | None = ...,
             repeat_penalty: float = ..., stop: Sequence[str] | str | None = ...,
             **guard: Any) -> Iterator[Event]: ...

    def complete(self, prompt: str, *, max_tokens: int = ..., temperature: float = ..., top_p: float = ...,
                 top_k: int = ..., min_p: float = ..., seed: int | None = ..., repeat_penalty: float = ...,
                 stop: Sequence[str] | str | None = ..., **guard: Any) -> Iterator[Event]: ...

    def score(self, messages: Sequence[Mapping[str, str]], **guard: Any) -> VerdictLike: ...

    def close(self) -> None: ...


if TYPE_CHECKING:  # the type checker's proof that the real Guard is what the server calls
    from guardrail.runtime.guard import Guard

    def _the_guard_conforms(guard: Guard) -> GuardLike:
        return guard
