"""One generation at a time, a bounded queue in front of it, every guard call on one thread.

A Guard runs one generation at a time, so requests take turns: a FIFO lock gives the
turn; at most ``queue_size`` requests wait for it (one more is refused at once with a
429 and a Retry-After), none waits longer than ``queue_timeout_s`` (a 429 too), and a
request whose client leaves while it waits gives up its place and never runs. Every
call into the guard runs on one worker thread, one batch of events per call, so the
event loop stays free; the events pass through the transport's ``transform`` (the
stop-string hold-back) on that thread too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from guardrail.errors import ContextOverflowError
from guardrail.runtime.events import DoneEvent, Event, TokenEvent
from guardrail.runtime.shapes import Answer

from .errors import APIError

log = logging.getLogger("guardrail.server")


class ClientGone(Exception):
    """The client left before its request's turn came."""


class Runner:
    def __init__(self, *, queue_size: int = 16, queue_timeout_s: float = 60.0):
        self.queue_size, self.queue_timeout_s = queue_size, queue_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrail-generate")
        self._lock: asyncio.Lock | None = None  # made on the serving loop, on first use
        self.waiting = 0
        self.served = 0
        self.refused = 0
        self.left = 0
        self._mean_turn_s = 5.0  # moving average of how long a turn holds the guard
        self._turn_started = 0.0

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead times the mean turn."""
        return max(1, math.ceil(self._mean_turn_s * (self.waiting + 1)))

    def _refuse(self, message: str, code: str) -> APIError:
        self.refused += 1
        return APIError(429, message, type="rate_limit_error", code=code,
                        headers={"Retry-After": str(self.retry_after())})

    async def turn(self, gone: Callable[[], Awaitable[Any]] | None = None) -> Slot:
        """Wait for the guard (boundedly). Raises a 429 :class:`APIError`, or :class:`ClientGone`
        when ``gone()`` (the client's disconnect) finishes first."""
        lock = self.lock
        if lock.locked() and self.waiting >= self.queue_size:
            raise self._refuse(f"The server is busy: {self.waiting} requests are already waiting for the guard "
                               f"(queue size {self.queue_size}). Retry later.", "queue_full")
        self.waiting += 1
        acquire = asyncio.ensure_future(lock.acquire())
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            await asyncio.wait([f for f in (acquire, watch) if f is not None], timeout=self.queue_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled ourselves (shutdown): never leave the lock to an orphan
            self._abandon(acquire)
            raise
        finally:
            self.waiting -= 1
            if watch is not None:
                watch.cancel()
        left = watch is not None and watch.done() and not watch.cancelled() and watch.exception() is None
        if acquire.done() and not left:
            self._turn_started = time.monotonic()
            return Slot(self)
        self._abandon(acquire)
        if left:
            self.left += 1
            raise ClientGone()
        raise self._refuse(f"The request waited {self.queue_timeout_s:g} s for the guard without getting a turn "
                           f"(queue timeout). Retry later.", "queue_timeout")

    def _abandon(self, acquire: asyncio.Future[bool]) -> None:
        """Give up a place in the queue: a lock already granted is passed on."""
        if acquire.done():
            if not acquire.cancelled() and acquire.exception() is None:
                self.lock.release()
        else:
            acquire.cancel()  # Lock.acquire wakes the next waiter if it was about to get the lock

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, fn: Callable[[], Any]) -> None:
        try:
            self._executor.submit(fn)
        except RuntimeError:  # shut down: nothing left to clean
            pass

    def _end_turn(self) -> None:
        self.served += 1
        held = time.monotonic() - self._turn_started
        self._mean_turn_s = 0.8 * self._mean_turn_s + 0.2 * held
        self.lock.release()

    async def drain(self) -> None:
        """Let the worker finish what is queued (closes), off the loop, so the guard can be closed."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class Slot:
    """The turn of one request: guard calls through it run on the worker, in order."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._released = False
        self._events: Iterator[Event] | None = None
        self._transform: Callable[[Event], Event] | None = None
        self.answer = Answer()  # what the generation has yielded so far (for an end synthesised here)
        self._started = 0.0
        self._finished = False
        self.on_release: list[Callable[[Answer], None]] = []  # run on the worker once the generation is closed

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.runner.call(fn, *args)

    async def start(self, start: Callable[[], Iterator[Event]],
                    transform: Callable[[Event], Event] | None = None) -> None:
        """Open a generation (``start`` may raise: the request's template, options or length)."""
        self._transform = transform
        await self.call(self._open, start)

    def _open(self, start: Callable[[], Iterator[Event]]) -> None:
        self._started = time.perf_counter()
        self._events = iter(start())

    async def next_batch(self) -> list[Event]:
        """The events up to and including the next token or the end ([] once it has ended)."""
        return await self.call(self._next_batch)

    def _next_batch(self) -> list[Event]:
        out: list[Event] = []
        if self._finished or self._events is None:
            return out
        try:
            for event in self._events:
                if self._transform is not None:
                    event = self._transform(event)
                self.answer.add(event)
                out.append(event)
                if isinstance(event, DoneEvent):
                    self._finished = True
                    for _ in self._events:  # run the generator to its end: the guard is free before the last chunk
                        pass
                if isinstance(event, (TokenEvent, DoneEvent)):
                    return out
        except ContextOverflowError:
            if self.answer.query is None:
                raise  # the prompt itself does not fit: the request's fault
            out.append(self._length_end())  # the answer ran into the end of the context: keep it
        self._finished = True
        return out

    def _length_end(self) -> DoneEvent:
        """The end of an answer the guard stopped with an overflow instead of a ``length`` end."""
        a = self.answer
        risks = [c["risk"] for c in a.checks]
        finite = [r for r in risks if r is not None]
        elapsed = time.perf_counter() - self._started
        n = len(a.pieces)
        done = DoneEvent(finish_reason="length", text=a.written, completion_tokens=n,
                         prompt_tokens=a.query.prompt_tokens if a.query else 0, checks=len(a.checks),
                         intervened=bool(a.interventions), query_risk=risks[0] if risks else None,
                         max_risk=(max(finite) if len(finite) == len(risks) else 1.0) if risks else None,
                         elapsed_s=elapsed, tokens_per_s=n / elapsed if elapsed > 0 else 0.0, guard_s=0.0)
        self.answer.add(done)
        return done

    def _close(self) -> None:
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

    def release(self) -> None:
        """Stop the generation (if any is running) and give the guard to the next request.

        Idempotent and synchronous, so it is safe in ``finally`` under cancellation: the
        close is queued on the worker ahead of anyone else's calls."""
        if self._released:
            return
        self._released = True
        if self._events is not None or self.on_release:
            self.runner.submit(self._close)
        self.runner._end_turn()
