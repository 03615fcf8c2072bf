"""What a check reads: the named feature blocks a head scores, from the states the capture gave.

A block is named ``l_out-<L>/<kind>``: the residual stream after layer ``L``,
reduced over the check's window by ``kind``:
- ``last``  the state of the last token in the cache (what the token signal reads);
- ``mean``  the mean state over the window's tokens;
- ``tail``  the mean of the window's last ``TAIL`` tokens, so a request wrapped in
  a long template stays in view;
- ``max``   the per-dimension max over the window;
- ``probe`` the state of the [CLS] probe's last token, decoded in its own KV
  sequence over the window (see :mod:`.probe`).

The window is what a check reads: content positions (template markers and BOS
skipped), chosen by the rules in :mod:`.probe`. Training's extraction and the
decoding loop both compute features here, from a :class:`StateHistory`, so
they cannot drift apart. A history keeps *prefix sums* of the states, so a
window's mean or tail costs O(number of runs) whatever its length; for a linear
head, :class:`LinearCheck` keeps prefix sums of each block's projection, so a
check costs a few scalar operations and every step can be checked for free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import llama_cpp.llama_cpp as llama_low
import numpy as np

from guardrail.errors import HeadError
from guardrail.head import LEXICAL, Head

from .capture import layer_name
from .chat import PromptTokens
from .engine import Model
from .probe import WindowParams, WindowState, choose_window, runs

KINDS = ("last", "mean", "tail", "max", "probe")
POOLINGS = ("last", "mean", "max", "tail")  # the kinds read from the conversation's own tokens
TAIL = 16

Runs = Sequence[tuple[int, int]]


def parse_block(name: str) -> tuple[str, str]:
    """(hook, kind) of a state block name: ``l_out-20/mean`` -> (``l_out-20``, ``mean``)."""
    hook, _, kind = name.partition("/")
    layer = hook[len("l_out-"):]
    if not (hook.startswith("l_out-") and layer.isdigit() and kind in KINDS):
        raise HeadError(f"this guardrail cannot compute feature block {name!r}")
    return hook, kind


def block_layer(name: str) -> int | None:
    """The layer a feature block reads (``l_out-20/probe`` -> 20); None for text or logit blocks."""
    try:
        return int(parse_block(name)[0][len("l_out-"):])
    except HeadError:
        return None


EOT_PROBE = "<eot>"  # the model's own end-of-turn token: a one-token [CLS] every chat model has


def probe_tokens(model: Model, text: str) -> list[int]:
    """Token ids of a probe: our own text (markup allowed), or the end-of-turn token for ``<eot>``."""
    if text == EOT_PROBE:
        eot = llama_low.llama_vocab_eot(model.vocab)
        return [eot if eot >= 0 else llama_low.llama_vocab_eos(model.vocab)]
    return model.tokenize(text, special=True)


def split_conversation(prompt: PromptTokens, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """(query positions, answer positions): content tokens, the final assistant message as answer."""
    prefill_index = len(messages) - 1 if messages[-1]["role"] == "assistant" else -2
    query = [i for i, m in enumerate(prompt.message) if m >= 0 and m != prefill_index]
    answer = [i for i, m in enumerate(prompt.message) if m == prefill_index]
    return query, answer


def first_window(query: Sequence[int], answer: Sequence[int], params: WindowParams) -> list[int]:
    """The window the first check reads (the query and the end of any prefill); never empty."""
    return choose_window(query, answer, WindowState(), params) or [max([*query, *answer, 0])]


def request_window(query_runs: Sequence[tuple[int, int]], end: int) -> Window:
    """What a probe-free query check reads: the request's content, read at position ``end - 1`` (the
    assistant's header; ``end`` is the prompt's end or a prefill's first token, since a prefill is the
    answer's start). The header token alone when the request has no content."""
    return Window(tuple(query_runs) or ((end - 1, end),), end - 1)


def tail_runs(window_runs: Runs, n: int = TAIL) -> list[tuple[int, int]]:
    """The runs of the last ``n`` positions of a window given as sorted runs."""
    out: list[tuple[int, int]] = []
    left = n
    for a, b in reversed(window_runs):
        if left <= 0:
            break
        take = min(left, b - a)
        out.append((b - take, b))
        left -= take
    return out[::-1]


def _count(window_runs: Runs) -> int:
    return sum(b - a for a, b in window_runs)


