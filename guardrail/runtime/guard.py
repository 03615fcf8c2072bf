"""Guard: the public API. Runs guarded generation and yields events.

One decoding loop, in order: sample the next answer token; when the schedule
says a check is due, decode the [CLS] probe over the window the rules choose in
the same ``llama_decode`` batch as that token; score the probe's state with the
head (the check), and every token's own state with the token head (the
annotation); let the policy act on the checks' verdicts.

A Guard owns one model context and runs one generation at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from guardrail.artifacts.heads import find_head
from guardrail.artifacts.models import resolve_model
from guardrail.errors import ContextOverflowError, HeadError, OptionsError
from guardrail.head import LEXICAL, Head, fingerprint_file, load_head

from .capture import layer_name
from .chat import ChatFormat, PromptTokens
from .engine import Context, Detokenizer, Entry, Model, Sampler, SamplingParams, prefill
from .events import CheckEvent, DoneEvent, Event, InterventionEvent, QueryEvent, TokenEvent
from .features import block_layer, pool, probe_tokens, split_conversation
from .policy import CONTINUE, DEFAULT_OPENER, Action, Policy
from .probe import Probe, WindowParams, WindowState, choose_window, runs, update_window_state
from .schedule import Schedule


@dataclass(frozen=True)
class GuardOptions:
    """How the guard decides. ``threshold``/``tau`` of None mean: the head file's."""

    policy: str = "refuse"
    schedule: Schedule = field(default_factory=Schedule)
    threshold: float | None = None
    tau: int | None = None
    opener: str = DEFAULT_OPENER
    window: WindowParams = field(default_factory=WindowParams)

    def updated(self, **changes: Any) -> GuardOptions:
        """A copy with the given options changed (None leaves one as it is); checked here,
        so a bad option fails before any decoding, with one line."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in fields(self)} - {"r1", "r2", "r3"}
        if unknown:
            raise OptionsError(f"unknown guard option(s): {', '.join(sorted(unknown))}")
        try:
            if isinstance(changes.get("schedule"), str):
                changes["schedule"] = Schedule.parse(changes["schedule"])
            windows = {k: int(changes.pop(k)) for k in ("r1", "r2", "r3") if k in changes}
            if windows:
                changes["window"] = replace(self.window, **windows)
            options = replace(self, **changes)
            Policy(options.policy, 1, options.opener)  # validates the policy's name
        except (TypeError, ValueError) as exc:
            raise OptionsError(str(exc)) from None
        if options.tau is not None and options.tau < 1:
            raise OptionsError(f"tau must be at least 1, got {options.tau}")
        if options.threshold is not None and not 0.0 <= options.threshold <= 1.0:
            raise OptionsError(f"threshold must be between 0 and 1, got {options.threshold}")
        if min(options.window.r1, options.window.r2, options.window.r3) < 1:
            raise OptionsError("r1, r2 and r3 must be at least 1")
        return options


class _History:
    """Every decoded token's captured states, by position (the windows' mean reads them)."""

    def __init__(self, hooks: Sequence[str], n_ctx: int, n_embd: int):
        self.states = {h: np.zeros((n_ctx, n_embd), np.float32) for h in hooks}

    def store(self, positions: Sequence[int], rows: Mapping[str, np.ndarray], first_row: int) -> None:
        for hook, buf in self.states.items():
            buf[positions[0]:positions[-1] + 1] = rows[hook][first_row:first_row + len(positions)]


class Guard:
    """Guarded generation on a llama.cpp model.

    ``model``: a GGUF path, a known model name, an existing ``llama_cpp.Llama``
    (its weights are shared, not loaded twice), or None for the default model.
    ``head``: a head file; None means the head shipped for the model.
    Options: ``policy`` (refuse | halt | monitor), ``schedule`` (annealing |
    every | first | periodic:K), ``threshold``, ``tau``, ``opener``, ``r1/r2/r3``.
    """

    def __init__(self, model: str | os.PathLike[str] | llama_cpp.Llama | None = None,
                 head: str | os.PathLike[str] | None = None, *, n_ctx: int = 2048,
                 allow_head_mismatch: bool = False, template: str | None = None,
                 n_threads: int | None = None, **options: Any):
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
        layers = sorted({block_layer(b.name) for h in heads for b in h.blocks} - {None})
        self.hooks = tuple(layer_name(layer) for layer in layers)
        self.context = Context(self.model, n_ctx=n_ctx, n_batch=512, n_seq_max=2, hooks=self.hooks,
                               n_threads=n_threads)
        self.format = ChatFormat(self.model, template)
        self.probe = Probe(self.context, probe_tokens(self.model, self.head.probe_text) or [self.model.bos], seq=1)
        self.options = GuardOptions().updated(**options)
        self._history = _History(self.hooks, self.context.n_ctx, info.n_embd)

    @property
    def model_name(self) -> str:
        return Path(self.model.info.path).stem

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public streams ----------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, seed: int | None = None,
             repeat_penalty: float = 1.0, stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Event]:
        """Events of one guarded answer to a conversation. A final assistant message is a prefill."""
        prompt = self.format.tokens(messages)
        query, answer = split_conversation(prompt, messages)
        prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        return self._run(prompt, query, answer, prefill, sampling, max_tokens, stop, self.options.updated(**guard))

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                 top_k: int = 40, min_p: float = 0.05, seed: int | None = None, repeat_penalty: float = 1.0,
                 stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Event]:
        """Events of a guarded continuation of raw text (no chat template)."""
        tokens = PromptTokens()
        if self.model.info.add_bos:
            tokens.extend([self.model.bos], -1)
        tokens.extend(self.model.tokenize(prompt, special=False), 0)
        query = [i for i, m in enumerate(tokens.message) if m >= 0]
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        return self._run(tokens, query, [], "", sampling, max_tokens, stop, self.options.updated(**guard))

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

    # -- the loop ----------------------------------------------------------------------

    def _run(self, prompt: PromptTokens, query: list[int], answer: list[int], prefill: str,
             sampling: SamplingParams, max_tokens: int, stop: Sequence[str] | str | None,
             options: GuardOptions) -> Iterator[Event]:
        ctx = self.context
        if len(prompt) + 1 > ctx.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(prompt)} tokens; the context holds {ctx.n_ctx}")
        return _Run(self, prompt, query, answer, prefill, sampling, max_tokens, stop, options).events()


class _Run:
    """One guarded answer: the state of the loop, kept out of Guard so a Guard stays reusable."""

    def __init__(self, guard: Guard, prompt: PromptTokens, query: list[int], answer: list[int], prefill: str,
                 sampling: SamplingParams, max_tokens: int, stop: Sequence[str] | str | None, options: GuardOptions):
        self.g = guard
        self.ctx = guard.context
        self.prompt = prompt
        self.tokens = list(prompt.ids)          # every decoded token, by position
        self.query = query
        self.answer = list(answer)              # positions of answer tokens (prefill included)
        self.prefill = prefill
        self.sampler = Sampler(guard.model, sampling)
        self.max_tokens = max_tokens
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.options = options
        head = guard.head
        self.threshold = options.threshold if options.threshold is not None else head.threshold
        self.policy = Policy(options.policy, options.tau or head.tau, options.opener)
        self.window_state = WindowState()
        self.detok = Detokenizer(guard.model)
        self.text = ""
        self.checks = 0
        self.query_risk: float | None = None
        self.max_risk: float | None = None
        self.guard_s = 0.0
        self._plain_step_s: float | None = None

    # features for the heads ---------------------------------------------------------

    def _blocks(self, head: Head, pos: int, window: Sequence[int] | None, probe_row: int | None,
                rows: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The head's inputs: ``pos`` is the last token in the cache (what ``last`` reads)."""
        history = self.g._history.states
        out: dict[str, np.ndarray] = {}
        for block in head.blocks:
            if block.name == LEXICAL:
                continue  # read from the text by the head itself
            layer = block_layer(block.name)
            if layer is None:
                raise HeadError(f"this guardrail cannot compute feature block {block.name!r}")
            hook, kind = layer_name(layer), block.name.split("/", 1)[1]
            if kind == "last":
                out[block.name] = history[hook][pos]
            elif kind in ("mean", "max", "tail"):
                out[block.name] = pool(history[hook], window or [pos], kind)
            elif kind == "probe":
                if rows is None or probe_row is None:
                    raise HeadError(f"{block.name} needs a probe decode")
                out[block.name] = rows[hook][probe_row]
            else:
                raise HeadError(f"this guardrail cannot compute feature block {block.name!r}")
        return out

    def _token_risk(self, pos: int) -> float | None:
        head = self.g.token_head
        if head is None:
            return None
        start = time.perf_counter()
        text = self.g.model.detokenize(self.tokens[max(0, pos - 16):pos + 1]) if head.lexical else None
        risk = head.score_one(self._blocks(head, pos, None, None, None), text)
        self.guard_s += time.perf_counter() - start
        return risk

    def _check(self, window: list[int], last: int, probe_row: int,
               rows: Mapping[str, np.ndarray]) -> tuple[float, bool]:
        start = time.perf_counter()
        head = self.g.head
        text = self.g.model.detokenize([self.tokens[p] for p in window]) if head.lexical else None
        risk = head.score_one(self._blocks(head, last, window, probe_row, rows), text)
        self.guard_s += time.perf_counter() - start
        self.checks += 1
        self.max_risk = risk if self.max_risk is None else max(self.max_risk, risk)
        return risk, risk >= self.threshold

    # decoding -------------------------------------------------------------------------

    def _decode(self, entries: list[Entry], positions: list[int], probe: bool) -> tuple[int, Any]:
        """Decode, store the states of ``positions`` (the first entries); returns the last one's batch index."""
        start = time.perf_counter()
        result = self.ctx.decode(entries)
        elapsed = time.perf_counter() - start
        if probe and self._plain_step_s is not None:
            self.guard_s += max(0.0, elapsed - self._plain_step_s)
        elif len(entries) == 1:
            self._plain_step_s = elapsed if self._plain_step_s is None else 0.9 * self._plain_step_s + 0.1 * elapsed
        rows = result.states.rows if result.states is not None else {}
        if positions and rows:
            self.g._history.store(positions, rows, 0)
        return len(positions) - 1, rows

    def _prefill(self) -> int:
        """Decode the whole prompt, keeping every chunk's states; returns the batch index of
        its last token's logits."""
        ids = self.prompt.ids

        def keep(offset: int, result: Any) -> None:
            if result.states is not None:
                n = min(self.ctx.n_batch, len(ids) - offset)
                self.g._history.store(range(offset, offset + n), result.states.rows, 0)

        return int(prefill(self.ctx, ids, on_chunk=keep).outputs[-1])

    def _write_forced(self, text: str, pos: int, index: int) -> Iterator[TokenEvent]:
        """Decode the policy's text (the opener) as answer tokens, in one batch."""
        forced = self.g.model.tokenize(text)
        if pos + len(forced) >= self.ctx.n_ctx:
            raise ContextOverflowError("no room left in the context for the refusal opener")
        positions = list(range(pos, pos + len(forced)))
        entries = [Entry(t, p, (0,), i == len(forced) - 1) for i, (t, p) in enumerate(zip(forced, positions))]
        self.out_idx, _ = self._decode(entries, positions, probe=False)
        for t, p in zip(forced, positions):
            self.sampler.accept(t)
            self.tokens.append(t)
            self.answer.append(p)
            piece = self.detok.push(t)
            self.text += piece
            yield TokenEvent(index, t, piece, self._token_risk(p), forced=True)

    # the loop -----------------------------------------------------------------------

    def events(self) -> Iterator[Event]:
        """Each iteration samples one token and decodes it, with the probe in the same batch when a
        check is due. A token decoded with a check is held back until the verdict: if the policy
        acts on it, the token is dropped from the cache unseen and the intervention takes its place."""
        g, ctx = self.g, self.ctx
        g.probe.release()
        ctx.clear()
        started = time.perf_counter()
        yield QueryEvent(len(self.prompt), self.prefill)
        self.out_idx = self._prefill()
        pos, generated, finish = len(self.prompt), 0, "length"
        action = CONTINUE
        while True:
            if action.kind == "halt":
                self.text += action.text
                yield TokenEvent(generated, -1, action.text, None, forced=True)
                finish = "halt"
                break
            if action.kind == "insert":
                yield from self._write_forced(action.text, pos, generated)
                pos = len(self.tokens)
                action = CONTINUE
            first = self.checks == 0
            budget_left = generated < self.max_tokens
            if not (first or budget_left):
                break
            token = self.sampler.sample(ctx, self.out_idx)
            eog = g.model.is_eog(token)
            if eog and not first:
                finish = "stop"
                break
            write = budget_left and not eog
            if write and pos >= ctx.n_ctx:
                raise ContextOverflowError(f"the answer reached the end of the context ({ctx.n_ctx} tokens)")
            due = first or (self.options.schedule.due(generated) and not self.policy.intervened)
            entries = [Entry(token, pos, (0,), True)] if write else []
            window = choose_window(self.query, self.answer, self.window_state, self.options.window) if due else []
            if due:
                entries += g.probe.attach(window)
            _, rows = self._decode(entries, [pos] if write else [], probe=due)
            if due:
                g.probe.release()
                risk, malicious = self._check(window, pos - 1, len(entries) - 1, rows)
                if first:
                    self.query_risk = risk
                yield CheckEvent(generated, risk, malicious, runs(window))
                action = self._verdict(malicious)
                if action.kind != "continue":
                    yield InterventionEvent(generated, action.kind, action.text, action.reason)
                    if write:
                        ctx.seq_rm(0, pos, -1)  # the held-back token is never written
                    continue
            if eog:
                finish = "stop"
                break
            if not write:
                break
            self.out_idx = 0
            self.tokens.append(token)
            self.answer.append(pos)
            generated += 1
            piece = self.detok.push(token)
            self.text += piece
            token_risk = self._token_risk(pos)
            yield TokenEvent(generated - 1, token, piece, token_risk)
            if token_risk is not None and not self.policy.intervened and self.options.schedule.token_due(generated):
                malicious = token_risk >= g.token_head.threshold
                self.checks += 1
                self.max_risk = token_risk if self.max_risk is None else max(self.max_risk, token_risk)
                yield CheckEvent(generated, token_risk, malicious, [(pos, pos + 1)], signal="token")
                action = self._verdict(malicious)
                if action.kind != "continue":
                    yield InterventionEvent(generated, action.kind, action.text, action.reason)
            pos += 1
            if self.stops and any(s in self.text for s in self.stops):
                self.text = self.text[:min(self.text.find(s) for s in self.stops if s in self.text)]
                finish = "stop"
                break
        self.text += self.detok.flush()
        elapsed = time.perf_counter() - started
        yield DoneEvent(finish, self.text, generated, len(self.prompt), self.checks, self.policy.intervened,
                        self.query_risk, self.max_risk, elapsed, generated / elapsed if elapsed > 0 else 0.0,
                        self.guard_s)

    def _verdict(self, malicious: bool) -> Action:
        answer_len = len(self.answer)
        update_window_state(self.window_state, malicious, answer_len)
        return self.policy.on_verdict(malicious, answer_len=answer_len)
