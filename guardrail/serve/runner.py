"""Turns on the guard: a bounded queue in front of it, every guard call on one worker thread.

The guard serves ``n_parallel`` requests at once (``--parallel``; 1: one at a time). A request
leases a slot::

    async with ctx.runner.turn(request) as turn:   # waits: a 429, or ClientGone, if it cannot
        await turn.start(Ask(messages=..., kwargs=...))
        batch = await turn.next_batch()
        ...                                        # the turn is released however the block ends

The lease owns the whole sequence the endpoints used to spell out themselves: at most
``queue_size`` requests wait (one more is refused at once with a 429 and a Retry-After),
none waits longer than ``queue_timeout_s`` (a 429 too), a request whose client leaves while
it waits gives up its place and never runs (:class:`ClientGone`, answered 499), and the
release, which stops the generation, runs the end-of-answer hooks and gives the slot to
the next request. A streamed response takes the turn over (:meth:`Turn.hand_over`) and
releases it when the stream ends.

Every call into the guard runs on one worker thread, so the event loop stays free; the
events pass through the transport's ``transform`` (the stop-string hold-back) and the
metrics' observer on that thread too. With one slot the worker runs ``guard.chat`` one
answer at a time, one batch of events per call (as before slots existed). With several,
the worker is :class:`~.slots.Worker`: it steps one ``guard.batch()`` in which every
running answer advances by a token per ``llama_decode``, and each turn reads its own
answer's events (:class:`~.slots.Batched`); a turn released early cancels only its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from starlette.requests import Request

from guardrail.errors import ContextOverflowError
from guardrail.runtime.events import DoneEvent, Event, TokenEvent
from guardrail.runtime.shapes import Answer

from .errors import APIError
from .metrics import Metrics
from .protocol import GuardLike, VerdictLike
from .slots import Batched, Worker

log = logging.getLogger("guardrail.server")

T = TypeVar("T")


class ClientGone(Exception):
    """The client left: before its turn came (nothing ran), or while its answer was made (stopped).
    The app answers it with a bare 499 that nobody reads."""


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class Ask:
    """One answer asked of the guard: a chat's ``messages`` or a raw ``prompt``, and the call's keyword
    arguments (sampling and guard options)."""

    messages: Sequence[Mapping[str, str]] | None = None
    prompt: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def alone(self, guard: GuardLike) -> Iterator[Event]:
        """The answer's events, the guard running it on its own (one slot)."""
        if self.messages is not None:
            return guard.chat(self.messages, **self.kwargs)
        return guard.complete(self.prompt, **self.kwargs)

    def request(self, guard: GuardLike) -> object:
        """The answer as a request for the guard's batch (checked: template, options, length)."""
        if self.messages is not None:
            return guard.chat_request(self.messages, **self.kwargs)
        return guard.text_request(self.prompt, **self.kwargs)


