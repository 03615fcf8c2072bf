"""Conversations held in KV sequences, token by token, with the captured states of those tokens.

A Guard keeps its conversations between calls, so a chat's next turn decodes
only what is new: the longest common token prefix with what a slot holds stays,
the rest is removed (``seq_rm``) and decoded. A :class:`ConversationCache` owns
one KV sequence; its token ids, its KV cells and the states in its
:class:`~.features.StateHistory` always describe the same positions, and any
failure mid-decode empties all three rather than let them differ.

Several answers decode together (``Guard.chat_many``, the server's slots), so a
Guard holds a :class:`CachePool`: one cache per slot, one unified KV cache of
``n_ctx`` cells shared by all of them. The pool hands a new request the free slot
whose cached prefix is longest, and keeps the cells within budget: a request
reserves what its answer may need, idle slots give up their cells (least
recently used first) when a new request needs room, and a request that cannot
fit even in an empty cache is refused with a clear error.

Cells are freed in an order that keeps batched answers exact. llama.cpp's
attention visits a sequence's cells in the order they sit in the cache; a cell
freed below the cache's fill point while answers run is reused by the next
token of some running answer, whose cells are then out of order and whose
numbers move (by up to about one logit, measured). So while any answer runs,
the pool retires cells instead of freeing them: they pass to a sequence no
token ever reads and are freed together once nothing runs.

Retired cells cost time as well as room: llama.cpp's attention visits every cell
up to the highest one in use, masked or not, at nearly the cost of a real one on
the CPU (measured: 8 answers over 40-token prompts decode at 97 tokens/s, at 65
with 4,000 cells of another sequence below them). A long run of one-shot
conversations (an attack suite, training's answers) retires a whole conversation
at every admission, and those cells were freed only once the context filled. So
retired cells are bounded: past ``retire_limit`` they are freed while answers run
(on the attack suites this alone did not make 8 slots faster than one on a 2-core
CPU: see ``measure.attack.attack_parallel``). The running
answers' next tokens then fill cells below their own, which moves their numbers
by float rounding (up to about 0.6 of a logit, as the cache growing past a block
does), so long runs trade exactness for speed; small ones stay exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guardrail.errors import ContextOverflowError

from .capture import BatchStates
from .engine import Context, DecodeResult, Entry
from .features import StateHistory


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ConversationCache:
    """Owns what one KV sequence holds; every decode that writes that sequence goes through it."""

    def __init__(self, context: Context, history: StateHistory, seq: int = 0,
                 free: Callable[[int, int, int], None] | None = None):
        self.context = context
        self.history = history
        self.seq = seq
        self.tokens: list[int] = []
        self._free = free or context.seq_rm  # (seq, p0, p1): how cells are given back

    def __len__(self) -> int:
        return len(self.tokens)

    def clear(self) -> None:
        self._free(self.seq, -1, -1)
        self.history.clear()
        self.tokens = []

    def cut(self, n: int) -> None:
        """Keep positions [0, n): later cells, states and ids are dropped."""
        if n < len(self.tokens):
            self._free(self.seq, n, -1)
            self.history.truncate(n)
            del self.tokens[n:]

    def prepare(self, ids: Sequence[int]) -> tuple[int, list[Entry]]:
        """Cut the cache to its common prefix with ``ids``; return (positions kept, entries still to decode).

        The last token is always decoded again, since sampling needs its logits; only it is marked
        for output. So is the one before it: llama.cpp computes a batch of one token on another path
        than a prompt's batch, whose rounding parts, so a conversation sent again whole (a
        regenerated answer) would otherwise answer otherwise than the same conversation sent cold.
        On the default model two are enough (12 of 12 answers that parted came out as cold); Gemma 3
        would need 64, which every chat turn would pay (README, "A conversation sent again answers
        as it did cold")."""
        if len(ids) + 1 > self.context.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(ids)} tokens; the context holds {self.context.n_ctx}")
        keep = max(0, min(common_prefix(self.tokens, ids), len(ids) - 2))
        self.cut(keep)
        last = len(ids) - 1
        return keep, [Entry(ids[p], p, (self.seq,), p == last) for p in range(keep, len(ids))]

    def entry(self, token: int, output: bool = True) -> Entry:
        """The batch entry of the conversation's next token."""
        return Entry(token, len(self.tokens), (self.seq,), output)

    def commit(self, entries: Sequence[Entry], states: BatchStates | None) -> None:
        """Record decoded entries (the conversation's next tokens, in order) and their states
        (rows 0.. of ``states`` are these entries)."""
        for i, entry in enumerate(entries):
            if entry.pos != len(self.tokens) + i or self.seq not in entry.seqs:
                raise ValueError(f"batch entry {i} is not the next token of sequence {self.seq}")
        if not entries:
            return
        if states is not None:
            self.history.append(states.rows, 0, len(entries))
        self.tokens.extend(e.token for e in entries)

    def sync(self, ids: Sequence[int]) -> tuple[int, int]:
        """Make the cache hold exactly ``ids`` on its own, decoding only what it lacks.

        Returns (positions reused, batch index of the last token's logits)."""
        keep, entries = self.prepare(ids)
        out = -1
        n_batch = self.context.n_batch
        for start in range(0, len(entries), n_batch):
            chunk = entries[start:start + n_batch]
            result = self.decode(chunk)
            if chunk[-1].output:
                out = int(result.outputs[-1])
        return keep, out

    def decode(self, entries: Sequence[Entry]) -> DecodeResult:
        """One ``llama_decode`` of the conversation's next tokens alone."""
        try:
            result = self.context.decode(entries)
            self.commit(entries, result.states)
        except BaseException:
            self.clear()
            raise
        return result