class StateHistory:
    """The captured states of every token in the KV cache, by position, as prefix sums.

    ``append`` takes the states of the next positions in order; ``truncate``
    forgets positions past a point (the cache was cut there). ``track`` adds a
    projection (a direction per hook) whose scalar prefix sums are kept too.
    With ``vectors=False`` only the tracked projections are kept (the decoding
    loop of a linear head needs nothing else).
    """

    def __init__(self, hooks: Sequence[str], n_embd: int, *, vectors: bool = True, capacity: int = 256):
        self.hooks = tuple(hooks)
        self.n_embd = n_embd
        self.n = 0
        self._capacity = capacity
        self._vectors = {h: np.zeros((capacity + 1, n_embd), np.float64) for h in self.hooks} if vectors else {}
        self._tracked: dict[str, tuple[str, np.ndarray]] = {}
        self._scalars: dict[str, np.ndarray] = {}

    @property
    def keeps_vectors(self) -> bool:
        return bool(self._vectors)

    def track(self, key: str, hook: str, direction: np.ndarray) -> None:
        """Keep prefix sums of ``direction . state(hook)`` under ``key`` (before anything is appended)."""
        if hook not in self.hooks:
            raise HeadError(f"the history does not capture {hook}")
        if self.n:
            raise RuntimeError("track projections before appending states")
        self._tracked[key] = (hook, np.asarray(direction, np.float64))
        self._scalars[key] = np.zeros(self._capacity + 1, np.float64)

    def clear(self) -> None:
        self.n = 0

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on."""
        self.n = max(0, min(self.n, n))

    def _grow(self, need: int) -> None:
        if need <= self._capacity:
            return
        capacity = max(need, 2 * self._capacity)
        for h, cum in self._vectors.items():
            grown = np.zeros((capacity + 1, self.n_embd), np.float64)
            grown[: self.n + 1] = cum[: self.n + 1]
            self._vectors[h] = grown
        for key, sums in self._scalars.items():
            longer = np.zeros(capacity + 1, np.float64)
            longer[: self.n + 1] = sums[: self.n + 1]
            self._scalars[key] = longer
        self._capacity = capacity

    def append(self, rows: Mapping[str, np.ndarray], first: int = 0, count: int | None = None) -> None:
        """Append the states of the next ``count`` positions: rows ``first..first+count`` of each hook."""
        if count is None:
            count = rows[self.hooks[0]].shape[0] - first
        if count <= 0:
            return
        n = self.n
        self._grow(n + count)
        for h in self.hooks:
            block = np.asarray(rows[h][first:first + count], np.float64)
            if h in self._vectors:
                cum = self._vectors[h]
                np.cumsum(block, axis=0, out=cum[n + 1:n + count + 1])
                cum[n + 1:n + count + 1] += cum[n]
            for key, (hook, direction) in self._tracked.items():
                if hook == h:
                    cum_s = self._scalars[key]
                    np.cumsum(block @ direction, out=cum_s[n + 1:n + count + 1])
                    cum_s[n + 1:n + count + 1] += cum_s[n]
        self.n = n + count

    def _check(self, window_runs: Runs) -> None:
        if window_runs and (window_runs[0][0] < 0 or window_runs[-1][1] > self.n):
            raise IndexError(f"window {list(window_runs)} reaches past the {self.n} positions held")

    # vectors
    def vector_sum(self, hook: str, window_runs: Runs) -> np.ndarray:
        self._check(window_runs)
        cum = self._vectors[hook]
        total = np.zeros(self.n_embd, np.float64)
        for a, b in window_runs:
            total += cum[b] - cum[a]
        return total

    def states(self, hook: str, positions: Sequence[int]) -> np.ndarray:
        """The states at given positions (recovered from the prefix sums), float32 (k, d)."""
        cum = self._vectors[hook]
        idx = np.asarray(positions, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"positions outside the {self.n} held")
        return (cum[idx + 1] - cum[idx]).astype(np.float32)

    # tracked projections
    def scalar_sum(self, key: str, window_runs: Runs) -> float:
        self._check(window_runs)
        cum = self._scalars[key]
        return float(sum(cum[b] - cum[a] for a, b in window_runs))


@dataclass(frozen=True)
class Window:
    """What one check reads: the window's positions (as runs) and the last token in the cache."""

    runs: tuple[tuple[int, int], ...]
    last: int

    @classmethod
    def of(cls, positions: Sequence[int], last: int) -> Window:
        return cls(tuple(runs(positions)), last)

    @property
    def size(self) -> int:
        return _count(self.runs)


