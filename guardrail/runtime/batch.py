"""Several answers decoded together: one ``llama_decode`` per step for every run that needs one.

A run (one guarded answer, a score, a training rollout) is a generator: it yields
the events its consumer sees and, whenever it needs the model, a :class:`Decode`
of its own batch entries (its conversation's next token, its probe's tokens, a
chunk of its prompt); what it gets back is its share of that decode, a
:class:`Decoded`. The run never calls llama.cpp itself, so the same run steps
alone (``Guard.chat``: each Decode decoded at once) or beside others
(:class:`Batcher`: the Decodes of every run packed into one batch).

Packing follows continuous batching: the running answers' entries always go in
(a token each), and a prompt fills what is left, in chunks of at most
``prompt_chunk`` tokens while answers are running, so a long new prompt never
stalls the answers already streaming.

At most one request that gives a sequence several tokens (a prompt chunk, a
multi-token probe, a refusal opener) goes into a batch. With llama.cpp's flash
attention (its default on every backend here) that keeps each answer's numbers
exactly what they would be alone: a token's logits do not change with where its
cells sit or with single tokens of other sequences beside it, nor with how a
prompt is chunked, but two sequences of several tokens each in one batch move
each other's logits by up to about one unit (measured on the CPU backend). So a
batched greedy answer is the single-stream answer, token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .capture import BatchStates
from .engine import Context, Entry


@dataclass(frozen=True)
class Decode:
    """Entries a run needs decoded. ``split``: a prompt, of which a leading part may be decoded
    now and the rest in later batches (only a prompt's last entry asks for logits)."""

    entries: Sequence[Entry]
    split: bool = False

    @property
    def several(self) -> bool:
        """Whether some sequence gets more than one token (see the module's note on batching)."""
        return len(self.entries) > len({e.seqs for e in self.entries})


@dataclass(frozen=True)
class Decoded:
    """A run's share of one ``llama_decode``: how many of its entries went in, where they sit in
    the batch (for logits), their captured states (rows re-indexed from 0), and the decode's cost."""

    taken: int
    offset: int
    states: BatchStates | None
    seconds: float = 0.0
    batch_size: int = 1

    def index(self, i: int) -> int:
        """The batch index of the run's ``i``-th entry (what ``llama_sampler_sample`` takes)."""
        return self.offset + i

    def share_of(self, n: int) -> float:
        """Seconds of the decode attributable to ``n`` of the batch's entries."""
        return self.seconds * n / max(1, self.batch_size)


Run = Generator[Any, Decoded, Any]


def share(states: BatchStates | None, offset: int, n: int, batch_size: int) -> BatchStates | None:
    """The captured rows of batch entries [offset, offset + n), indexed from 0 (views, not copies,
    for hooks that hold every token)."""
    if states is None:
        return None
    rows: dict[str, np.ndarray] = {}
    index: dict[str, np.ndarray] = {}
    for name, where in states.token_index.items():
        if len(where) == batch_size:  # every token has a row, in batch order
            rows[name] = states.rows[name][offset:offset + n]
            index[name] = np.arange(n)
        else:  # output rows only (the last layer): keep this run's
            mine = (where >= offset) & (where < offset + n)
            rows[name] = states.rows[name][mine]
            index[name] = where[mine] - offset
    return BatchStates(rows, index)


def pack(requests: Sequence[Decode], n_batch: int, prompt_chunk: int) -> list[int]:
    """How many entries of each request go into the next batch (0: it waits for a later one).

    Requests of one token per sequence (answer tokens, a one-token probe) go first, in
    order; then the first request that gives a sequence several tokens and fits: whole,
    or for a prompt, at most ``prompt_chunk`` tokens while answers are in the batch."""
    takes = [0] * len(requests)
    room = n_batch
    for i, request in enumerate(requests):
        if not request.several and len(request.entries) <= room:
            takes[i] = len(request.entries)
            room -= takes[i]
    limit = prompt_chunk if any(takes) else n_batch
    for i, request in enumerate(requests):
        if not request.several or room <= 0:
            continue
        if request.split:
            takes[i] = min(len(request.entries), room, limit)
        elif len(request.entries) <= room:
            takes[i] = len(request.entries)
        else:
            continue
        break
    return takes


def decode_alone(context: Context, request: Decode) -> Decoded:
    """A run's Decode with nothing beside it (in ``n_batch`` chunks if it is a long prompt)."""
    entries = list(request.entries[:context.n_batch])
    started = time.perf_counter()
    result = context.decode(entries)
    return Decoded(len(entries), 0, result.states, time.perf_counter() - started, len(entries))


def drive_alone(context: Context, run: Run) -> Generator[Any, None, Any]:
    """Step one run on its own, passing its events through as soon as they are made."""
    value: Decoded | None = None
    while True:
        try:
            item = next(run) if value is None else run.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(item, Decode):
            try:
                value = decode_alone(context, item)
            except BaseException as exc:
                run.throw(exc)  # the run cleans up its cache and re-raises
                raise
        else:
            value = None
            yield item


@dataclass(eq=False)
class Job:
    """One run inside a :class:`Batcher`: where its events go and what it waits for."""

    run: Run
    sink: Callable[[Any], None]
    on_end: Callable[[BaseException | None], None]
    pending: Decode | None = None
    value: Decoded | None = None
    done: bool = field(default=False)


class Batcher:
    """Steps several runs together: each step advances every run to its next Decode, then
    decodes all of them in one ``llama_decode``."""

    def __init__(self, context: Context, *, prompt_chunk: int = 64):
        self.context = context
        self.prompt_chunk = max(1, prompt_chunk)
        self.jobs: list[Job] = []
        self.steps = 0

    def add(self, run: Run, sink: Callable[[Any], None],
            on_end: Callable[[BaseException | None], None] = lambda exc: None) -> Job:
        job = Job(run, sink, on_end)
        self.jobs.append(job)
        return job

    @property
    def active(self) -> bool:
        return bool(self.jobs)

    def cancel(self, job: Job) -> None:
        """Stop a run (its client left): it releases what it holds; the others go on."""
        if job.done:
            return
        self._end(job, None, close=True)

    def step(self) -> None:
        """Advance every run to its next Decode, then decode them all at once."""
        for job in list(self.jobs):
            if job.pending is None:
                self._advance(job)
        waiting = [job for job in self.jobs if job.pending is not None]
        if not waiting:
            return
        takes = pack([job.pending for job in waiting], self.context.n_batch, self.prompt_chunk)  # type: ignore[misc]
        entries: list[Entry] = []
        offsets: list[int] = []
        for job, take in zip(waiting, takes):
            offsets.append(len(entries))
            entries.extend(job.pending.entries[:take])  # type: ignore[union-attr]
        started = time.perf_counter()
        try:
            result = self.context.decode(entries)
        except Exception as exc:  # every run in the batch loses its cache; the rest go on
            for job, take in zip(waiting, takes):
                if take:
                    self._fail(job, exc)
            return
        seconds = time.perf_counter() - started
        self.steps += 1
        for job, take, offset in zip(waiting, takes, offsets):
            if take:
                job.value = Decoded(take, offset, share(result.states, offset, take, len(entries)), seconds,
                                    len(entries))
                job.pending = None

    def _advance(self, job: Job) -> None:
        value, job.value = job.value, None
        try:
            while True:
                item = next(job.run) if value is None else job.run.send(value)
                if isinstance(item, Decode):
                    job.pending = item
                    return
                value = None
                job.sink(item)
        except StopIteration:
            self._end(job, None)
        except Exception as exc:
            self._end(job, exc)

    def _fail(self, job: Job, exc: BaseException) -> None:
        try:
            job.run.throw(exc)
        except StopIteration:
            pass
        except Exception as raised:
            exc = raised
        self._end(job, exc)

    def _end(self, job: Job, exc: BaseException | None, close: bool = False) -> None:
        job.done = True
        if job in self.jobs:
            self.jobs.remove(job)
        if close:
            job.run.close()
        job.on_end(exc)
