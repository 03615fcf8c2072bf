"""What the server needs from a guard: the part of :class:`~guardrail.Guard` it calls.

The server is written against this Protocol, and the type checker (``make typecheck``)
holds both the real Guard and the tests' double to it: a renamed argument or a missing
method is a type error in CI, not a surprise in production. A small runtime test calls
each member the way the server does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
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


class BatchLike(Protocol):
    """``Guard.batch()``: several answers stepped together on one thread, one ``llama_decode`` a step.

    A request is what ``chat_request``/``text_request`` made; a job is opaque (``cancel`` takes it
    back). ``start`` and ``score`` return None when no slot or KV cells are free now."""

    @property
    def active(self) -> bool: ...

    def start(self, request: Any, sink: Callable[[Event], None],
              on_end: Callable[[BaseException | None], None] = ...) -> object | None: ...

    def score(self, request: Any,
              on_end: Callable[[VerdictLike | None, BaseException | None], None]) -> object | None: ...

    def step(self) -> None: ...

    def cancel(self, job: Any) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class GuardLike(Protocol):
    """One model under one head: one generation at a time (``chat``, ``complete``, ``score``), or
    ``n_parallel`` answers in slots of one shared KV cache (``batch``)."""

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_parallel(self) -> int: ...

    def resolve_options(self, **overrides: Any) -> ResolvedOptions: ...

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = ..., temperature: float = ...,
             top_p: float = ..., top_k: int = ..., min_p: float = ..., seed: int | None = ...,
             repeat_penalty: float = ..., stop: Sequence[str] | str | None = ...,
             **guard: Any) -> Iterator[Event]: ...

    def complete(self, prompt: str, *, max_tokens: int = ..., temperature: float = ..., top_p: float = ...,
                 top_k: int = ..., min_p: float = ..., seed: int | None = ..., repeat_penalty: float = ...,
                 stop: Sequence[str] | str | None = ..., **guard: Any) -> Iterator[Event]: ...

    def score(self, messages: Sequence[Mapping[str, str]], **guard: Any) -> VerdictLike: ...

    def chat_request(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = ..., temperature: float = ...,
                     top_p: float = ..., top_k: int = ..., min_p: float = ..., seed: int | None = ...,
                     repeat_penalty: float = ..., stop: Sequence[str] | str | None = ..., **guard: Any) -> object: ...

    def text_request(self, prompt: str, *, max_tokens: int = ..., temperature: float = ..., top_p: float = ...,
                     top_k: int = ..., min_p: float = ..., seed: int | None = ..., repeat_penalty: float = ...,
                     stop: Sequence[str] | str | None = ..., **guard: Any) -> object: ...

    def batch(self) -> BatchLike: ...

    def close(self) -> None: ...


if TYPE_CHECKING:  # the type checker's proof that the real Guard is what the server calls
    from guardrail.runtime.guard import Guard

    def _the_guard_conforms(guard: Guard) -> GuardLike:
        return guard
