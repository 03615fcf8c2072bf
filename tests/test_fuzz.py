"""Fuzzed boundaries (hypothesis): what a user, a client or a damaged file can hand guardrail.

- Any text a user types stays plain tokens through ChatFormat (no control token of the vocabulary,
  whatever chat markers it spells) and detokenizes back to itself; text the vocabulary cannot hold
  (a byte it has no token for, a lone surrogate) is a ContextError, never silently altered.
- A stop string is never sent, however the answer's text is cut into tokens.
- Any byte flip or truncation of a head file is a HeadError or a head that scores, never another
  exception.

Vocab-only models (no weights), so these run in the fast loop; ``tests/fuzzing.py`` sets how long.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from fuzzing import examples
from hypothesis import assume, given
from hypothesis import strategies as st

from guardrail.errors import ContextError, HeadError
from guardrail.head import load_head, save_head
from guardrail.runtime.chat import ChatFormat, special_tokens, unwritable_bytes
from guardrail.runtime.events import DoneEvent, Event, QueryEvent, TokenEvent
from guardrail.runtime.shapes import Chunks
from guardrail.serve.stream import StopHoldBack

# Chat markers of the template families llama.cpp ships, and guardrail's own sentinel's shape.
MARKERS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<|endoftext|>",
           "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
           "<end_of_turn>", "<|user|>", "<|assistant|>", "<|end|>", "<|START_OF_TURN_TOKEN|>", "<|turn>",
           "<turn|>", "\u2063GR0\u2063", "{{ bos_token }}", "{% if %}", "system\n", "assistant\n", "\n\n", " "]


def user_text(extra: list[str]) -> st.SearchStrategy[str]:
    """Text mixing chat markers (the vocabulary's own too) with arbitrary Unicode."""
    piece = st.one_of(st.sampled_from(MARKERS + extra), st.text(max_size=12),
                      st.text(st.characters(codec="utf-8"), max_size=6))
    return st.lists(piece, max_size=12).map("".join)


@pytest.fixture(scope="module")
def fuzzed_vocabs(default_vocab, corpus_vocabs):
    """The default model's vocabulary, and two families whose markers are the hard cases: Llama 3's
    control tokens, and Command-R's turn markers (user-defined tokens llama.cpp matches in plain text)."""
    return {"default": default_vocab, "llama-bpe": corpus_vocabs["llama-bpe"],
            "command-r": corpus_vocabs["command-r"]}


@pytest.mark.parametrize("family", ["default", "llama-bpe", "command-r"])
def test_any_user_text_stays_plain_tokens_and_round_trips(fuzzed_vocabs, family):
    model = fuzzed_vocabs[family]
    fmt = ChatFormat(model, None if model.info.chat_template else "chatml")
    specials = special_tokens(model)
    forbidden = set(specials)
    own = sorted({text for text in specials.values() if text.strip()})[:200]

    unwritable = set(unwritable_bytes(model))

    @examples(40)
    @given(text=user_text(own), system=user_text(own))
    def check(text: str, system: str) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        if not all(unwritable.isdisjoint(m["content"].encode()) for m in messages):
            with pytest.raises(ContextError, match="vocabulary has no token"):  # never dropped silently
                fmt.tokens(messages)
            return
        prompt = fmt.tokens(messages)
        for index, content in enumerate((system, text)):
            ids = [t for t, m in zip(prompt.ids, prompt.message) if m == index]
            assert not forbidden & set(ids), (content, sorted(forbidden & set(ids)))
            assert model.detokenize(ids) == content

    check()


def test_text_that_is_not_unicode_is_a_context_error(default_vocab):
    """A lone surrogate (JSON can carry one as an escape) cannot be encoded: one guardrail error, not a crash."""
    fmt = ChatFormat(default_vocab)

    @examples(20)
    @given(before=st.text(max_size=5), code=st.integers(0xD800, 0xDFFF))
    def check(before: str, code: int) -> None:
        with pytest.raises(ContextError, match="message 0 \\(user\\): the text is not valid Unicode"):
            fmt.tokens([{"role": "user", "content": before + chr(code)}])

    check()


# ---------------------------------------------------------------------------
# stop strings


def _guard_ends(pieces: list[str], stops: list[str]) -> tuple[int, str]:
    """What the guard does (runtime.guard): after each token, the answer ends at the earliest stop string."""
    text = ""
    for n, piece in enumerate(pieces, start=1):
        text += piece
        found = [text.find(s) for s in stops if s in text]
        if found:
            return n, text[:min(found)]
    return len(pieces), text


@examples(200)
@given(pieces=st.lists(st.text(alphabet="abc \n", max_size=4), max_size=12),
       stops=st.lists(st.text(alphabet="abc \n", min_size=1, max_size=4), min_size=1, max_size=4))
def test_a_stop_string_is_never_sent_whatever_the_chunking(pieces, stops):
    """The server's path: the guard's tokens through the hold-back, framed as chunks by the one builder."""
    n, final = _guard_ends(pieces, stops)
    events: list[Event] = [QueryEvent(3, "")]
    events += [TokenEvent(i, 100 + i, piece, None) for i, piece in enumerate(pieces[:n])]
    events.append(DoneEvent("stop", final, n, 3, 0, False, None, None, 0.1, 1.0, 0.0))
    hold, chunks = StopHoldBack(stops), Chunks("m", chat=False)
    sent, before_end = "", ""
    for event in events:
        chunk = chunks.feed(hold(event))
        if chunk is not None:
            sent += chunk["choices"][0]["text"]
            if not isinstance(event, DoneEvent):
                before_end = sent
                assert not any(s in sent for s in stops), (sent, stops)
    assert sent == final  # the whole answer arrives, and nothing past the stop
    assert final.startswith(before_end)


# ---------------------------------------------------------------------------
# head files


@pytest.fixture(scope="module")
def head_bytes(tmp_path_factory):
    from test_head import build_head

    path = tmp_path_factory.mktemp("fuzz-head") / "head.gguf"
    save_head(build_head("logreg"), path)
    return path.read_bytes()


def _loads_or_head_error(data: bytes, path) -> None:
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = load_head(path)
    except HeadError as exc:
        assert "\n" not in str(exc)
        return
    rows = {b.name: np.ones((2, b.dim), np.float32) for b in head.blocks if b.name != "lexical"}
    probability = head.score(rows, ["a text", "another"] if head.lexical is not None else None)
    assert probability.shape == (2,) and np.all((probability >= 0) & (probability <= 1)), probability


@examples(40)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_any_byte_flip_of_a_head_file_is_a_head_error_or_a_valid_head(head_bytes, tmp_path, flips):
    data = bytearray(head_bytes)
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    _loads_or_head_error(bytes(data), tmp_path / "flipped.gguf")


@examples(25)
@given(keep=st.floats(0, 1, exclude_max=True))
def test_any_truncation_of_a_head_file_is_a_head_error_or_a_valid_head(head_bytes, tmp_path, keep):
    cut = int(keep * len(head_bytes))
    assume(cut < len(head_bytes))
    _loads_or_head_error(head_bytes[:cut], tmp_path / "cut.gguf")
