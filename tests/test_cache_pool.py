"""The KV budget of several slots: freed cells keep running answers exact, and retired cells never pile up."""

from __future__ import annotations

from typing import Any

from guardrail.runtime.cache import CachePool


class FakeContext:
    """Positions held per KV sequence: enough of a llama.cpp context for the pool's bookkeeping."""

    def __init__(self, n_ctx: int, n_seq_max: int):
        self.n_ctx, self.n_seq_max, self.n_batch = n_ctx, n_seq_max, 512
        self.seqs: dict[int, set[int]] = {}

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        held = self.seqs.setdefault(seq, set())
        if p0 < 0 and p1 < 0:
            held.clear()
            return
        hi = self.seq_pos_max(seq) + 1 if p1 < 0 else p1
        held.difference_update(range(max(0, p0), hi))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        # The retired sequence gets its own copy of the positions: it stands for cells, counted apart.
        self.seqs.setdefault(dst, set()).update(("r", src, p) for p in self.seqs.get(src, set()) if p0 <= p < p1)

    def seq_pos_max(self, seq: int) -> int:
        return max((p for p in self.seqs.get(seq, set()) if isinstance(p, int)), default=-1)

    def cells(self) -> int:
        return sum(len(s) for s in self.seqs.values())


class NoHistory:
    def clear(self) -> None: ...
    def truncate(self, n: int) -> None: ...
    def append(self, *a: Any, **k: Any) -> None: ...


def _answer(pool: CachePool, ctx: FakeContext, prompt: list[int], tokens: int):
    """Admit a prompt and pretend it was decoded with ``tokens`` answer tokens (None: it must wait)."""
    slot = pool.acquire(prompt, need=tokens)
    if slot is None:
        return None
    keep, _ = slot.cache.prepare(prompt)
    slot.cache.tokens = list(prompt) + [7] * tokens
    ctx.seqs.setdefault(slot.cache.seq, set()).update(range(keep, len(slot.cache.tokens)))
    return slot


def test_cells_freed_while_others_run_are_retired_and_freed_once_nothing_runs():
    ctx = FakeContext(n_ctx=4096, n_seq_max=CachePool.sequences(2))
    pool = CachePool(ctx, 2, NoHistory)  # type: ignore[arg-type]
    a = _answer(pool, ctx, [1, 2, 3] + [10] * 40, 20)
    b = _answer(pool, ctx, [1, 2, 3] + [11] * 40, 20)
    pool.release(a)
    c = _answer(pool, ctx, [1, 2, 3] + [12] * 40, 20)   # reuses a's slot while b runs: a's cells retire
    assert a is c and pool.retired == 60
    pool.release(b)
    assert pool.retired == 60                            # c still runs: its cells would be overtaken
    pool.release(c)
    assert pool.retired == 0 and ctx.seqs[pool.retired_seq] == set()


def test_retired_cells_never_outgrow_their_limit_and_no_answer_waits_for_them():
    ctx = FakeContext(n_ctx=16384, n_seq_max=CachePool.sequences(4))   # limit: 1,024 cells
    pool = CachePool(ctx, 4, NoHistory)  # type: ignore[arg-type]
    assert pool.retire_limit() == 1024
    running = [_answer(pool, ctx, [1] + [100 + i] * 300, 60) for i in range(4)]
    purged = 0
    for n in range(40):                  # one-shot conversations, as an attack suite sends them
        pool.release(running.pop(0))
        before = pool.retired
        slot = _answer(pool, ctx, [1] + [200 + n] * 300, 60)
        assert slot is not None          # retired cells never make a new answer wait
        purged += pool.retired < before
        running.append(slot)
        assert pool.retired <= pool.retire_limit()
        assert ctx.cells() <= sum(len(s.cache) for s in pool.slots) + pool.retire_limit()
    assert purged > 0                    # they were freed while answers ran, not only at the end
    for slot in running:
        pool.release(slot)
    assert pool.retired == 0
