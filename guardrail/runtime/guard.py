"""Guard: the public API. Runs guarded generation and yields events.

One guarded answer is a run (``_Run.steps``), a generator of named steps:
1. **start** — make the slot's conversation cache hold the prompt, decoding only
   what the previous call did not leave there (in chunks, beside other answers);
   a request whose last user turn reads as encoded or split has its plain readings
   decoded and checked there first (:mod:`.encodings`, :mod:`.splits`), and the
   prompt then decodes from where they part;
2. **plan** — sample the next answer token and lay out its entries: the answer
   token first; when a check with a [CLS] probe is due, the probe's tokens follow
   it, the probe's last token last;
3. **decode** — the run yields a :class:`~.batch.Decode` and gets its share of
   one ``llama_decode`` back, states appended to the slot's history;
4. **read the check** — the head's probability over the window the rules choose
   (no decode at all for a head without a probe block: :class:`_WindowCheck`;
   the probe riding the batch: :class:`_ProbeCheck`);
5. **apply the policy** — continue, or act: the token decoded with a malicious
   check is held back, removed from the cache unseen, and the guard writes the
   end of the answer (a refusal, or a halt);
6. **emit** — the token, with its own token-signal risk.

A run never calls llama.cpp's decode itself, so the same run is stepped alone
(``Guard.chat``) or beside other runs (``Guard.chat_many``, ``Guard.batch``: one
``llama_decode`` per step for all of them, see :mod:`.batch`). A Guard owns one
model context with ``n_parallel`` slots (a KV sequence each, see :mod:`.cache`),
runs one driver at a time (a second one raises :class:`GuardBusyError`) and keeps
each slot's KV cache and captured states between calls, so a chat's next turn
decodes only what is new.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp

from guardrail.artifacts.heads import find_head
from guardrail.artifacts.models import resolve_model
from guardrail.errors import ContextError, GuardBusyError, HeadError, OptionsError
from guardrail.head import Head, fingerprint_file, load_head

from .batch import Batcher, Decode, Decoded, Job, drive_alone
from .cache import CachePool, ConversationCache, Slot
from .chat import ChatFormat, Message, PromptTokens
from .encodings import encoded_risk, read_conversation, read_request
from .engine import (DEFAULT_MAX_TOKENS, Context, Detokenizer, Entry, Model, Sampler, SamplingParams, default_flash_attn,
                     default_n_ctx)
from .events import CheckEvent, DoneEvent, Event, InterventionEvent, QueryEvent, TokenEvent
from .features import HeadReader, StateHistory, Window, hooks_of, probe_tokens, request_window, split_conversation
from .options import GuardOptions, ResolvedOptions
from .policy import FIXED_REASON, MAX_REASON_TOKENS, Action, Policy, acceptable_reason, halt_text, lead_in
from .probe import AnswerWindow, Probe, WindowState, runs, update_window_state, window_runs


_S = SamplingParams()  # the sampling defaults, spelled once


@dataclass(frozen=True)
class Verdict:
    """The first check's outcome for a conversation: what ``Guard.score`` returns."""

    risk: float
    malicious: bool
    threshold: float
    reading: tuple[str, ...] = ()  # what was undone (encodings, "joined"): the check read the plain words too


@dataclass(frozen=True)
class GuardRequest:
    """One answer to give: the prompt and where its parts are, how to sample, how to decide
    (``Guard.chat_request`` makes one, checked, for ``Guard.batch().start``)."""

    prompt: PromptTokens
    query: list[int]          # content positions of the conversation before the answer
    prefill: list[int]        # positions of a caller's prefill (a final assistant message)
    prefill_text: str
    sampling: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    options: GuardOptions
    # An encoded or split request in plain words (runtime.encodings, runtime.splits): (its decoded spans
    # or joined pieces alone, its text with them in place, what it says around them); the query check
    # reads each too, in the slot's own sequence before the prompt (encoded_risk decides), and says
    # which encodings it undid.
    readings: tuple[GuardRequest, ...] | None = None
    encodings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatCall:
    """One conversation of ``Guard.chat_many`` with its own ``chat`` keyword arguments
    (sampling, ``max_tokens``, ``stop``, guard options)."""

    messages: Sequence[Mapping[str, str] | Message]
    options: Mapping[str, Any] = field(default_factory=dict)