class Runner:
    """Admits requests to the guard's ``n_parallel`` slots, behind a bounded queue."""

    def __init__(self, guard: GuardLike, *, queue_size: int = 16, queue_timeout_s: float = 60.0,
                 metrics: Metrics | None = None):
        self.guard = guard
        self.queue_size, self.queue_timeout_s = queue_size, queue_timeout_s
        self.parallel = max(1, int(guard.n_parallel))
        self.metrics = metrics
        self.worker = Worker(guard) if self.parallel > 1 else None
        # The one thread every guard call runs on, in order: the batch's worker, or a plain one for one slot.
        self._thread: Worker | ThreadPoolExecutor = self.worker or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="guardrail-generate")
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop, on first use
        self.holding = 0  # slots held by admitted requests
        self.waiting = 0
        self.served = 0
        self.refused = 0
        self.left = 0
        self._mean_turn_s = 5.0  # moving average of how long a turn holds a slot
        if metrics is not None:
            metrics.bind(waiting=lambda: self.waiting, busy=lambda: self.holding, slots=self.parallel,
                         kv_cells=int(guard.n_ctx))

    def turn(self, request: Request, rid: str = "") -> Turn:
        """A lease on a slot for ``request``: ``async with runner.turn(request) as turn``.

        Entering waits for a slot; it raises a 429 :class:`APIError` when the queue is
        full or the wait times out, and :class:`ClientGone` when the client leaves first."""
        return Turn(self, request, rid)

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.parallel)
        return self._slots

    @property
    def busy(self) -> bool:
        """Every slot is taken (a new request waits)."""
        return self.holding >= self.parallel

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead times the mean turn, over the slots."""
        return max(1, math.ceil(self._mean_turn_s * (self.waiting + 1) / self.parallel))

    def _refuse(self, message: str, code: str) -> APIError:
        self.refused += 1
        return APIError(429, message, type="rate_limit_error", code=code,
                        headers={"Retry-After": str(self.retry_after())})

    async def admit(self, gone: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Wait for a slot (boundedly); the caller then holds it until :meth:`finish`.

        Raises a 429 :class:`APIError`, or :class:`ClientGone` when ``gone()`` (the
        client's disconnect) finishes first."""
        slots = self.slots
        if slots.locked() and self.waiting >= self.queue_size:
            raise self._refuse(f"The server is busy: {self.waiting} requests are already waiting for the guard "
                               f"(queue size {self.queue_size}). Retry later.", "queue_full")
        self.waiting += 1
        acquire = asyncio.ensure_future(slots.acquire())
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            await asyncio.wait([f for f in (acquire, watch) if f is not None], timeout=self.queue_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled ourselves (shutdown): never leave a slot to an orphan
            self._abandon(acquire)
            raise
        finally:
            self.waiting -= 1
            if watch is not None:
                watch.cancel()
        left = watch is not None and watch.done() and not watch.cancelled() and watch.exception() is None
        if acquire.done() and not left:
            self.holding += 1
            return
        self._abandon(acquire)
        if left:
            self.left += 1
            raise ClientGone("the client left while waiting for its turn; nothing was run")
        raise self._refuse(f"The request waited {self.queue_timeout_s:g} s for the guard without getting a turn "
                           f"(queue timeout). Retry later.", "queue_timeout")

    def _abandon(self, acquire: asyncio.Future[Any]) -> None:
        """Give up a place in the queue: a slot already granted is passed on."""
        if acquire.done():
            if not acquire.cancelled() and acquire.exception() is None:
                self.slots.release()
        else:
            acquire.cancel()  # the semaphore wakes the next waiter if this one was about to get the slot

    def finish(self, held_s: float) -> None:
        """A turn admitted by :meth:`admit` is over: count it, give its slot to the next request."""
        self.served += 1
        self.holding -= 1
        self._mean_turn_s = 0.8 * self._mean_turn_s + 0.2 * held_s
        self.slots.release()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker thread (every guard call goes there, in order)."""
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    def submit(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn`` on the worker without waiting for it (a release's clean-up)."""
        try:
            self._thread.submit(fn)
        except RuntimeError:  # shut down: nothing left to clean
            pass

    async def drain(self) -> None:
        """Let the worker finish what is queued (closes), off the loop, so the guard can be closed."""
        await asyncio.to_thread(self._thread.shutdown)


class Turn:
    """One request's lease on a slot: its generation, what it has yielded, and its release.

    Made by :meth:`Runner.turn`; entered with ``async with`` (which waits for a slot) and
    released when the block ends, unless a streamed response took it over."""

    def __init__(self, runner: Runner, request: Request, rid: str = ""):
        self.runner, self.request, self.rid = runner, request, rid
        self.answer = Answer()  # what the generation has yielded so far
        self.on_release: list[Callable[[Answer], None]] = []  # run on the worker once the generation is closed
        self._observe = runner.metrics.watch(time.perf_counter()) if runner.metrics is not None else None
        self._events: Iterator[Event] | None = None
        self._batched: Batched | None = None
        self._transform: Callable[[Event], Event] | None = None
        self._admitted = False
        self._released = False
        self._handed_over = False
        self._held_since = 0.0
        self._started = 0.0
        self._finished = False

    # -- the lease ------------------------------------------------------------------------------

    async def __aenter__(self) -> Turn:
        try:
            await self.runner.admit(lambda: client_gone(self.request))
        except ClientGone:
            log.info("%s: the client left while waiting for its turn; nothing was run", self.rid or "a request")
            raise
        self._admitted = True
        self._held_since = time.monotonic()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._handed_over:
            self.release()

    def hand_over(self) -> Turn:
        """The response takes the turn over: leaving the ``async with`` block no longer releases it,
        the response must (a stream does, however it ends)."""
        self._handed_over = True
        return self

    def release(self) -> None:
        """Stop the generation (if any is running) and give the slot to the next request.

        Idempotent and synchronous, so it is safe in ``finally`` under cancellation: the
        close is queued on the worker ahead of anyone else's calls."""
        if self._released or not self._admitted:
            return
        self._released = True
        if self._events is not None or self._batched is not None or self.on_release:
            self.runner.submit(self._close)
        self.runner.finish(time.monotonic() - self._held_since)

    async def check_client(self) -> None:
        """Raise :class:`ClientGone` when the client has disconnected (the release then stops its work)."""
        if await self.request.is_disconnected():
            log.info("%s: the client went away; its work was stopped", self.rid or "a request")
            raise ClientGone("the client went away")

    # -- the guard's calls, on the worker ---------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.runner.call(fn, *args)

    async def start(self, ask: Ask, transform: Callable[[Event], Event] | None = None) -> None:
        """Open a generation (may raise: the request's template, options or length, or a KV budget
        that could never hold it)."""
        self._transform = transform
        if self.runner.worker is None:
            await self.call(self._open, ask)
            return
        self._batched = Batched(self.runner.worker, self.answer, self._seen)
        await self.call(self._open_batched, self._batched, ask)

    def _open(self, ask: Ask) -> None:
        self._started = time.perf_counter()
        self._events = iter(ask.alone(self.runner.guard))

    def _open_batched(self, batched: Batched, ask: Ask) -> None:
        batched.open(ask.request(self.runner.guard))

    def _seen(self, event: Event) -> Event:
        """An event as the transport sends it (the transform), counted by the metrics."""
        if self._transform is not None:
            event = self._transform(event)
        if self._observe is not None:
            self._observe(event)
        return event

    async def score(self, messages: Sequence[Mapping[str, str]]) -> VerdictLike:
        """``guard.score(messages)`` on the worker (beside the running answers when there are slots)."""
        guard = self.runner.guard
        if self.runner.worker is None:
            return await self.call(guard.score, messages)
        self._batched = batched = Batched(self.runner.worker, self.answer, self._seen)
        await self.call(lambda: batched.open_score(guard.chat_request(messages)))
        return await batched.verdict()

    async def next_batch(self) -> list[Event]:
        """The events up to and including the next token or the end ([] once it has ended)."""
        if self._batched is not None:
            return await self._batched.next_batch()
        return await self.call(self._next_batch)

    def _next_batch(self) -> list[Event]:
        out: list[Event] = []
        if self._finished or self._events is None:
            return out
        try:
            for event in self._events:
                event = self._seen(event)
                self.answer.add(event)
                out.append(event)
                if isinstance(event, DoneEvent):
                    self._finished = True
                    for _ in self._events:  # run the generator to its end: the guard is free before the last chunk
                        pass
                if isinstance(event, (TokenEvent, DoneEvent)):
                    return out
        except ContextOverflowError as error:
            out.append(self._seen(self.answer.end_on_overflow(error, time.perf_counter() - self._started)))
        self._finished = True
        return out

    def _close(self) -> None:
        if self._batched is not None:
            try:
                self._batched.cancel()
            except Exception:
                log.exception("cancelling an answer failed")
        close = getattr(self._events, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # a failing close must not take the worker with it
                log.exception("closing a generation failed")
        for hook in self.on_release:
            try:
                hook(self.answer)
            except Exception:
                log.exception("an end-of-answer hook failed")
