"""Several answers at once (``--parallel N``): one thread owns the guard and steps one batch.

The :class:`Worker` thread opens ``guard.batch()`` and runs a loop: take the commands the
event loop queued (start an answer, score a text, cancel a job), retry the answers that wait
for KV cells, then ``step`` the batch, one ``llama_decode`` that advances every running
answer by a token. With nothing running it sleeps on its queue. Every guard call goes through
this one thread, in order, so a cancel queued before a start always runs first.

A :class:`Batched` is one turn's answer inside that batch: its events are made on the worker
(passed through the turn's transform and observer there) and handed to the turn on the event
loop through a queue of its own, so each request reads only its own run; cancelling it (its
client left) stops that run and frees its slot while the others go on. A slot keeps its
conversation's KV cells when its answer ends: the guard's pool gives the next request the
free slot with the longest cached prefix.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from guardrail.runtime.events import DoneEvent, Event, TokenEvent
from guardrail.runtime.shapes import Answer

from .protocol import BatchLike, GuardLike, VerdictLike

log = logging.getLogger("guardrail.server")

T = TypeVar("T")
Attempt = Callable[[BatchLike], bool]  # start a job: True once it took a slot (or failed for good)


class Worker:
    """The thread that owns the guard while it serves several answers at once."""

    def __init__(self, guard: GuardLike):
        self.guard = guard
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._batch: BatchLike | None = None
        self._waiting: list[Attempt] = []  # answers admitted but waiting for KV cells, oldest first
        self.live: set[Batched] = set()  # jobs started or waiting, told when the batch itself breaks
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._start_lock = threading.Lock()

    # -- from the event loop ------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the worker, between two steps; its result or error comes back in the future."""
        future: Future[T] = Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller's to handle (a request's fault, mostly)
                future.set_exception(exc)
        with self._start_lock:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="guardrail-batch", daemon=True)
                self._thread.start()
        self._commands.put(command)
        return future

    def shutdown(self) -> None:
        """Run what is queued (the last cancels), close the batch, end the thread (blocks: call off the loop;
        named as ThreadPoolExecutor's, which the one-slot server runs its calls on instead)."""
        with self._start_lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._commands.put(None)
            thread.join()

    # -- on the worker ------------------------------------------------------------------------

    @property
    def batch(self) -> BatchLike:
        if self._batch is None:
            self._batch = self.guard.batch()
        return self._batch

    def wait_for_room(self, attempt: Attempt) -> None:
        self._waiting.append(attempt)

    def forget(self, attempt: Attempt) -> None:
        if attempt in self._waiting:
            self._waiting.remove(attempt)

    def cancel(self, job: object) -> None:
        """Stop one job of the batch (it releases its slot); the others go on."""
        if self._batch is not None:
            self._batch.cancel(job)

    def _busy(self) -> bool:
        return bool(self._waiting) or (self._batch is not None and self._batch.active)

    def _take(self, block: bool) -> list[Callable[[], None] | None]:
        try:
            taken = [self._commands.get(block=block)]
        except queue.Empty:
            return []
        while True:
            try:
                taken.append(self._commands.get_nowait())
            except queue.Empty:
                return taken

    def _loop(self) -> None:
        try:
            while True:
                for command in self._take(block=not self._busy()):
                    if command is None:
                        return
                    command()
                self._retry()
                if self._batch is not None and self._batch.active:
                    self._step()
        finally:
            if self._batch is not None:
                self._batch.close()

    def _retry(self) -> None:
        for attempt in list(self._waiting):
            if attempt(self.batch):
                self._waiting.remove(attempt)

    def _step(self) -> None:
        assert self._batch is not None
        try:
            self._batch.step()
        except Exception as exc:  # the batch itself broke: every answer ends with the error (a 500 each);
            log.exception("a batch step failed; its answers were ended")  # the next request opens a new batch
            batch, self._batch = self._batch, None
            for job in list(self.live):
                job.fail(exc)
            self._waiting.clear()
            batch.close()


@dataclass(frozen=True)
class _End:
    """A job's end: its error, or a score's verdict."""

    error: BaseException | None
    verdict: VerdictLike | None = None


class Batched:
    """One turn's job inside the worker's batch: an answer, or a score."""

    def __init__(self, worker: Worker, answer: Answer, on_event: Callable[[Event], Event]):
        self.worker = worker
        self.answer = answer
        self.on_event = on_event  # the turn's transform and observer, on the worker
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[Event | _End] = asyncio.Queue()
        self.job: object | None = None
        self.attempt: Attempt | None = None
        self.finished = False
        self.started = time.perf_counter()

    def _post(self, item: Event | _End) -> None:
        try:
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading
            pass

    def _sink(self, event: Event) -> None:
        event = self.on_event(event)
        self.answer.add(event)
        self._post(event)

    def _ended(self, error: BaseException | None, verdict: VerdictLike | None = None) -> None:
        self.worker.live.discard(self)
        self._post(_End(error, verdict))

    def fail(self, error: BaseException) -> None:
        """End the job with ``error`` (on the worker, when the batch broke)."""
        self._ended(error)

    # -- on the worker ------------------------------------------------------------------------

    def open(self, request: object) -> None:
        """Start the answer: now, or once KV cells are free. Raises ContextOverflowError for a
        request the KV budget could never hold."""
        self._open(lambda batch: batch.start(request, self._sink, self._ended))

    def open_score(self, request: object) -> None:
        """Score a conversation (the query check alone) beside the running answers."""
        self._open(lambda batch: batch.score(request, lambda verdict, error: self._ended(error, verdict)))

    def _open(self, start: Callable[[BatchLike], object | None]) -> None:
        def attempt(batch: BatchLike) -> bool:
            try:
                self.job = start(batch)
            except Exception as exc:
                if self.attempt is None:
                    raise  # the first attempt: the request's fault, answered before any event
                self._ended(exc)
                return True
            return self.job is not None
        self.worker.live.add(self)
        try:
            started = attempt(self.worker.batch)
        except Exception:
            self.worker.live.discard(self)
            raise
        if not started:
            self.attempt = attempt
            self.worker.wait_for_room(attempt)

    def cancel(self) -> None:
        """Stop the job (its client left); the others go on."""
        self.worker.live.discard(self)
        if self.attempt is not None:
            self.worker.forget(self.attempt)
        if self.job is not None:
            self.worker.cancel(self.job)

    # -- on the event loop --------------------------------------------------------------------

    async def next_batch(self) -> list[Event]:
        """The events up to and including the next token or the end ([] once it has ended)."""
        out: list[Event] = []
        while not self.finished:
            item = await self.inbox.get()
            if isinstance(item, _End):
                self.finished = True
                if item.error is not None:
                    out.append(self.on_event(self.answer.end_on_overflow(item.error,
                                                                         time.perf_counter() - self.started)))
                break
            out.append(item)
            if isinstance(item, DoneEvent):
                self.finished = True
            if isinstance(item, (TokenEvent, DoneEvent)):
                break
        return out

    async def verdict(self) -> VerdictLike:
        """A score's verdict, once its job has run."""
        item = await self.inbox.get()
        assert isinstance(item, _End)
        if item.error is not None:
            raise item.error
        if item.verdict is None:
            raise RuntimeError("the score was stopped before it finished")
        return item.verdict