class Guard:
    """Guarded generation on a llama.cpp model.

    ``model``: a GGUF path, a known model name, an existing ``llama_cpp.Llama``
    (its weights are shared, not loaded twice), or None for the default model.
    ``head``: a head file; None finds the head for the model (shipped, or trained
    with ``guardrail train --model``). ``n_parallel``: answers that can decode
    together (``chat_many``, ``batch``), each in its own KV sequence. ``n_ctx``:
    the KV cells all of them share; None takes the model's trained context per
    slot where memory allows (see ``engine.default_n_ctx``). ``flash_attn``: None chooses by slot
    count (``engine.default_flash_attn``: off for one answer on a CPU, where a chat's turns start
    sooner, as Llama's do; on for several); True there decodes answers about 12% faster and long
    cold prompts sooner. Options: ``policy``
    (refuse | halt | monitor), ``schedule`` (auto | every | annealing | first |
    periodic:K), ``threshold``, ``tau``, ``opener``, ``reason`` (fixed | model),
    ``r1/r2/r3``, ``read_encoded`` (default on: an encoded or split request is read in plain words too).
    """

    def __init__(self, model: str | os.PathLike[str] | llama_cpp.Llama | None = None,
                 head: str | os.PathLike[str] | None = None, *, n_ctx: int | None = None, n_parallel: int = 1,
                 allow_head_mismatch: bool = False, template: str | None = None,
                 n_threads: int | None = None, flash_attn: bool | None = None, **options: Any):
        self.options = GuardOptions().updated(**options)
        if isinstance(n_parallel, bool) or not isinstance(n_parallel, int) or not 1 <= n_parallel <= 64:
            raise OptionsError(f"n_parallel must be a whole number from 1 to 64, got {n_parallel!r}")
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
        self.n_parallel = n_parallel
        self.context = Context(self.model, n_ctx=n_ctx or default_n_ctx(self.model, n_parallel), n_batch=512,
                               n_seq_max=CachePool.sequences(n_parallel), hooks=self.hooks, n_threads=n_threads,
                               flash_attn=default_flash_attn(n_parallel) if flash_attn is None else flash_attn)
        vectors = not all(HeadReader.is_linear(h) for h in heads)
        self._pool = CachePool(self.context, n_parallel, lambda: StateHistory(self.hooks, info.n_embd, vectors=vectors))
        self._signals = {slot.index: _Signals(self, slot.cache) for slot in self._pool.slots}
        if self._signals[0].token is not None and self._signals[0].token.needs_probe:
            raise HeadError("the token head cannot read a probe: it scores every token's own state")
        self._probe_tokens = probe_tokens(self.model, self.head.probe_text) or [self.model.bos]
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
        return not self._signals[0].check.needs_probe

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def resolve_options(self, **overrides: Any) -> ResolvedOptions:
        """This Guard's options with a call's ``overrides``, the head's threshold and tau filled in:
        what such a call runs under, resolved once (one OptionsError line for a bad value)."""
        return self.options.updated(**overrides).resolve(self.head)

    def reset(self) -> None:
        """Forget the cached conversations: the next call decodes its whole prompt."""
        with self._turn():
            self._pool.clear()

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public calls ---------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, str] | Message], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float = _S.temperature, top_p: float = _S.top_p, top_k: int = _S.top_k,
             min_p: float = _S.min_p, seed: int | None = None, repeat_penalty: float = _S.repeat_penalty,
             stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Event]:
        """Events of one guarded answer to a conversation. A final assistant message is a prefill."""
        return self._alone(self.chat_request(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                             top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty,
                                             stop=stop, **guard))

    def complete(self, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = _S.temperature,
                 top_p: float = _S.top_p, top_k: int = _S.top_k, min_p: float = _S.min_p, seed: int | None = None,
                 repeat_penalty: float = _S.repeat_penalty, stop: Sequence[str] | str | None = None,
                 **guard: Any) -> Iterator[Event]:
        """Events of a guarded continuation of raw text (no chat template)."""
        return self._alone(self.text_request(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                             top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty,
                                             stop=stop, **guard))

    def chat_many(self, conversations: Sequence[Sequence[Mapping[str, str] | Message] | ChatCall],
                  **common: Any) -> Iterator[tuple[int, Event]]:
        """Events of several guarded answers decoded together, each tagged with its conversation's index.

        Up to ``n_parallel`` answers run at once (one ``llama_decode`` per step for all of
        them); the next conversation starts as soon as a slot is free. ``common`` takes
        ``chat``'s keyword arguments; a :class:`ChatCall` adds its own. Every answer is
        decided by its own checks, schedule and policy, exactly as ``chat`` would."""
        calls = [c if isinstance(c, ChatCall) else ChatCall(c) for c in conversations]
        requests = [self.chat_request(c.messages, **{**common, **c.options}) for c in calls]
        return self._many(requests)

    def chat_request(self, messages: Sequence[Mapping[str, str] | Message], *,
                     max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = _S.temperature,
                     top_p: float = _S.top_p, top_k: int = _S.top_k, min_p: float = _S.min_p,
                     seed: int | None = None, repeat_penalty: float = _S.repeat_penalty,
                     stop: Sequence[str] | str | None = None, **guard: Any) -> GuardRequest:
        """A conversation checked and tokenized (the template, options and length are checked here,
        before it takes a slot): what ``chat`` runs, and what ``batch().start`` takes."""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, _S.repeat_last_n, seed)
        return _sampled(self._chat_request(messages, guard), sampling, max_tokens, stop)

    def text_request(self, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = _S.temperature,
                     top_p: float = _S.top_p, top_k: int = _S.top_k, min_p: float = _S.min_p,
                     seed: int | None = None, repeat_penalty: float = _S.repeat_penalty,
                     stop: Sequence[str] | str | None = None, **guard: Any) -> GuardRequest:
        """Raw text (no chat template): what ``complete`` runs, and what ``batch().start`` takes."""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, _S.repeat_last_n, seed)
        return _sampled(self._text_request(prompt, guard), sampling, max_tokens, stop)

    def score(self, messages: Sequence[Mapping[str, str] | Message], **guard: Any) -> Verdict:
        """The first check's probability and verdict for a conversation, without generating."""
        request = self._chat_request(messages, guard)
        with self._turn():
            slot = self._acquire(request)
            try:
                verdict: Verdict = _result(drive_alone(self.context, _Run(self, request, slot).score()))
            finally:
                self._pool.release(slot)
        return verdict

    def batch(self) -> GuardBatch:
        """Several answers stepped together by the caller (the server's slots): holds the Guard until closed."""
        return GuardBatch(self)

    def create_chat_completion(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                               temperature: float = _S.temperature, top_p: float = _S.top_p, seed: int | None = None,
                               stop: Sequence[str] | str | None = None, stream: bool = False,
                               guard: Mapping[str, Any] | None = None, **sampling: Any) -> Any:
        """A drop-in for ``Llama.create_chat_completion``: same shapes, plus a ``guardrail`` object."""
        from .shapes import chat_chunks, chat_response

        events = self.chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           stop=stop, **sampling, **dict(guard or {}))
        return chat_chunks(events, self.model_name) if stream else chat_response(events, self.model_name)

    def create_completion(self, prompt: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = _S.temperature,
                          top_p: float = _S.top_p, seed: int | None = None, stop: Sequence[str] | str | None = None,
                          stream: bool = False, guard: Mapping[str, Any] | None = None, **sampling: Any) -> Any:
        """A drop-in for ``Llama.create_completion`` (raw text), with a ``guardrail`` object."""
        from .shapes import completion_chunks, completion_response

        events = self.complete(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               stop=stop, **sampling, **dict(guard or {}))
        return completion_chunks(events, self.model_name) if stream else completion_response(events, self.model_name)

    # -- helpers of the calls -------------------------------------------------------------

    def _chat_request(self, messages: Sequence[Mapping[str, str] | Message], guard: Mapping[str, Any],
                      read_plain: bool = True) -> GuardRequest:
        msgs = [Message.coerce(m) for m in messages]
        options = self.options.updated(**guard)
        prompt = self.format.tokens(msgs)
        as_dicts = [{"role": m.role, "content": m.content} for m in msgs]
        query, prefill = split_conversation(prompt, as_dicts)
        prefill_text = msgs[-1].content if msgs and msgs[-1].role == "assistant" else ""
        request = GuardRequest(prompt, query, prefill, prefill_text, SamplingParams(), 0, (), options)
        read = read_conversation(as_dicts) if read_plain and options.read_encoded else None
        if read is None:
            return request
        return _with_readings(request, lambda m: self._chat_request(m, guard, read_plain=False),
                              (read.alone, read.in_place, read.around), read.names)

    def _text_request(self, prompt: str, guard: Mapping[str, Any], read_plain: bool = True) -> GuardRequest:
        tokens = PromptTokens()
        if self.model.info.add_bos:
            tokens.extend([self.model.bos], -1)
        tokens.extend(self.format.plain.tokenize(prompt), 0)  # a person's text: never a special token
        query = [i for i, m in enumerate(tokens.message) if m >= 0]
        options = self.options.updated(**guard)
        request = GuardRequest(tokens, query, [], "", SamplingParams(), 0, (), options)
        read = read_request(prompt) if read_plain and options.read_encoded else None
        if read is None:
            return request
        return _with_readings(request, lambda t: self._text_request(t, guard, read_plain=False),
                              (read.alone, read.in_place, read.around or read.alone), read.encodings)

    def _cells_needed(self, request: GuardRequest) -> int:
        """KV cells an answer may add: its tokens, a probe, a model-written refusal reason, and the
        plain readings' tokens beyond the prompt's (they are decoded in the same sequence first)."""
        reason = MAX_REASON_TOKENS + 16 if request.options.reason == "model" else 0
        return request.max_tokens + len(self._probe_tokens) + reason + 1 + _readings_beyond(request)

    def _acquire(self, request: GuardRequest) -> Slot:
        slot = self._pool.acquire(request.prompt.ids, self._cells_needed(request))
        assert slot is not None, "with no answer running, every slot is free and every cell can be had"
        return slot

    def _alone(self, request: GuardRequest) -> Iterator[Event]:
        with self._turn():
            slot = self._acquire(request)
            try:
                yield from drive_alone(self.context, _Run(self, request, slot).steps())
            finally:
                self._pool.release(slot)

    def _many(self, requests: Sequence[GuardRequest]) -> Iterator[tuple[int, Event]]:
        with self.batch() as batch:
            out: deque[tuple[int, Event]] = deque()
            queue = deque(enumerate(requests))
            errors: list[BaseException] = []

            def started(i: int, request: GuardRequest) -> bool:
                return batch.start(request, lambda e: out.append((i, e)),
                                   lambda exc: errors.append(exc) if exc is not None else None) is not None
            while queue or batch.active:
                while queue and started(*queue[0]):
                    queue.popleft()
                batch.step()
                while out:
                    yield out.popleft()
                if errors:
                    raise errors[0]

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The busy flag: one driver (an answer, a score, a batch) at a time on this Guard's context."""
        if not self._lock.acquire(blocking=False):
            raise GuardBusyError("this Guard is already generating an answer; finish or close that event "
                                 "stream first (a Guard runs one generation at a time)")
        try:
            yield
        finally:
            self._lock.release()