@dataclass
class Slot:
    """One conversation's place in the shared context: its cache, its probe's sequence, its reservation."""

    index: int
    cache: ConversationCache
    probe_seq: int
    busy: bool = False
    reserved: int = 0            # cells the running answer may still need beyond what it holds
    last_used: float = field(default_factory=time.monotonic)


class CachePool:
    """The slots of one context and the budget of its ``n_ctx`` KV cells.

    ``make_history`` builds a slot's :class:`StateHistory` (every slot needs its
    own, with the head's projections tracked)."""

    def __init__(self, context: Context, n_slots: int, make_history: Callable[[], StateHistory]):
        if n_slots < 1:
            raise ValueError("a pool needs at least one slot")
        if context.n_seq_max < self.sequences(n_slots):
            raise ValueError(f"{n_slots} slots need n_seq_max >= {self.sequences(n_slots)} "
                             "(a sequence and a probe each, and one for retired cells)")
        self.context = context
        self.retired_seq = 2 * n_slots
        self.retired = 0             # cells held by retired_seq
        self.slots = [Slot(i, ConversationCache(context, make_history(), seq=i, free=self.free), probe_seq=n_slots + i)
                      for i in range(n_slots)]

    @staticmethod
    def sequences(n_slots: int) -> int:
        """KV sequences a pool of ``n_slots`` uses: one per slot, one per slot's probe, one for retired cells."""
        return 2 * n_slots + 1

    def free(self, seq: int, p0: int, p1: int) -> None:
        """Give back a sequence's cells in [p0, p1): freed at once when no other answer runs, else retired.

        (The sequence's own next cells go after the ones it keeps, as llama.cpp fills the lowest free
        cells first; only another running answer could land below its own.)"""
        if not any(s.busy for s in self.slots if seq not in (s.cache.seq, s.probe_seq)):
            self.context.seq_rm(seq, p0, p1)
            return
        before = self.context.seq_pos_max(seq) + 1
        lo = max(0, p0) if p0 >= 0 else 0
        hi = before if p1 < 0 else min(p1, before)
        if hi <= lo:
            return
        self.context.seq_cp(seq, self.retired_seq, lo, hi)
        self.context.seq_rm(seq, lo, hi)
        self.retired += hi - lo
        if self.retired > self.retire_limit():
            self.purge(force=True)

    def retire_limit(self) -> int:
        """Retired cells kept while answers run: a sixteenth of the context, at least 512 (a few
        conversations, so small batches stay exact), at most 2,048 (each costs every token of every
        running answer nearly what a real cell does)."""
        return min(2048, max(512, self.n_ctx // 16))

    def purge(self, force: bool = False) -> None:
        """Free the retired cells: once no answer runs (their order no longer matters), or now."""
        if self.retired and (force or not any(s.busy for s in self.slots)):
            self.context.seq_rm(self.retired_seq, -1, -1)
            self.retired = 0

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    def used(self) -> int:
        """Cells held or reserved: every slot's tokens, and what running answers may still add."""
        return self.retired + sum(len(s.cache) + (s.reserved if s.busy else 0) for s in self.slots)

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.busy]

    def acquire(self, ids: Sequence[int], need: int) -> Slot | None:
        """A free slot for a prompt of ``ids`` whose answer may add ``need`` cells, or None if none is
        free or the cells cannot be had while other answers run. Raises ContextOverflowError when
        the request could not fit even in an empty context."""
        if len(ids) + 1 > self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(ids)} tokens; the context holds {self.n_ctx}")
        free = self.free_slots()
        if not free:
            return None
        slot = max(free, key=lambda s: (common_prefix(s.cache.tokens, ids), s.last_used))
        keep = min(common_prefix(slot.cache.tokens, ids), len(ids) - 1)
        need = min(need, self.n_ctx - len(ids))  # an answer that reaches the end of the context stops there
        wanted = len(ids) - keep + need
        # What the chosen slot drops when it syncs is freed too.
        room = self.n_ctx - (self.used() - (len(slot.cache) - keep))
        for idle in sorted((s for s in free if s is not slot and len(s.cache)), key=lambda s: s.last_used):
            if room >= wanted:
                break
            room += len(idle.cache)
            idle.cache.clear()
        if room < wanted:
            if any(s.busy for s in self.slots):
                return None  # wait: a running answer will give its cells back
            raise ContextOverflowError(f"the request needs {wanted} KV cells; the context holds {self.n_ctx}")
        slot.busy, slot.reserved = True, need
        return slot

    def release(self, slot: Slot) -> None:
        """The slot's answer ended: its conversation stays cached for the next turn."""
        if not slot.busy:
            return
        slot.busy, slot.reserved = False, 0
        slot.last_used = time.monotonic()
        self.context.seq_rm(slot.probe_seq, -1, -1)  # a probe's own cells, if one was left attached
        self.purge()

    def clear(self) -> None:
        for slot in self.slots:
            slot.cache.clear()
        self.purge()
