"""The conversation held in KV sequence 0, token by token, with the captured states of those tokens.

A Guard keeps one between its calls, so a chat's next turn decodes only what is
new: the longest common token prefix with what the cache holds stays, the rest
is removed (``seq_rm``) and decoded. The token ids, the KV cells and the
states in the :class:`~.features.StateHistory` always describe the same
positions; any failure mid-decode empties all three rather than let them differ.
"""

from __future__ import annotations

from collections.abc import Sequence

from guardrail.errors import ContextOverflowError

from .engine import Context, DecodeResult, Entry
from .features import StateHistory

SEQ = 0  # the conversation's own KV sequence; the [CLS] probe uses 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ConversationCache:
    """Owns what sequence 0 holds; every decode that writes sequence 0 goes through it."""

    def __init__(self, context: Context, history: StateHistory):
        self.context = context
        self.history = history
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def clear(self) -> None:
        self.context.clear()
        self.history.clear()
        self.tokens = []

    def cut(self, n: int) -> None:
        """Keep positions [0, n): later cells, states and ids are dropped."""
        if n < len(self.tokens):
            self.context.seq_rm(SEQ, n, -1)
            self.history.truncate(n)
            del self.tokens[n:]

    def sync(self, ids: Sequence[int]) -> tuple[int, int]:
        """Make the cache hold exactly ``ids``, decoding only what it lacks.

        Returns (positions reused, batch index of the last token's logits). The
        last token is always decoded again, since sampling needs its logits."""
        if len(ids) + 1 > self.context.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(ids)} tokens; the context holds {self.context.n_ctx}")
        keep = min(common_prefix(self.tokens, ids), len(ids) - 1)
        self.cut(keep)
        self.context.seq_rm(1, -1, -1)  # nothing of an earlier probe survives
        out = -1
        n_batch = self.context.n_batch
        for start in range(keep, len(ids), n_batch):
            chunk = ids[start:start + n_batch]
            last = start + len(chunk) == len(ids)
            entries = [Entry(t, start + i, (SEQ,), last and i == len(chunk) - 1) for i, t in enumerate(chunk)]
            result = self.decode(entries, len(entries))
            out = int(result.outputs[-1]) if last else out
        return keep, out

    def decode(self, entries: Sequence[Entry], n_own: int) -> DecodeResult:
        """One ``llama_decode``; ``entries[:n_own]`` are the conversation's next tokens (positions
        ``len(self)`` onwards, in order), the rest belong to other sequences (the probe)."""
        for i, entry in enumerate(entries[:n_own]):
            if entry.pos != len(self.tokens) + i or SEQ not in entry.seqs:
                raise ValueError(f"batch entry {i} is not the conversation's next token")
        try:
            result = self.context.decode(entries)
        except BaseException:
            self.clear()
            raise
        if n_own:
            if result.states is not None:
                self.history.append(result.states.rows, 0, n_own)
            self.tokens.extend(e.token for e in entries[:n_own])
        return result