def _result(steps: Generator[Any, None, Any]) -> Any:
    """Run a driver whose run yields no events to its end; return the run's value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class GuardBatch:
    """Several guarded answers on one Guard, stepped together: ``start`` takes a slot (or says to
    wait), ``step`` runs one ``llama_decode`` for every running answer. Holds the Guard (a
    ``chat`` beside it raises :class:`GuardBusyError`) until closed."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self._turn = guard._turn()
        self._turn.__enter__()
        self.batcher = Batcher(guard.context, prompt_chunk=64)
        self._slots: dict[int, Slot] = {}

    @property
    def active(self) -> bool:
        return self.batcher.active

    @property
    def running(self) -> int:
        return len(self.batcher.jobs)

    def start(self, request: GuardRequest, sink: Callable[[Event], None],
              on_end: Callable[[BaseException | None], None] = lambda exc: None) -> Job | None:
        """Start an answer whose events go to ``sink``; None when no slot or KV cells are free now
        (try again after a step). Raises ContextOverflowError for a request no context could hold."""
        slot = self.guard._pool.acquire(request.prompt.ids, self.guard._cells_needed(request))
        if slot is None:
            return None
        return self._add(_Run(self.guard, request, slot).steps(), slot, sink, on_end)

    def score(self, request: GuardRequest, on_end: Callable[[Verdict | None, BaseException | None], None]) -> Job | None:
        """Score a conversation (the first check alone) beside the running answers; None: try later."""
        slot = self.guard._pool.acquire(request.prompt.ids, len(self.guard._probe_tokens) + 1 + _readings_beyond(request))
        if slot is None:
            return None
        run = _Run(self.guard, request, slot)
        result: list[Verdict] = []

        def scored() -> Generator[Any, Decoded, None]:
            result.append((yield from run.score()))
        return self._add(scored(), slot, lambda e: None, lambda exc: on_end(result[0] if result else None, exc))

    def _add(self, run: Generator[Any, Decoded, Any], slot: Slot, sink: Callable[[Event], None],
             on_end: Callable[[BaseException | None], None]) -> Job:
        def ended(exc: BaseException | None) -> None:
            self.guard._pool.release(slot)
            on_end(exc)
        return self.batcher.add(run, sink, ended)

    def step(self) -> None:
        self.batcher.step()

    def cancel(self, job: Job) -> None:
        """Stop one answer (its client left); the others go on."""
        self.batcher.cancel(job)

    def close(self) -> None:
        for job in list(self.batcher.jobs):
            self.batcher.cancel(job)
        self._turn.__exit__(None, None, None)

    def __enter__(self) -> GuardBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_readings(request: GuardRequest, build: Callable[[Any], GuardRequest], readings: Sequence[Any],
                   names: tuple[str, ...]) -> GuardRequest:
    """``request`` with its plain readings (alone, in place, around) built as requests of their own."""
    try:
        return replace(request, readings=tuple(build(r) for r in readings), encodings=names)
    except ContextError:
        return request  # a decoding the model cannot hold (a control character): read as written