def check_features(blocks: Sequence[str], history: StateHistory, window: Window,
                   probe: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The head's state blocks for one check, as float32 vectors: THE feature function.

    ``probe`` maps hook -> the probe's last-token state, for ``probe`` blocks."""
    out: dict[str, np.ndarray] = {}
    for name in blocks:
        hook, kind = parse_block(name)
        if kind == "probe":
            if probe is None or hook not in probe:
                raise HeadError(f"{name} needs a probe decode")
            out[name] = np.asarray(probe[hook], np.float32)
        elif kind == "last":
            out[name] = history.states(hook, [window.last])[0]
        elif kind == "mean":
            out[name] = (history.vector_sum(hook, window.runs) / max(1, window.size)).astype(np.float32)
        elif kind == "tail":
            tail = tail_runs(window.runs)
            out[name] = (history.vector_sum(hook, tail) / max(1, _count(tail))).astype(np.float32)
        else:  # max
            positions = [p for a, b in window.runs for p in range(a, b)] or [window.last]
            out[name] = history.states(hook, positions).max(axis=0)
    return out


class LinearCheck:
    """A linear head's logit read from tracked projections: one dot product per block and token,
    a few scalar operations per check. Equal to scoring :func:`check_features` (a test holds it)."""

    def __init__(self, terms: Sequence[tuple[str, np.ndarray]], bias: float, history: StateHistory):
        """``terms``: (block name, direction) with logit = bias + sum(direction . block)."""
        self.bias = float(bias)
        self.history = history
        self._terms: list[tuple[str, str, str, np.ndarray]] = []  # (tracked key, hook, kind, direction)
        for name, direction in terms:
            hook, kind = parse_block(name)
            if kind == "max":
                raise HeadError(f"{name}: a max-pooled block is not linear in the states")
            key = f"{id(self)}:{name}"  # several heads may read the same block with other weights
            if kind != "probe":
                history.track(key, hook, direction)
            self._terms.append((key, hook, kind, np.asarray(direction, np.float64)))

    @property
    def needs_probe(self) -> bool:
        return any(kind == "probe" for _, _, kind, _ in self._terms)

    def logit(self, window: Window, probe: Mapping[str, np.ndarray] | None = None) -> float:
        total = self.bias
        tail = None
        for name, hook, kind, direction in self._terms:
            if kind == "probe":
                if probe is None or hook not in probe:
                    raise HeadError(f"{name} needs a probe decode")
                total += float(np.asarray(probe[hook], np.float64) @ direction)
            elif kind == "last":
                total += self.history.scalar_sum(name, [(window.last, window.last + 1)])
            elif kind == "mean":
                total += self.history.scalar_sum(name, window.runs) / max(1, window.size)
            else:  # tail
                tail = tail if tail is not None else tail_runs(window.runs)
                total += self.history.scalar_sum(name, tail) / max(1, _count(tail))
        return total


def hooks_of(blocks: Sequence[str]) -> tuple[str, ...]:
    """The hook points a set of blocks reads, in layer order."""
    layers = sorted({layer for layer in (block_layer(b) for b in blocks) if layer is not None})
    return tuple(layer_name(layer) for layer in layers)


class HeadReader:
    """One head's probability for a window of the conversation held in a :class:`StateHistory`.

    A head linear in its state blocks reads tracked projections (:class:`LinearCheck`);
    any other (an MLP, text features, max pooling) reads :func:`check_features`, which
    needs a history that keeps vectors."""

    def __init__(self, head: Head, history: StateHistory, text_of: Callable[[Window], str] | None = None):
        self.head = head
        self.history = history
        self._text_of = text_of
        self._state_blocks = [b.name for b in head.blocks if b.name != LEXICAL]
        for name in self._state_blocks:
            parse_block(name)  # a block this guardrail cannot compute fails here, at load
        terms = head.linear_terms()
        self._linear = None
        if terms is not None and not any(parse_block(n)[1] == "max" for n, _ in terms[0]):
            self._linear = LinearCheck(terms[0], terms[1], history)
        elif not history.keeps_vectors:
            raise HeadError("this head needs the states themselves; build the history with vectors=True")

    @staticmethod
    def is_linear(head: Head) -> bool:
        terms = head.linear_terms()
        return terms is not None and not any(parse_block(n)[1] == "max" for n, _ in terms[0])

    @property
    def needs_probe(self) -> bool:
        return any(parse_block(n)[1] == "probe" for n in self._state_blocks)

    def risk(self, window: Window, probe: Mapping[str, np.ndarray] | None = None) -> float:
        if self._linear is not None:
            return self.head.probability(self._linear.logit(window, probe))
        features = check_features(self._state_blocks, self.history, window, probe)
        text = self._text_of(window) if (self.head.lexical is not None and self._text_of) else None
        return self.head.score_one(features, text)
