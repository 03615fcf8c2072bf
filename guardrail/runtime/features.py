"""What a check reads: window pooling and probe tokens, shared by training and the loop."""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp.llama_cpp as llama_low
import numpy as np

from .chat import PromptTokens
from .engine import Model
from .probe import WindowParams, WindowState, choose_window

POOLINGS = ("last", "mean", "max", "tail")
TAIL = 16


def pool(states: np.ndarray, window: Sequence[int], kind: str) -> np.ndarray:
    """One vector for a window of token states: ``mean``; ``max`` (per dimension, so one
    salient token is not diluted by a long template); ``tail`` (mean of its last TAIL tokens)."""
    rows = states[list(window)]
    if kind == "mean":
        return rows.mean(axis=0)
    if kind == "max":
        return rows.max(axis=0)
    if kind == "tail":
        return rows[-TAIL:].mean(axis=0)
    raise ValueError(f"unknown pooling {kind!r}")


def block_layer(name: str) -> int | None:
    """The layer a feature block reads (``l_out-20/probe`` -> 20); None for text or logit blocks."""
    hook = name.split("/", 1)[0]
    if hook.startswith("l_out-") and hook[6:].isdigit() and "/" in name:
        return int(hook[6:])
    return None


EOT_PROBE = "<eot>"  # the model's own end-of-turn token: a one-token [CLS] every chat model has


def probe_tokens(model: Model, text: str) -> list[int]:
    """Token ids of a probe: our own text (markup allowed), or the end-of-turn token for ``<eot>``."""
    if text == EOT_PROBE:
        eot = llama_low.llama_vocab_eot(model.vocab)
        return [eot if eot >= 0 else llama_low.llama_vocab_eos(model.vocab)]
    return model.tokenize(text, special=True)


def split_conversation(prompt: PromptTokens, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(query positions, answer positions): content tokens, the final assistant message as answer."""
    prefill_index = len(messages) - 1 if messages[-1]["role"] == "assistant" else -2
    query = [i for i, m in enumerate(prompt.message) if m >= 0 and m != prefill_index]
    answer = [i for i, m in enumerate(prompt.message) if m == prefill_index]
    return query, answer


def check_window(query: Sequence[int], answer: Sequence[int], params: WindowParams) -> list[int]:
    """The window a check reads at this point of a conversation (the first-check rule)."""
    return choose_window(query, answer, WindowState(), params)