def _readings_beyond(request: GuardRequest) -> int:
    """KV cells the plain readings of a request may need beyond its prompt's (none when shorter)."""
    return max([0] + [len(r.prompt) - len(request.prompt) for r in request.readings or ()])


def _sampled(request: GuardRequest, sampling: SamplingParams, max_tokens: int,
             stop: Sequence[str] | str | None) -> GuardRequest:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise OptionsError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return replace(request, sampling=sampling, max_tokens=max_tokens, stops=tuple(s for s in stops if s))


class _Signals:
    """The heads as one slot reads them: the check head (the query check, and the answer's checks
    when the head has no answer stage of its own), the answer-stage head and its window, and the
    token head (free, decides nothing)."""

    def __init__(self, guard: Guard, cache: ConversationCache):
        def text_of(window: Window) -> str:
            ids = cache.tokens
            return guard.model.detokenize([ids[p] for a, b in window.runs for p in range(a, b)])
        self.check = HeadReader(guard.head, cache.history, text_of)
        self.token = HeadReader(guard.token_head, cache.history, text_of) if guard.token_head else None
        answer_head = guard.head.answer_head
        self.answer = HeadReader(answer_head, cache.history, text_of) if answer_head else None
        stage = (answer_head.extra.get("answer_stage") or {}) if answer_head else {}
        self.answer_window = (AnswerWindow(int(stage.get("recent", 32)), bool(stage.get("query", False)))
                              if answer_head else None)


