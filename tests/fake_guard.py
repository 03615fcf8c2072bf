"""A test double for the server's guard: the real Guard's interface (``guardrail.serve.protocol.GuardLike``;
the type checker holds it to the Protocol, see ``_conforms`` at the end) over a deterministic toy "model", fast.

The answer is the prompt's words reversed, one per token, cycled until ``max_tokens``. Words in
the prompt steer it: "bomb" makes every check malicious (risk 0.9), "nan" gives non-finite risks,
"explode" fails after two tokens, "drift" makes the answer stage act at its first check (after
four tokens), "overflow" runs into the end of the context after two tokens
(as an overflow error with ``overflow_raises``, else as a ``length`` end, as the Guard does),
a last message from the system is a template error. ``n_ctx`` counts words. ``gate`` (open unless a
test clears it) is waited on before every answer token, so a test can hold a turn as long as it needs
without sleeping. It records
overlapping generations (there must never be any), generations closed early and the
arguments of the last call.

``batch()`` runs up to ``n_parallel`` answers together, as ``Guard.batch()`` does: each ``step`` waits
on the gate and sleeps ``delay`` once (one "decode") and advances every running answer by a token.
Its KV budget is ``n_ctx`` words shared by all answers: an answer reserves its prompt and
``max_tokens`` (what fits of them); one that cannot fit beside the running answers waits (``start``
returns None), one longer than the whole context is refused. ``peak`` records the most answers
that ran together. A prompt with "crash" in it breaks the next step itself (not one answer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.errors import ContextError, ContextOverflowError
from guardrail.runtime.engine import DEFAULT_MAX_TOKENS, SamplingParams
from guardrail.runtime.events import CheckEvent, DoneEvent, Event, InterventionEvent, QueryEvent, TokenEvent
from guardrail.runtime.options import GuardOptions, ResolvedOptions
from guardrail.serve.protocol import GuardLike

REFUSAL = "Sorry, I cannot fulfill your request because it could cause harm."
HALT = "Sorry, I can't help with that."


@dataclass(frozen=True)
class FakeHead:
    threshold: float = 0.5
    tau: int = 3


@dataclass(frozen=True)
class FakeVerdict:
    risk: float
    malicious: bool
    threshold: float


_SAMPLING = SamplingParams()
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "stop")


def pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


class FakeGuard:
    model_name = "fake-guard"

    def __init__(self, delay: float = 0.002, n_ctx: int = 64, overflow_raises: bool = False, n_parallel: int = 1,
                 **options: Any):
        self.delay = delay
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.peak = 0
        self.overflow_raises = overflow_raises
        self.head = FakeHead()
        self.options = GuardOptions().updated(**options)
        self.gate = threading.Event()
        self.gate.set()
        self._state = threading.Lock()
        self.active = 0
        self.overlaps = 0
        self.closed_early = 0
        self.started = 0
        self.scored = 0
        self.last_kwargs: dict[str, Any] = {}

    def close(self) -> None:
        pass

    def resolve_options(self, **overrides: Any) -> ResolvedOptions:
        return self.options.updated(**overrides).resolve(self.head)

    def _risk(self, text: str) -> float:
        if "nan" in text.split():
            return float("nan")
        return 0.9 if "bomb" in text else 0.1

    def score(self, messages: Sequence[Mapping[str, str]], **guard: Any) -> FakeVerdict:
        threshold = self.resolve_options(**guard).threshold
        with self._state:
            self.scored += 1
        text = " ".join(m["content"] for m in messages)
        if len(text.split()) + 1 > self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(text.split())} tokens; the context holds {self.n_ctx}")
        risk = self._risk(text)
        return FakeVerdict(risk, risk >= threshold, threshold)

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float = _SAMPLING.temperature, top_p: float = _SAMPLING.top_p, top_k: int = _SAMPLING.top_k,
             min_p: float = _SAMPLING.min_p, seed: int | None = None, repeat_penalty: float = _SAMPLING.repeat_penalty,
             stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Event]:
        return self._run(self._conversation(messages), dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            repeat_penalty=repeat_penalty, stop=stop, **guard))

    def complete(self, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 temperature: float = _SAMPLING.temperature, top_p: float = _SAMPLING.top_p,
                 top_k: int = _SAMPLING.top_k, min_p: float = _SAMPLING.min_p, seed: int | None = None,
                 repeat_penalty: float = _SAMPLING.repeat_penalty, stop: Sequence[str] | str | None = None,
                 **guard: Any) -> Iterator[Event]:
        return self._run(prompt, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      min_p=min_p, seed=seed, repeat_penalty=repeat_penalty, stop=stop, **guard))

    @staticmethod
    def _conversation(messages: Sequence[Mapping[str, str]]) -> str:
        if messages and messages[-1]["role"] == "system":
            raise ContextError("the chat template refused the conversation: Conversation must end with a user "
                               "or assistant message")
        return " ".join(m["content"] for m in messages)

    def _request(self, prompt: str, kwargs: dict[str, Any]) -> FakeRequest:
        self.last_kwargs = dict(kwargs)
        guard = {k: kwargs.pop(k) for k in list(kwargs) if k not in SAMPLING_KEYS}
        stop = kwargs["stop"]
        return FakeRequest(prompt, kwargs["max_tokens"], [stop] if isinstance(stop, str) else stop,
                           self.resolve_options(**guard))

    def _run(self, prompt: str, kwargs: dict[str, Any]) -> Iterator[Event]:
        request = self._request(prompt, kwargs)
        if len(request.words) + 1 > self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(request.words)} tokens; the context holds {self.n_ctx}")
        return self._events(request)

    def chat_request(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                     temperature: float = _SAMPLING.temperature, top_p: float = _SAMPLING.top_p,
                     top_k: int = _SAMPLING.top_k, min_p: float = _SAMPLING.min_p, seed: int | None = None,
                     repeat_penalty: float = _SAMPLING.repeat_penalty, stop: Sequence[str] | str | None = None,
                     **guard: Any) -> FakeRequest:
        return self._request(self._conversation(messages), dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            repeat_penalty=repeat_penalty, stop=stop, **guard))

    def text_request(self, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                     temperature: float = _SAMPLING.temperature, top_p: float = _SAMPLING.top_p,
                     top_k: int = _SAMPLING.top_k, min_p: float = _SAMPLING.min_p, seed: int | None = None,
                     repeat_penalty: float = _SAMPLING.repeat_penalty, stop: Sequence[str] | str | None = None,
                     **guard: Any) -> FakeRequest:
        return self._request(prompt, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                          min_p=min_p, seed=seed, repeat_penalty=repeat_penalty, stop=stop, **guard))

    def batch(self) -> FakeBatch:
        return FakeBatch(self)

    def _events(self, request: FakeRequest, paced: bool = True) -> Iterator[Event]:
        words, prompt, max_tokens, stop, options = (request.words, request.prompt, request.max_tokens, request.stop,
                                                    request.options)
        with self._state:
            self.active += 1
            self.started += 1
            if paced and self.active > 1:
                self.overlaps += 1
        finished = False
        try:
            t0 = time.perf_counter()
            yield QueryEvent(prompt_tokens=len(words), prefill="")
            risk = self._risk(prompt)
            malicious = not risk < options.threshold
            yield CheckEvent(index=0, risk=risk, malicious=malicious, window=[(0, len(words))], signal="window",
                             stage="query")
            checks, reason, text, n = 1, "length", "", 0
            acted = malicious and options.policy != "monitor"
            if acted:
                yield InterventionEvent(index=0, action=options.policy, text=HALT if options.policy == "halt"
                                        else REFUSAL, reason="the query was judged malicious")
                for i, piece in enumerate([HALT] if options.policy == "halt" else pieces(REFUSAL)):
                    text += piece
                    n += 1
                    yield TokenEvent(index=i, token=-1, text=piece, risk=risk, forced=True)
                reason = options.policy
            plan = [" " + w[::-1] for w in reversed(words)] or [" ."]
            i = 0
            while not acted:
                if i >= max_tokens:
                    break
                if len(words) + i >= self.n_ctx or ("overflow" in words and i == 2):
                    if self.overflow_raises:
                        raise ContextOverflowError(f"the answer reached the end of the context ({self.n_ctx} tokens)")
                    break
                if paced:  # in a batch, the step waits once for every answer
                    self.gate.wait(timeout=30)
                    time.sleep(self.delay)
                if "explode" in words and i == 2:
                    raise RuntimeError("secret internals")
                piece = plan[i % len(plan)]
                text += piece
                n += 1
                yield TokenEvent(index=i, token=1000 + i, text=piece, risk=risk)
                i += 1
                if stop and any(s in text for s in stop):
                    text = text[:min(text.index(s) for s in stop if s in text)]
                    reason = "stop"
                    break
                if i % 4 == 0:
                    checks += 1
                    drift = "drift" in words  # the answer stage finds what the query check did not
                    yield CheckEvent(index=i, risk=0.9 if drift else risk, malicious=malicious or drift,
                                     window=[(0, len(words) + i)], signal="window", stage="answer")
                    if drift and options.policy != "monitor":
                        acted, reason, text, n = True, options.policy, text + " " + HALT, n + 1
                        yield InterventionEvent(index=i, action=options.policy, text=HALT, reason="the answer drifted")
                        yield TokenEvent(index=i, token=-1, text=" " + HALT, risk=0.9, forced=True)
            elapsed = time.perf_counter() - t0
            finished = True
            yield DoneEvent(finish_reason=reason, text=text, completion_tokens=n, prompt_tokens=len(words),
                            checks=checks, intervened=acted, query_risk=risk, max_risk=risk,
                            elapsed_s=elapsed, tokens_per_s=n / elapsed if elapsed else 0.0, guard_s=0.0)
        finally:
            with self._state:
                self.active -= 1
                if not finished:
                    self.closed_early += 1


@dataclass(frozen=True)
class FakeRequest:
    """What ``chat_request``/``text_request`` make: the prompt, checked options, sampling bounds."""

    prompt: str
    max_tokens: int
    stop: Sequence[str] | None
    options: ResolvedOptions

    @property
    def words(self) -> list[str]:
        return self.prompt.split()


@dataclass(eq=False)
class FakeJob:
    events: Iterator[Event]
    sink: Callable[[Event], None]
    on_end: Callable[[BaseException | None], None]
    cells: int
    done: bool = field(default=False)


class FakeBatch:
    """``Guard.batch()``'s double: up to ``n_parallel`` answers, a token each per step, ``n_ctx`` words shared."""

    def __init__(self, fake: FakeGuard):
        self.fake = fake
        self.jobs: list[FakeJob] = []
        self.steps = 0
        self.crash = False  # the next step raises (a prompt with "crash" in it asks for that)

    @property
    def active(self) -> bool:
        return bool(self.jobs)

    def _admit(self, request: FakeRequest, cells: int) -> bool:
        n_ctx = self.fake.n_ctx
        if len(request.words) + 1 > n_ctx:
            raise ContextOverflowError(f"the prompt is {len(request.words)} tokens; the context holds {n_ctx}")
        if len(self.jobs) >= self.fake.n_parallel or sum(j.cells for j in self.jobs) + cells > n_ctx:
            return False  # wait: a running answer will give its slot or cells back
        return True

    def start(self, request: FakeRequest, sink: Callable[[Event], None],
              on_end: Callable[[BaseException | None], None] = lambda exc: None) -> FakeJob | None:
        cells = len(request.words) + min(request.max_tokens, self.fake.n_ctx - len(request.words))
        if not self._admit(request, cells):
            return None
        self.crash = self.crash or "crash" in request.words
        return self._add(FakeJob(self.fake._events(request, paced=False), sink, on_end, cells))

    def score(self, request: FakeRequest,
              on_end: Callable[[FakeVerdict | None, BaseException | None], None]) -> FakeJob | None:
        if not self._admit(request, len(request.words) + 1):
            return None
        verdict: list[FakeVerdict] = []

        def scored() -> Iterator[Event]:
            verdict.append(self.fake.score([{"role": "user", "content": request.prompt}]))
            yield from ()
        return self._add(FakeJob(scored(), lambda e: None, lambda exc: on_end(verdict[0] if verdict else None, exc),
                                 len(request.words) + 1))

    def _add(self, job: FakeJob) -> FakeJob:
        self.jobs.append(job)
        self.fake.peak = max(self.fake.peak, len(self.jobs))
        return job

    def step(self) -> None:
        """One "decode": every running answer advances to its next sampled token (or its end)."""
        if not self.jobs:
            return
        self.fake.gate.wait(timeout=30)
        time.sleep(self.fake.delay)
        self.steps += 1
        if self.crash:
            self.crash = False
            raise RuntimeError("secret internals of a broken batch")
        for job in list(self.jobs):
            try:
                for event in job.events:
                    job.sink(event)
                    if isinstance(event, TokenEvent) and not event.forced:
                        break
                else:
                    self._end(job, None)
            except Exception as exc:
                self._end(job, exc)

    def _end(self, job: FakeJob, exc: BaseException | None) -> None:
        job.done = True
        self.jobs.remove(job)
        job.on_end(exc)

    def cancel(self, job: FakeJob) -> None:
        if job.done:
            return
        close = getattr(job.events, "close", None)
        if close is not None:
            close()
        self._end(job, None)

    def close(self) -> None:
        for job in list(self.jobs):
            self.cancel(job)


def _conforms(fake: FakeGuard) -> GuardLike:
    """Never called: the type checker's proof that the double is what the server calls."""
    return fake
