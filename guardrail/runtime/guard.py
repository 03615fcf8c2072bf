"""Guard: the public API. Runs guarded generation and yields events.

One decoding loop, as named steps (``_Run``):
1. **start** — make the conversation cache hold the prompt, decoding only what the
   previous call did not leave there;
2. **plan** — sample the next answer token and lay out the batch: the answer token
   is batch entry 0; when a check with a [CLS] probe is due, the probe's tokens
   follow it and the probe's last token is the batch's last entry;
3. **decode** — one ``llama_decode`` of that batch, states appended to the history;
4. **read the check** — the head's probability over the window the rules choose
   (no decode at all for a head without a probe block);
5. **apply the policy** — continue, or act: the token decoded with a malicious
   check is held back, removed from the cache unseen, and the guard writes the end
   of the answer (a refusal, or a halt);
6. **emit** — the token, with its own token-signal risk.

A Guard owns one model context, runs one generation at a time (a second one
raises :class:`GuardBusyError`) and keeps the KV cache and captured states
between calls, so a chat's next turn decodes only what is new.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import llama_cpp

from guardrail.artifacts.heads import find_head
from guardrail.artifacts.models import resolve_model
from guardrail.errors import GuardBusyError, HeadError, OptionsError
from guardrail.head import Head, fingerprint_file, load_head

from .cache import SEQ, ConversationCache
from .chat import ChatFormat, Message, PromptTokens
from .engine import Context, Detokenizer, Entry, Model, Sampler, SamplingParams, default_n_ctx
from .events import CheckEvent, DoneEvent, Event, InterventionEvent, QueryEvent, TokenEvent
from .features import HeadReader, StateHistory, Window, hooks_of, probe_tokens, split_conversation
from .options import GuardOptions, ResolvedOptions
from .policy import FIXED_REASON, MAX_REASON_TOKENS, Action, Policy, acceptable_reason, halt_text, lead_in
from .probe import Probe, WindowState, choose_window, runs, update_window_state

PROBE_SEQ = 1


@dataclass(frozen=True)
class Verdict:
    """The first check's outcome for a conversation: what ``Guard.score`` returns."""

    risk: float
    malicious: bool
    threshold: float


@dataclass(frozen=True)
class _Request:
    """One call: the prompt and where its parts are, how to sample, how to decide."""

    prompt: PromptTokens
    query: list[int]          # content positions of the conversation before the answer
    prefill: list[int]        # positions of a caller's prefill (a final assistant message)
    prefill_text: str
    sampling: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    options: GuardOptions