# ---------------------------------------------------------------------------------------
# The two ways a check reads the conversation


class _WindowCheck:
    """A free check: the head reads states the capture already holds, after the token is decoded.

    Its index counts the new token (index = tokens written + 1); the query's own check
    (index 0) runs before any token, with no decode at all."""

    free = True

    def index(self, written: int) -> int:
        return written + 1

    def entries(self, window: list[tuple[int, int]]) -> list[Entry]:
        return []

    def probe_states(self, got: Decoded, n_entries: int) -> None:
        return None

    def release(self) -> None:
        pass


class _ProbeCheck:
    """The [CLS] probe: its tokens ride in the same decode as the next answer token, in the
    slot's probe sequence over the window; its index is the tokens written before it."""

    free = False

    def __init__(self, probe: Probe, hooks: Sequence[str]):
        self.probe = probe
        self.hooks = hooks

    def index(self, written: int) -> int:
        return written

    def entries(self, window: list[tuple[int, int]]) -> list[Entry]:
        return self.probe.attach(window)

    def probe_states(self, got: Decoded, n_entries: int) -> dict[str, Any]:
        assert got.states is not None
        states = {h: got.states.of(h, n_entries - 1) for h in self.hooks}
        self.probe.release()
        return states

    def release(self) -> None:
        self.probe.release()


@dataclass
class _Planned:
    """One planned decode of an answer: its token (None for a probe-only batch), the check it
    carries or enables, that check's window."""

    token: int | None
    pos: int
    check: int | None
    window: list[tuple[int, int]]
    entries: list[Entry]


