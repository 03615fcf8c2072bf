"""A test double for the server's guard: the real Guard's interface (``guardrail.serve.protocol.GuardLike``;
the type checker holds it to the Protocol, see ``_conforms`` at the end) over a deterministic toy "model", fast.

The answer is the prompt's words reversed, one per token, cycled until ``max_tokens``. Words in
the prompt steer it: "bomb" makes every check malicious (risk 0.9), "nan" gives non-finite risks,
"explode" fails after two tokens, "overflow" runs into the end of the context after two tokens
(as an overflow error with ``overflow_raises``, else as a ``length`` end, as the Guard does),
a last message from the system is a template error. ``n_ctx`` counts words. ``gate`` (open unless a
test clears it) is waited on before every answer token, so a test can hold a turn as long as it needs
without sleeping. It records
overlapping generations (there must never be any), generations closed early and the
arguments of the last call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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

    def __init__(self, delay: float = 0.002, n_ctx: int = 64, overflow_raises: bool = False, **options: Any):
        self.delay = delay
        self.n_ctx = n_ctx
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
        if messages and messages[-1]["role"] == "system":
            raise ContextError("the chat template refused the conversation: Conversation must end with a user "
                               "or assistant message")
        return self._run(" ".join(m["content"] for m in messages), dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            repeat_penalty=repeat_penalty, stop=stop, **guard))

    def complete(self, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 temperature: float = _SAMPLING.temperature, top_p: float = _SAMPLING.top_p,
                 top_k: int = _SAMPLING.top_k, min_p: float = _SAMPLING.min_p, seed: int | None = None,
                 repeat_penalty: float = _SAMPLING.repeat_penalty, stop: Sequence[str] | str | None = None,
                 **guard: Any) -> Iterator[Event]:
        return self._run(prompt, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      min_p=min_p, seed=seed, repeat_penalty=repeat_penalty, stop=stop, **guard))

    def _run(self, prompt: str, kwargs: dict[str, Any]) -> Iterator[Event]:
        self.last_kwargs = dict(kwargs)
        guard = {k: kwargs.pop(k) for k in list(kwargs) if k not in SAMPLING_KEYS}
        options = self.resolve_options(**guard)
        words = prompt.split()
        if len(words) + 1 > self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(words)} tokens; the context holds {self.n_ctx}")
        stop = kwargs["stop"]
        return self._events(words, prompt, kwargs["max_tokens"], [stop] if isinstance(stop, str) else stop, options)

    def _events(self, words: list[str], prompt: str, max_tokens: int, stop: Sequence[str] | None,
                options: ResolvedOptions) -> Iterator[Event]:
        with self._state:
            self.active += 1
            self.started += 1
            if self.active > 1:
                self.overlaps += 1
        finished = False
        try:
            t0 = time.perf_counter()
            yield QueryEvent(prompt_tokens=len(words), prefill="")
            risk = self._risk(prompt)
            malicious = not risk < options.threshold
            yield CheckEvent(index=0, risk=risk, malicious=malicious, window=[(0, len(words))], signal="window")
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
                    yield CheckEvent(index=i, risk=risk, malicious=malicious, window=[(0, len(words) + i)],
                                     signal="window")
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


def _conforms(fake: FakeGuard) -> GuardLike:
    """Never called: the type checker's proof that the double is what the server calls."""
    return fake