class Guard:
    """Guarded generation on a llama.cpp model.

    ``model``: a GGUF path, a known model name, an existing ``llama_cpp.Llama``
    (its weights are shared, not loaded twice), or None for the default model.
    ``head``: a head file; None finds the head for the model (shipped, or trained
    with ``guardrail train --model``). ``n_ctx``: the context in tokens; None
    takes the model's trained context where memory allows (see
    ``engine.default_n_ctx``). Options: ``policy`` (refuse | halt | monitor),
    ``schedule`` (auto | every | annealing | first | periodic:K), ``threshold``,
    ``tau``, ``opener``, ``reason`` (fixed | model), ``r1/r2/r3``.
    """

    def __init__(self, model: str | os.PathLike[str] | llama_cpp.Llama | None = None,
                 head: str | os.PathLike[str] | None = None, *, n_ctx: int | None = None,
                 allow_head_mismatch: bool = False, template: str | None = None,
                 n_threads: int | None = None, **options: Any):
        self.options = GuardOptions().updated(**options)
        if isinstance(model, llama_cpp.Llama):
            self.model = Model.from_llama(model)
        else:
            self.model = Model(resolve_model(None if model is None else str(model)))
        info = self.model.info
        expect = fingerprint_file(self.model.path, info.architecture, info.n_embd, info.n_layer)
        self.head: Head = load_head(head if head is not None else find_head(expect.sha256, self.model.path.name),
                                    expect=expect, allow_mismatch=allow_head_mismatch)
        self.token_head: Head | None = self.head.token_head
        heads = [self.head] + ([self.token_head] if self.token_head else [])
        self.hooks = hooks_of([b.name for h in heads for b in h.blocks])
        if any(int(h.split("-")[1]) >= info.n_layer - 1 for h in self.hooks):
            raise HeadError(f"the head reads the last layer of {info.n_layer}, which llama.cpp computes "
                            "for output tokens only; it cannot be used while decoding")
        self.format = ChatFormat(self.model, template)
        self.context = Context(self.model, n_ctx=n_ctx or default_n_ctx(self.model), n_batch=512,
                               n_seq_max=2, hooks=self.hooks, n_threads=n_threads)
        history = StateHistory(self.hooks, info.n_embd, vectors=not all(HeadReader.is_linear(h) for h in heads))
        self._cache = ConversationCache(self.context, history)
        text_of = self._window_text
        self._check = HeadReader(self.head, history, text_of)
        self._token_signal = HeadReader(self.token_head, history, text_of) if self.token_head else None
        if self._token_signal is not None and self._token_signal.needs_probe:
            raise HeadError("the token head cannot read a probe: it scores every token's own state")
        self._probe = Probe(self.context, probe_tokens(self.model, self.head.probe_text) or [self.model.bos],
                            seq=PROBE_SEQ, src=SEQ)
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """The known model's name, else the file's (the server's model id, the UI's title)."""
        return self.model.info.name

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    @property
    def checks_are_free(self) -> bool:
        """True when a check decodes nothing (the head has no [CLS] probe block)."""
        return not self._check.needs_probe

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def resolve_options(self, **overrides: Any) -> ResolvedOptions:
        """This Guard's options with a call's ``overrides``, the head's threshold and tau filled in:
        what such a call runs under, resolved once (one OptionsError line for a bad value)."""
        return self.options.updated(**overrides).resolve(self.head)

    def reset(self) -> None:
        """Forget the cached conversation: the next call decodes its whole prompt."""
        with self._turn():
            self._cache.clear()

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public calls ---------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, str] | Message], *, max_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
             seed: int | None = None, repeat_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
             **guard: Any) -> Iterator[Event]:
        """Events of one guarded answer to a conversation. A final assistant message is a prefill."""
        request = self._chat_request(messages, guard)
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        return _Run(self, _with(request, sampling, max_tokens, stop)).events()

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                 top_k: int = 40, min_p: float = 0.05, seed: int | None = None, repeat_penalty: float = 1.0,
                 stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Event]:
        """Events of a guarded continuation of raw text (no chat template)."""
        tokens = PromptTokens()
        if self.model.info.add_bos:
            tokens.extend([self.model.bos], -1)
        tokens.extend(self.model.tokenize(prompt, special=False), 0)
        query = [i for i, m in enumerate(tokens.message) if m >= 0]
        request = _Request(tokens, query, [], "", SamplingParams(), 0, (), self.options.updated(**guard))
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        return _Run(self, _with(request, sampling, max_tokens, stop)).events()

    def score(self, messages: Sequence[Mapping[str, str] | Message], **guard: Any) -> Verdict:
        """The first check's probability and verdict for a conversation, without generating."""
        request = self._chat_request(messages, guard)
        with self._turn():
            run = _Run(self, request)
            run.start()
            risk, malicious, _ = run.first_check_alone()
        return Verdict(risk, malicious, run.threshold)

    def create_chat_completion(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 256,
                               temperature: float = 0.0, top_p: float = 0.95, seed: int | None = None,
                               stop: Sequence[str] | str | None = None, stream: bool = False,
                               guard: Mapping[str, Any] | None = None, **sampling: Any) -> Any:
        """A drop-in for ``Llama.create_chat_completion``: same shapes, plus a ``guardrail`` object."""
        from .shapes import chat_chunks, chat_response

        events = self.chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           stop=stop, **sampling, **dict(guard or {}))
        return chat_chunks(events, self.model_name) if stream else chat_response(events, self.model_name)

    def create_completion(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                          top_p: float = 0.95, seed: int | None = None, stop: Sequence[str] | str | None = None,
                          stream: bool = False, guard: Mapping[str, Any] | None = None, **sampling: Any) -> Any:
        """A drop-in for ``Llama.create_completion`` (raw text), with a ``guardrail`` object."""
        from .shapes import completion_chunks, completion_response

        events = self.complete(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               stop=stop, **sampling, **dict(guard or {}))
        return completion_chunks(events, self.model_name) if stream else completion_response(events, self.model_name)

    # -- helpers of the calls -------------------------------------------------------------

    def _chat_request(self, messages: Sequence[Mapping[str, str] | Message], guard: Mapping[str, Any]) -> _Request:
        msgs = [Message.coerce(m) for m in messages]
        options = self.options.updated(**guard)
        prompt = self.format.tokens(msgs)
        as_dicts = [{"role": m.role, "content": m.content} for m in msgs]
        query, prefill = split_conversation(prompt, as_dicts)
        prefill_text = msgs[-1].content if msgs and msgs[-1].role == "assistant" else ""
        return _Request(prompt, query, prefill, prefill_text, SamplingParams(), 0, (), options)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The busy flag: one generation (or score) at a time on this Guard's context."""
        if not self._lock.acquire(blocking=False):
            raise GuardBusyError("this Guard is already generating an answer; finish or close that event "
                                 "stream first (a Guard runs one generation at a time)")
        try:
            yield
        finally:
            self._probe.release()
            self._lock.release()

    def _window_text(self, window: Window) -> str:
        ids = self._cache.tokens
        return self.model.detokenize([ids[p] for a, b in window.runs for p in range(a, b)])