class _Run:
    """The state of one guarded answer, kept out of Guard so a Guard stays reusable."""

    def __init__(self, guard: Guard, request: GuardRequest, slot: Slot):
        self.guard = guard
        self.request = request
        self.slot = slot
        self.cache = slot.cache
        self.context = guard.context
        self.model = guard.model
        self.signals = guard._signals[slot.index]
        options = request.options.resolve(guard.head)
        self.threshold = options.threshold
        self.answer_threshold = options.answer_threshold
        self.prefill_threshold = options.prefill_threshold
        self.schedule = options.schedule.resolve(guard.checks_are_free)
        self.policy = Policy(options.policy, options.answer_rule)
        # The query check reads the check head (through the probe when it has a probe block); the
        # answer's checks read the answer-stage head, which is always free, else the check head.
        self.query_mode: _WindowCheck | _ProbeCheck = (
            _ProbeCheck(Probe(self.context, guard._probe_tokens, seq=slot.probe_seq, src=slot.cache.seq,
                              free=guard._pool.free), guard.hooks)
            if self.signals.check.needs_probe else _WindowCheck())
        self.answer_mode = _WindowCheck() if self.signals.answer is not None else self.query_mode
        self.first_done = False
        self.window_state = WindowState()
        self.query_runs = runs(request.query)
        self.sampler = Sampler(self.model, request.sampling)
        self.detok = Detokenizer(self.model)
        self.answer = list(request.prefill)  # positions of answer tokens: prefill, then written ones
        self.text = ""
        self.written = 0                     # sampled answer tokens emitted
        self.checks = 0
        self.query_risk: float | None = None
        self.query_check: CheckEvent | None = None
        self.plain_checks: tuple[CheckEvent, ...] | None = None  # the query check on each plain reading
        self.max_risk: float | None = None
        self.guard_s = 0.0
        self.prompt_s = 0.0                  # decoding the prompt (the guard's own work for a plain reading)
        self.intervened = False
        self.out = -1                        # batch index of the logits to sample from
        self.reused = 0

    # -- decoding through the driver ----------------------------------------------------------

    def _decode(self, request: Decode, n_own: int) -> Generator[Decode, Decoded, Decoded]:
        """Yield a Decode; record the conversation's own entries that went in (the first ``n_own``)."""
        try:
            got = yield request
        except BaseException:
            self.cache.clear()  # the KV cells may hold what the cache does not know of
            raise
        assert got is not None
        self.cache.commit(request.entries[:min(got.taken, n_own)], got.states)
        return got

    # -- 1. start ---------------------------------------------------------------------------

    def start(self) -> Generator[Decode, Decoded, None]:
        """Decode the prompt. A request with plain readings has those read first, in the same sequence:
        each then reuses the prefix they share and decodes only what differs."""
        reused_before = None
        if self.request.readings is not None:
            checks = []
            for reading in self.request.readings:
                run = _Run(self.guard, reading, self.slot)
                yield from run.score()
                assert run.query_check is not None
                checks.append(run.query_check)
                reused_before = run.reused if reused_before is None else reused_before
                self.guard_s += run.prompt_s + run.guard_s  # all of it is the guard's own work
            self.plain_checks = tuple(checks)
        self.reused, pending = self.cache.prepare(self.request.prompt.ids)
        if reused_before is not None:
            self.reused = reused_before  # what the previous call left, not what the plain reading did
        self.query_mode.release()
        while pending:
            got = yield from self._decode(Decode(pending, split=True), len(pending))
            self.prompt_s += got.share_of(got.taken)
            if pending[got.taken - 1].output:
                self.out = got.index(got.taken - 1)
            pending = pending[got.taken:]

    # -- 2. plan ----------------------------------------------------------------------------

    def _plan(self, token: int | None) -> _Planned:
        """A probe rides with the token it precedes: its check reads the answer up to, not including,
        that token. A free check runs after the token is decoded and reads it too."""
        pos = len(self.cache)
        entries = [self.cache.entry(token)] if token is not None else []
        mode = self.answer_mode if self.first_done else self.query_mode
        index = mode.index(self.written)
        if (token is None and mode.free) or not self.schedule.due(index):
            return _Planned(token, pos, None, [], entries)
        held = pos if (mode.free and token is not None) else None
        window = self._window(held, answer_stage=self.first_done)
        return _Planned(token, pos, index, window, entries + mode.entries(window))

    def _window(self, held: int | None, answer_stage: bool = False) -> list[tuple[int, int]]:
        end = (held + 1) if held is not None else len(self.cache)
        if answer_stage and self.signals.answer_window is not None:
            start = self.answer[0] if self.answer else (held if held is not None else len(self.request.prompt))
            return self.signals.answer_window.runs(self.query_runs, start, end) or [(end - 1, end)]
        answer = self.answer + [held] if held is not None else self.answer
        spans = window_runs(self.query_runs, answer, self.window_state, self.request.options.window)
        return spans or [(end - 1, end)]

    # -- 3. decode, 4. read the check -------------------------------------------------------

    def _step(self, plan: _Planned) -> Generator[Decode, Decoded, tuple[CheckEvent, Action] | None]:
        n_own = 1 if plan.token is not None else 0
        got = yield from self._decode(Decode(plan.entries), n_own)
        self.guard_s += got.share_of(len(plan.entries) - n_own)
        if n_own:
            self.out = got.index(0)
        if plan.check is None:
            return None
        mode = self.answer_mode if self.first_done else self.query_mode
        probe = mode.probe_states(got, len(plan.entries))
        last = plan.pos if probe is None else plan.pos - 1  # a free check reads the new token
        return self._verdict(plan.check, plan.window, last, probe)

    def _verdict(self, index: int, window: list[tuple[int, int]], last: int, probe: Any) -> tuple[CheckEvent, Action]:
        """Score the window and decide: the query check on its own verdict, the answer's checks by the
        answer stage's rule. ``signal`` says what was read: the [CLS] probe or the window's own states.
        The query check of an encoded or split request weighs its plain readings too (``encodings.encoded_risk``)."""
        start = time.perf_counter()
        query = not self.first_done
        reader = self.signals.check if (query or self.signals.answer is None) else self.signals.answer
        risk = reader.risk(Window(tuple(window), last), probe)
        plain = self.plain_checks if query else None
        if plain is not None:  # an encoded or split request, its readings weighed (NaN fails closed)
            risk = float(encoded_risk(risk, *(check.risk for check in plain)))
        self.guard_s += time.perf_counter() - start
        self.checks += 1
        self.max_risk = risk if self.max_risk is None else max(self.max_risk, risk)
        score = None
        if query:
            self.first_done = True
            self.query_risk = risk
            malicious = not risk < self.threshold  # NaN fails closed
            action = self.policy.on_query(malicious, risk)
        else:
            malicious = not risk < self.answer_threshold
            score, action = self.policy.on_answer(risk, self.answer_threshold)
        update_window_state(self.window_state, malicious, len(self.answer))
        event = CheckEvent(index, risk, malicious, list(window), signal="window" if probe is None else "probe",
                           stage="query" if query else "answer", score=score,
                           reading=self.request.encodings if plain is not None else ())
        if query:
            self.query_check = event
        return event, action

    def first_check_alone(self) -> Generator[Decode, Decoded, tuple[CheckEvent, Action]]:
        """The query check on its own: free for a probe-less head, one probe-only decode otherwise.

        A free check reads the request alone: a prefill is the answer's first tokens (the answer
        stage reads them), not part of the request. The states up to the assistant's header are
        the request's own, so this is the check the request gets without a prefill. Measured: a
        benign request's prefill flagged 3 of 96 held-out prefixed benign requests the request
        alone never did (README, "The prefill, not the request")."""
        if self.query_mode.free:
            read = request_window(self.query_runs, self.request.prefill[0] if self.request.prefill else len(self.cache))
            return self._verdict(0, list(read.runs), read.last, None)
        checked = yield from self._step(self._plan(None))
        assert checked is not None
        return checked

    def prefill_check(self) -> tuple[CheckEvent, Action] | None:
        """The answer stage's head and rule over a caller's prefill, at the prefill's own operating point
        (``Policy.on_prefill``); None where there is no prefill, no answer-stage head or no such point.
        Free: the prefill's states were captured when the prompt was decoded."""
        reader, spec, positions = self.signals.answer, self.signals.answer_window, self.request.prefill
        if not positions or reader is None or spec is None or not self.prefill_threshold < 1.0:
            return None
        started = time.perf_counter()
        windows = spec.over_prefill(self.query_runs, positions)
        risks = [float(reader.risk(Window(tuple(w), p))) for w, p in windows]
        peak, action = self.policy.on_prefill(risks, self.query_risk, self.prefill_threshold)
        self.guard_s += time.perf_counter() - started
        self.checks += 1
        risk = max(r if math.isfinite(r) else 1.0 for r in risks)
        self.max_risk = risk if self.max_risk is None else max(self.max_risk, risk)
        return CheckEvent(0, risk, not peak < self.prefill_threshold, windows[-1][0], signal="window",
                          stage="prefill", score=peak), action

    def score(self) -> Generator[Decode, Decoded, Verdict]:
        try:
            yield from self.start()
            check, _ = yield from self.first_check_alone()
        finally:
            self.query_mode.release()
        return Verdict(check.risk, check.malicious, self.threshold, check.reading)

    # -- 5. apply the policy ----------------------------------------------------------------

    def _intervene(self, action: Action, index: int) -> Generator[Any, Decoded, None]:
        """Write the end of the answer the guard now owns; the answer ends with it."""
        self.intervened = True
        prefix = self.request.prefill_text + self.text
        if action.kind == "halt":
            text = halt_text(prefix)
            yield InterventionEvent(index, "halt", text, action.reason)
            yield self._forced(text)
            return
        opener = lead_in(prefix) + self.request.options.opener
        yield InterventionEvent(index, "refuse", opener, action.reason)
        reason = (yield from self._model_reason(opener)) if self.request.options.reason == "model" else None
        yield self._forced(opener + (reason if reason is not None else FIXED_REASON))

    def _model_reason(self, opener: str) -> Generator[Decode, Decoded, str | None]:
        """The model's own continuation of the opener, kept only when it is one plain reason.

        The opener is decoded into the cache, the reason sampled greedily and held back
        until it is judged; the user never sees a reason that drifts."""
        forced = self.model.tokenize(opener)
        pos = len(self.cache)
        if pos + len(forced) + MAX_REASON_TOKENS >= self.context.n_ctx:
            return None
        entries = [Entry(t, pos + i, (self.cache.seq,), i == len(forced) - 1) for i, t in enumerate(forced)]
        got = yield from self._decode(Decode(entries), len(entries))
        greedy = Sampler(self.model, SamplingParams())
        detok, text, out = Detokenizer(self.model), "", got.index(len(entries) - 1)
        for _ in range(MAX_REASON_TOKENS):
            token = greedy.sample(self.context, out)
            if self.model.is_eog(token):
                break
            piece = detok.push(token)
            if "\n" in piece:
                break
            text += piece
            got = yield from self._decode(Decode([self.cache.entry(token)]), 1)
            out = got.index(0)
            if text.rstrip().endswith((".", "!", "?")):
                break
        text += detok.flush()
        return (" " + text.strip()) if acceptable_reason(text) else None

    # -- 6. emit ----------------------------------------------------------------------------

    def _emit(self, token: int, pos: int, piece: str | None = None) -> TokenEvent:
        """Record a written token (``piece``: its text, when it was already shown) and its event."""
        self.answer.append(pos)
        self.written += 1
        piece = self.detok.push(token) if piece is None else piece
        self.text += piece
        risk = None
        if self.signals.token is not None:
            start = time.perf_counter()
            risk = self.signals.token.risk(Window(((pos, pos + 1),), pos))
            self.guard_s += time.perf_counter() - start
        return TokenEvent(self.written - 1, token, piece, risk)

    def _forced(self, text: str) -> TokenEvent:
        """Text the guard writes (not sampled): one forced event, never decoded."""
        self.text += self.detok.flush() + text
        return TokenEvent(self.written, -1, text, None, forced=True)

    def _stopped(self) -> bool:
        stops = [s for s in self.request.stops if s in self.text]
        if stops:
            self.text = self.text[:min(self.text.find(s) for s in stops)]
        return bool(stops)

    # -- the loop ---------------------------------------------------------------------------

    def steps(self) -> Generator[Any, Decoded, None]:
        """The events of the answer, and the Decodes it needs, in order."""
        try:
            started = time.perf_counter()
            yield from self.start()
            yield QueryEvent(len(self.request.prompt), self.request.prefill_text, self.reused)
            finish = yield from self._answer()
            if not self.intervened:
                self.text += self.detok.flush()
            elapsed = time.perf_counter() - started
            yield DoneEvent(finish, self.text, self.written, len(self.request.prompt), self.checks,
                            self.intervened, self.query_risk, self.max_risk, elapsed,
                            self.written / elapsed if elapsed > 0 else 0.0, self.guard_s)
        finally:
            self.query_mode.release()

    def _checked(self, checked: tuple[CheckEvent, Action], held: int | None) -> Generator[Any, Decoded, str | None]:
        """The one place a check becomes an action: the check's event, then, if the policy acts,
        the held-back token dropped unseen and the end of the answer written. Returns the
        finish reason when the answer ends here."""
        check, action = checked
        yield check
        if not action.acts:
            return None
        if held is not None:
            self.cache.cut(held)  # the held-back token is never written
        yield from self._intervene(action, check.index)
        return action.kind

    def _answer(self) -> Generator[Any, Decoded, str]:
        """The steps, until the answer ends; returns the finish reason."""
        if self.query_mode.free:  # a free query check: before any token
            checked = yield from self.first_check_alone()
            finish = yield from self._checked(checked, None)
            if finish:
                return finish
            prefill = self.prefill_check()
            if prefill is not None:
                finish = yield from self._checked(prefill, None)
                if finish:
                    return finish
        while True:
            if self.written >= self.request.max_tokens and self.first_done:
                return "length"
            token = self.sampler.sample(self.context, self.out)
            ends = self.model.is_eog(token) or self.written >= self.request.max_tokens
            if ends and self.first_done:
                return "stop" if self.model.is_eog(token) else "length"
            if len(self.cache) + 1 + len(self.guard._probe_tokens) >= self.context.n_ctx:
                return "length"  # the context is full: keep what was written
            plan = self._plan(None if ends else token)
            # The first token, when its own check cannot end the answer (the rule needs more checks),
            # is shown before it is decoded, as plain llama.cpp shows it: the time to first token
            # loses a decode. Its token-signal colour is not known yet (risk None).
            early = None
            if (plan.token is not None and self.written == 0 and self.first_done and self.answer_mode.free
                    and not self.policy.next_answer_check_may_act()):
                early = self.detok.push(token)
                yield TokenEvent(self.written, token, early, None)
            stepped = yield from self._step(plan)
            if stepped is not None:
                finish = yield from self._checked(stepped, plan.pos if plan.token is not None else None)
                if finish:
                    return finish
            if plan.token is None:
                return "stop" if self.model.is_eog(token) else "length"
            event = self._emit(token, plan.pos, early)
            if early is None:
                yield event
            if self._stopped():
                return "stop"
