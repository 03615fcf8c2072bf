"""The [CLS] probe: a few fixed tokens that re-read a chosen window of the conversation.

The probe lives in its own KV-cache sequence. ``llama_memory_seq_cp`` gives that
sequence the conversation's cells of the window (shared, not copied), the probe
tokens are decoded into it, and ``seq_rm`` drops them after. Ordinary tokens
never attend to the probe; the probe attends to exactly the window. Its tokens
may ride in the same ``llama_decode`` batch as the next answer token.

The window rules are the paper's strategic attention (r1, r2, r3), with one
measured change: the query is always part of the window (a small frozen model's
answer alone does not carry the decision; see README, "Which signal does what").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .engine import Context, Entry

DEFAULT_PROBE_TEXT = "\nIs this request harmful?"


@dataclass(frozen=True)
class WindowParams:
    """r1: answer tokens read after a malicious first verdict; r2: latest answer tokens
    read while benign; r3: tokens read past a benign->malicious switch."""

    r1: int = 10
    r2: int = 10
    r3: int = 10
    keep_query: bool = True


@dataclass
class WindowState:
    """What the window rules remember between checks of one answer."""

    query_malicious: bool | None = None
    switch_at: int | None = None  # answer index of the check that first said malicious


def choose_window(query: Sequence[int], answer: Sequence[int], state: WindowState,
                  params: WindowParams) -> list[int]:
    """Positions the next check reads. ``query``: content positions of the prompt
    (markers and BOS already skipped); ``answer``: positions of answer tokens so far."""
    head = list(query) if params.keep_query else []
    n = len(answer)
    if state.query_malicious is None:  # the first check: the query and any prefill
        return list(query) + list(answer[max(0, n - params.r2):])
    if state.query_malicious:
        return list(query) + list(answer[: params.r1])
    if state.switch_at is not None:
        lo = max(0, state.switch_at - params.r2)
        hi = min(n, state.switch_at + params.r3 + 1)
        return head + list(answer[lo:hi])
    return (head + list(answer[max(0, n - params.r2):])) or list(query)


def window_runs(query_runs: Sequence[tuple[int, int]], answer: Sequence[int], state: WindowState,
                params: WindowParams) -> list[tuple[int, int]]:
    """:func:`choose_window` as runs, in time that grows with the answer tokens read, not the query:
    the query's runs are computed once per answer, and every answer position comes after them."""
    n = len(answer)
    if state.query_malicious is None:
        lo, hi, keep = max(0, n - params.r2), n, True
    elif state.query_malicious:
        lo, hi, keep = 0, min(n, params.r1), True
    elif state.switch_at is not None:
        lo, hi, keep = max(0, state.switch_at - params.r2), min(n, state.switch_at + params.r3 + 1), params.keep_query
    else:
        lo, hi, keep = max(0, n - params.r2), n, params.keep_query
    out = list(query_runs) if keep else []
    for p in answer[lo:hi]:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    if not out and state.query_malicious is not None and state.switch_at is None:
        return list(query_runs)
    return out


@dataclass(frozen=True)
class AnswerWindow:
    """What an answer-stage head reads: the latest ``recent`` answer tokens (a prefill counts as
    answer), and the query's content tokens too when ``query``. An answer check reads the answer
    it is judging, not the request the query check already judged."""

    recent: int = 32
    query: bool = False

    def runs(self, query_runs: Sequence[tuple[int, int]], answer_start: int, end: int) -> list[tuple[int, int]]:
        """The window when the answer holds positions [answer_start, end)."""
        lo = max(answer_start, end - self.recent)
        own = [(lo, end)] if end > lo else []
        if not self.query:
            return own
        out = list(query_runs)
        if out and own and out[-1][1] == own[0][0]:
            return out[:-1] + [(out[-1][0], own[0][1])]
        return out + own

    def over_prefill(self, query_runs: Sequence[tuple[int, int]],
                     positions: Sequence[int]) -> list[tuple[list[tuple[int, int]], int]]:
        """(window, last position) of the prefill check's read at each of a prefill's ``positions``:
        each token read as if it had just been written. The loop and training's replay both call it."""
        return [(self.runs(query_runs, positions[0], p + 1), p) for p in positions]


def update_window_state(state: WindowState, malicious: bool, answer_len: int) -> None:
    """Record a check's verdict: the first sets the branch; later ones open or close a switch."""
    if state.query_malicious is None:
        state.query_malicious = malicious
    elif not state.query_malicious:
        if malicious and state.switch_at is None:
            state.switch_at = answer_len
        elif not malicious and state.switch_at is not None:
            state.switch_at = None  # a false trigger: back to the benign rule


def runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions as half-open runs [a, b), for seq_cp calls."""
    out: list[tuple[int, int]] = []
    for p in sorted(set(positions)):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


@dataclass
class Probe:
    """Places probe tokens in sequence ``seq`` over a window of sequence ``src``."""

    context: Context
    tokens: Sequence[int]
    seq: int = 1
    src: int = 0
    free: Callable[[int, int, int], None] | None = None  # how the probe's cells are given back
    _active: bool = field(default=False, init=False)
    _start: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a probe needs at least one token")
        if self.seq >= self.context.n_seq_max:
            raise ValueError(f"probe sequence {self.seq} needs n_seq_max > {self.seq}")

    def attach(self, spans: Sequence[tuple[int, int]]) -> list[Entry]:
        """Share the window's cells (sorted [start, end) runs) with the probe sequence; return the
        probe's batch entries.

        The probe's positions continue right after the window's last cell, as llama.cpp
        requires of each sequence; the last probe token has output on.
        """
        self.release()
        if not spans:
            raise ValueError("an empty window")
        for a, b in spans:
            self.context.seq_cp(self.src, self.seq, a, b)
        self._active = True
        start = self._start = spans[-1][1]
        last = len(self.tokens) - 1
        return [Entry(t, start + i, (self.seq,), i == last) for i, t in enumerate(self.tokens)]

    def release(self) -> None:
        """Drop the probe's own cells and its share of the window (the conversation keeps them)."""
        if self._active:
            if self.free is not None:
                self.free(self.seq, self._start, -1)  # the probe's own cells
            self.context.seq_rm(self.seq, -1, -1)     # its share of the window (the conversation keeps them)
            self._active = False