def _with(request: _Request, sampling: SamplingParams, max_tokens: int, stop: Sequence[str] | str | None) -> _Request:
    from dataclasses import replace

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise OptionsError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return replace(request, sampling=sampling, max_tokens=max_tokens, stops=tuple(s for s in stops if s))


@dataclass(frozen=True)
class _Step:
    """One planned ``llama_decode``. Layout: the answer token (if any) is entry 0; a riding
    probe's tokens follow it, its last token being the batch's last entry."""

    token: int | None          # the sampled answer token, None for a probe-only batch
    pos: int                   # the answer token's position
    check: int | None          # index of the check this batch carries or enables, None if none is due
    window: list[int]          # the positions that check reads
    entries: list[Entry]
    probe_last: int | None     # batch index of the probe's last token


class _Run:
    """The state of one guarded answer, kept out of Guard so a Guard stays reusable."""

    def __init__(self, guard: Guard, request: _Request):
        self.g = guard
        self.r = request
        self.cache = guard._cache
        self.ctx = guard.context
        options = request.options
        head = guard.head
        self.threshold = options.threshold if options.threshold is not None else head.threshold
        self.schedule = options.schedule.resolve(guard.checks_are_free)
        self.policy = Policy(options.policy, options.tau or head.tau)
        self.window_state = WindowState()
        self.sampler = Sampler(guard.model, request.sampling)
        self.detok = Detokenizer(guard.model)
        self.answer = list(request.prefill)  # positions of answer tokens: prefill, then written ones
        self.text = ""
        self.written = 0                     # sampled answer tokens emitted
        self.checks = 0
        self.query_risk: float | None = None
        self.max_risk: float | None = None
        self.guard_s = 0.0
        self.intervened = False
        self.out = -1                        # batch index of the logits to sample from
        self.reused = 0

    # -- 1. start ---------------------------------------------------------------------------

    def start(self) -> None:
        self.reused, self.out = self.cache.sync(self.r.prompt.ids)

    # -- 2. plan ----------------------------------------------------------------------------

    def _plan(self, token: int | None) -> _Step:
        """A probe rides with the token it precedes: its check reads the answer up to, not
        including, that token (index = tokens written). A free check runs after the token is
        decoded and reads it too (index = tokens written + 1)."""
        pos = len(self.cache)
        entries = [Entry(token, pos, (SEQ,), True)] if token is not None else []
        if self.g._check.needs_probe:
            index = self.written
            if not self.schedule.due(index):
                return _Step(token, pos, None, [], entries, None)
            window = self._window(None)
            entries += self.g._probe.attach(window)
            return _Step(token, pos, index, window, entries, len(entries) - 1)
        index = self.written + 1
        if token is None or not self.schedule.due(index):
            return _Step(token, pos, None, [], entries, None)
        return _Step(token, pos, index, self._window(pos), entries, None)

    def _window(self, held: int | None) -> list[int]:
        answer = self.answer + ([held] if held is not None else [])
        return choose_window(self.r.query, answer, self.window_state, self.r.options.window) or [len(self.cache) - 1]

    # -- 3. decode --------------------------------------------------------------------------

    def _decode(self, step: _Step) -> Any:
        n_own = 1 if step.token is not None else 0
        start = time.perf_counter()
        result = self.cache.decode(step.entries, n_own)
        if step.probe_last is not None:
            self.guard_s += (time.perf_counter() - start) * (len(step.entries) - n_own) / len(step.entries)
        if n_own:
            self.out = 0
        return result

    # -- 4. read the check ------------------------------------------------------------------

    def _read(self, step: _Step, result: Any) -> CheckEvent | None:
        if step.check is None:
            return None
        probe = None
        if step.probe_last is not None:
            probe = {h: result.states.rows[h][step.probe_last] for h in self.g.hooks}
            self.g._probe.release()
        last = step.pos if step.probe_last is None else step.pos - 1  # a free check reads the new token
        return self._verdict(step.check, step.window, last, probe)

    def _verdict(self, index: int, window: list[int], last: int, probe: Any) -> CheckEvent:
        """Score the window; ``signal`` says what was read: the [CLS] probe or the window's own states."""
        start = time.perf_counter()
        risk = self.g._check.risk(Window.of(window, last), probe)
        self.guard_s += time.perf_counter() - start
        malicious = risk >= self.threshold
        self.checks += 1
        self.max_risk = risk if self.max_risk is None else max(self.max_risk, risk)
        if index == 0:
            self.query_risk = risk
        update_window_state(self.window_state, malicious, len(self.answer))
        return CheckEvent(index, risk, malicious, runs(window), signal="probe" if probe is not None else "window")

    def first_check_alone(self) -> tuple[float, bool, CheckEvent]:
        """The query check on its own: free for a probe-less head, one probe-only decode otherwise."""
        if self.g._check.needs_probe:
            step = self._plan(None)
            event = self._read(step, self._decode(step))
        else:
            window = self._window(None)
            event = self._verdict(0, window, len(self.cache) - 1, None)
        return event.risk, event.malicious, event

    # -- 5. apply the policy ----------------------------------------------------------------

    def _act(self, check: CheckEvent) -> Action:
        return self.policy.on_verdict(check.index, check.malicious)

    def _intervene(self, action: Action, index: int) -> Iterator[Event]:
        """Write the end of the answer the guard now owns; the answer ends with it."""
        self.intervened = True
        if action.kind == "halt":
            text = halt_text(self.r.prefill_text + self.text)
            yield InterventionEvent(index, "halt", text, action.reason)
            yield from self._emit_text(text)
            return
        opener = lead_in(self.r.prefill_text + self.text) + self.r.options.opener
        yield InterventionEvent(index, "refuse", opener, action.reason)
        reason = self._model_reason(opener) if self.r.options.reason == "model" else None
        yield from self._emit_text(opener + (reason if reason is not None else FIXED_REASON))

    def _model_reason(self, opener: str) -> str | None:
        """The model's own continuation of the opener, kept only when it is one plain reason.

        The opener is decoded into the cache, the reason sampled greedily and held back
        until it is judged; the user never sees a reason that drifts."""
        forced = self.g.model.tokenize(opener)
        pos = len(self.cache)
        if pos + len(forced) + MAX_REASON_TOKENS >= self.ctx.n_ctx:
            return None
        entries = [Entry(t, pos + i, (SEQ,), i == len(forced) - 1) for i, t in enumerate(forced)]
        self.cache.decode(entries, len(entries))
        greedy = Sampler(self.g.model, SamplingParams())
        detok, text, out = Detokenizer(self.g.model), "", len(entries) - 1
        for _ in range(MAX_REASON_TOKENS):
            token = greedy.sample(self.ctx, out)
            if self.g.model.is_eog(token):
                break
            piece = detok.push(token)
            if "\n" in piece:
                break
            text += piece
            self.cache.decode([Entry(token, len(self.cache), (SEQ,), True)], 1)
            out = 0
            if text.rstrip().endswith((".", "!", "?")):
                break
        text += detok.flush()
        return (" " + text.strip()) if acceptable_reason(text) else None

    # -- 6. emit ----------------------------------------------------------------------------

    def _emit(self, token: int, pos: int) -> TokenEvent:
        self.answer.append(pos)
        self.written += 1
        piece = self.detok.push(token)
        self.text += piece
        risk = None
        if self.g._token_signal is not None:
            start = time.perf_counter()
            risk = self.g._token_signal.risk(Window(((pos, pos + 1),), pos))
            self.guard_s += time.perf_counter() - start
        return TokenEvent(self.written - 1, token, piece, risk)

    def _emit_text(self, text: str) -> Iterator[TokenEvent]:
        """Text the guard writes (not sampled): one forced event, never decoded."""
        self.text += self.detok.flush() + text
        yield TokenEvent(self.written, -1, text, None, forced=True)

    def _stopped(self) -> bool:
        stops = [s for s in self.r.stops if s in self.text]
        if stops:
            self.text = self.text[:min(self.text.find(s) for s in stops)]
        return bool(stops)

    # -- the loop ---------------------------------------------------------------------------

    def events(self) -> Iterator[Event]:
        with self.g._turn():
            started = time.perf_counter()
            self.start()
            yield QueryEvent(len(self.r.prompt), self.r.prefill_text, self.reused)
            finish = yield from self._answer()
            if not self.intervened:
                self.text += self.detok.flush()
            elapsed = time.perf_counter() - started
            yield DoneEvent(finish, self.text, self.written, len(self.r.prompt), self.checks, self.intervened,
                            self.query_risk, self.max_risk, elapsed, self.written / elapsed if elapsed > 0 else 0.0,
                            self.guard_s)

    def _answer(self) -> Iterator[Event]:
        """The steps, until the answer ends; returns the finish reason."""
        first_done = False
        if not self.g._check.needs_probe:  # a free query check: before any token
            _, _, check = self.first_check_alone()
            first_done = True
            yield check
            action = self._act(check)
            if action.acts:
                yield from self._intervene(action, 0)
                return action.kind
        while True:
            if self.written >= self.r.max_tokens and first_done:
                return "length"
            token = self.sampler.sample(self.ctx, self.out)
            ends = self.g.model.is_eog(token) or self.written >= self.r.max_tokens
            if ends and first_done:
                return "stop" if self.g.model.is_eog(token) else "length"
            if len(self.cache) + 1 + len(self.g._probe.tokens) >= self.ctx.n_ctx:
                return "length"  # the context is full: keep what was written
            step = self._plan(None if ends else token)
            check = self._read(step, self._decode(step))
            first_done = True
            if check is not None:
                yield check
                action = self._act(check)
                if action.acts:
                    if step.token is not None:
                        self.cache.cut(step.pos)  # the held-back token is never written
                    yield from self._intervene(action, check.index)
                    return action.kind
            if step.token is None:
                return "stop" if self.g.model.is_eog(token) else "length"
            yield self._emit(token, step.pos)
            if self._stopped():
                return "stop"
