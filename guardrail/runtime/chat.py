"""Chat templates: the model's own Jinja template, with markup special and content plain.

Every message's content is swapped for a sentinel, the template is rendered and
cut at the sentinels: template text is tokenized with special tokens on, user
and assistant text so that no special token can come out of it, so a user
typing ``<|im_end|>`` gets plain text. ``PromptTokens.message`` says which
message each token came from.

The Jinja environment is the one Hugging Face's ``apply_chat_template`` gives
templates (sandboxed, ``tojson``, ``raise_exception``, ``strftime_now``,
``{% generation %}``), so templates written for it render the same here.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as llama_low

from guardrail.errors import ContextError, ModelError

from .engine import Model

# Used when a GGUF carries no template (Gemma 3 base does not): by architecture.
FALLBACK_TEMPLATES = {
    "gemma3": (
        "{{ bos_token }}{% for m in messages %}"
        "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
FALLBACK_TEMPLATES["gemma"] = FALLBACK_TEMPLATES["gemma3"]

# Invisible separators around the message's index: never in a template, survive trim.
_SENTINEL = "\u2063GR{}\u2063"
_SENTINEL_RE = re.compile("\u2063GR([0-9]+)\u2063")
# User-defined tokens that are ordinary text, not markup: Gemma's HTML tags (<table>, </td>).
_HTML_TAG = re.compile(r"</?[a-z][a-z0-9]*>")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    @classmethod
    def coerce(cls, value: Message | Mapping[str, Any]) -> Message:
        if isinstance(value, Message):
            return value
        if not isinstance(value, Mapping):
            raise ContextError(f"a message is an object with a role and content, not {type(value).__name__}")
        role, content = value.get("role"), value.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ContextError(f"a message needs role system/user/assistant and text content: {value!r:.200}")
        return cls(role, content)


@dataclass
class PromptTokens:
    """Token ids of a rendered conversation, with where each came from.

    ``message[i]`` is the index of the message whose content token ``i`` is,
    or -1 for template markup (markers, BOS): the probe's windows skip those.
    """

    ids: list[int] = field(default_factory=list)
    message: list[int] = field(default_factory=list)

    def extend(self, ids: Sequence[int], message: int) -> None:
        self.ids.extend(ids)
        self.message.extend([message] * len(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, limit: int) -> PromptTokens:
        """At most ``limit`` tokens: the start (BOS, system) and the end (the latest text, the open turn)
        of an over-long prompt, for training jobs that cap what they decode."""
        if len(self) <= limit:
            return self
        keep_head = min(64, limit // 4)
        keep_tail = limit - keep_head
        return PromptTokens(self.ids[:keep_head] + self.ids[-keep_tail:],
                            self.message[:keep_head] + self.message[-keep_tail:])


_SPECIALS: weakref.WeakKeyDictionary[Model, dict[int, str]] = weakref.WeakKeyDictionary()


def special_tokens(model: Model) -> dict[int, str]:
    """The tokens text a person writes must never become, by id: the vocabulary's markup.

    Control and unknown-type tokens, end-of-generation and the vocabulary's
    bos/eos/eot/pad/sep tokens, and user-defined tokens that are markup
    (``<|START_OF_TURN_TOKEN|>``, ``<|tool_call>``), not text (whitespace runs,
    single characters, HTML tags). Read once per model (a scan of the vocabulary).
    """
    cached = _SPECIALS.get(model)
    if cached is not None:
        return dict(cached)
    vocab = model.vocab
    named = {llama_low.llama_vocab_bos(vocab), llama_low.llama_vocab_eos(vocab), llama_low.llama_vocab_eot(vocab),
             llama_low.llama_vocab_pad(vocab), llama_low.llama_vocab_sep(vocab)}
    marked = llama_low.LLAMA_TOKEN_ATTR_CONTROL | llama_low.LLAMA_TOKEN_ATTR_UNKNOWN
    user = llama_low.LLAMA_TOKEN_ATTR_USER_DEFINED
    out: dict[int, str] = {}
    for token in range(model.info.n_vocab):
        attr = llama_low.llama_vocab_get_attr(vocab, token)
        always = bool(attr & marked) or token in named or model.is_eog(token)
        if not (always or attr & user):
            continue
        text = (llama_low.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")
        if always:
            out[token] = text
        elif len(text.strip()) > 1 and not _HTML_TAG.fullmatch(text):
            out[token] = text
    _SPECIALS[model] = out
    return dict(out)


_UNWRITABLE: weakref.WeakKeyDictionary[Model, bytes] = weakref.WeakKeyDictionary()


def _byte_samples() -> dict[int, str]:
    """One character per byte value UTF-8 can hold, the byte in its encoding (0xc0, 0xc1, 0xf5-0xff never are)."""
    samples = {b: chr(b) for b in range(0x80)} | {0x80 + i: chr(0x80 + i) for i in range(0x40)}  # c2 80..bf
    for code in range(0x80, 0x110000, 0x40):
        if not 0xD800 <= code <= 0xDFFF:
            samples.setdefault(chr(code).encode("utf-8")[0], chr(code))
    return samples


_BYTE_SAMPLES = _byte_samples()


def unwritable_bytes(model: Model) -> bytes:
    """The bytes a byte-level BPE vocabulary has no token for (SmolLM2's has none for 0x04, 0x06, 0x13,
    0x14, 0x16, 0x1d, 0xf1 and 0xf2): llama.cpp drops them from text without a word, so text holding one
    would reach the model altered. Found by tokenizing one character per byte value (256 calls, once per
    model); empty for other vocabularies (they fall back to their unknown token, which plain text never
    becomes)."""
    cached = _UNWRITABLE.get(model)
    if cached is not None:
        return cached
    missing = bytearray()
    if llama_low.llama_vocab_type(model.vocab) == llama_low.LLAMA_VOCAB_TYPE_BPE:
        for byte, char in sorted(_BYTE_SAMPLES.items()):
            got = b"".join(model.piece(t) for t in model.tokenize(char))
            if got != char.encode("utf-8") and byte not in got:
                missing.append(byte)
    _UNWRITABLE[model] = bytes(missing)
    return bytes(missing)


class PlainText:
    """Tokenizes text a person wrote so that no special token comes out of it.

    ``special=False`` already keeps control tokens out, but llama.cpp still
    matches user-defined tokens in plain text, and some vocabularies declare
    their turn markers that way (Command-R's ``<|START_OF_TURN_TOKEN|>``):
    those are found first and tokenized in pieces too small to match.
    """

    def __init__(self, model: Model, specials: dict[int, str] | None = None):
        self.model = model
        specials = special_tokens(model) if specials is None else specials
        self.special_ids = frozenset(specials)
        user = llama_low.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = {text for token, text in specials.items()
                 if text and llama_low.llama_vocab_get_attr(model.vocab, token) & user}
        self._pattern = _trie_pattern(texts) if texts else None
        self._unwritable = unwritable_bytes(model)

    def tokenize(self, text: str) -> list[int]:
        """The text's tokens; a ContextError when the model cannot read it as written."""
        self._check(text)
        ids = self._tokenize(text)
        if self.special_ids.isdisjoint(ids):
            return ids
        # Not seen in any of llama.cpp's tokenizer families; kept so the promise holds for any vocabulary.
        return [token for char in text for token in self.model.tokenize(char, special=False)]

    def _check(self, text: str) -> None:
        """Text the vocabulary can hold as written: valid Unicode, no byte it would drop."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ContextError(f"the text is not valid Unicode ({exc.reason} at character {exc.start})") from None
        if self._unwritable and len(data.translate(None, self._unwritable)) != len(data):
            char = next(c for c in text if not set(c.encode("utf-8")).isdisjoint(self._unwritable))
            raise ContextError(f"the text holds U+{ord(char):04X}, which this model's vocabulary has no token "
                               "for (llama.cpp would drop it without a word)")

    def _tokenize(self, text: str) -> list[int]:
        if self._pattern is None or self._pattern.search(text) is None:
            return self.model.tokenize(text, special=False)
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            ids += self.model.tokenize(text[start:match.start()], special=False) if match.start() > start else []
            ids += self._split(match.group())
            start = match.end()
        if start < len(text):
            ids += self.model.tokenize(text[start:], special=False)
        return ids

    def _split(self, text: str) -> list[int]:
        """A special token's text, as plain-text tokens: halves until none is special."""
        ids = self.model.tokenize(text, special=False)
        if len(text) < 2 or not self.special_ids.intersection(ids):
            return ids
        middle = len(text) // 2
        return self._split(text[:middle]) + self._split(text[middle:])


def _trie_pattern(words: set[str]) -> re.Pattern[str]:
    """A regex matching any of ``words`` (longest first), as a prefix tree: thousands of
    ``[PAD123]`` tokens cost a few steps per character, not one per word."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return "" if not branches else f"(?:{body})?" if "" in node else body

    return re.compile(build(trie))


def split_at_sentinels(rendered: str, count: int) -> list[tuple[str, int]] | None:
    """The rendered text cut at the ``count`` sentinels, in one pass.

    ``(markup before it, message index)`` for each sentinel in rendered order
    (a template may move a message: Mistral puts the system prompt in the last
    user turn), then ``(markup after the last, -1)``. None unless every
    message appears exactly once.
    """
    pieces: list[tuple[str, int]] = []
    seen = [False] * count
    start = 0
    for match in _SENTINEL_RE.finditer(rendered):
        index = int(match.group(1))
        if index >= count or seen[index]:
            return None
        seen[index] = True
        pieces.append((rendered[start:match.start()], index))
        start = match.end()
    if len(pieces) != count:
        return None
    pieces.append((rendered[start:], -1))
    return pieces


def _environment() -> Any:
    """Hugging Face's chat-template environment: sandboxed, immutable, with its helpers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training): rendered as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class ChatFormat:
    """Renders messages with the model's own Jinja template, content kept out of special parsing.

    ``template``: None (the model's own, else a built-in by architecture), a
    built-in's name (``chatml``, ``gemma3``), a path to a ``.jinja`` file, or
    Jinja source. ``name`` labels the template in errors.
    """

    def __init__(self, model: Model, template: str | os.PathLike[str] | None = None, *, name: str | None = None):
        import jinja2

        source, label = self._resolve(model, template)
        self.name = name or label
        self.model = model
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the chat template {self.name} does not parse: {_reason(exc)}") from None
        specials = special_tokens(model)
        self.plain = PlainText(model, specials)
        self._bos_text = specials.get(model.bos, "")
        eos = llama_low.llama_vocab_eos(model.vocab)
        self._eos_text = specials.get(eos, "")
        self._markup: dict[str, list[int]] = {}

    @staticmethod
    def _resolve(model: Model, template: str | os.PathLike[str] | None) -> tuple[str, str]:
        if template is None:
            if model.info.chat_template:
                return model.info.chat_template, f"of {model.info.name}"
            fallback = FALLBACK_TEMPLATES.get(model.info.architecture)
            if fallback is None:
                raise ModelError(f"{model.info.name} has no chat template; pass one (e.g. template='chatml')")
            return fallback, f"{model.info.architecture} (built in)"
        if isinstance(template, str) and template in FALLBACK_TEMPLATES:
            return FALLBACK_TEMPLATES[template], f"{template} (built in)"
        if isinstance(template, os.PathLike) or (isinstance(template, str) and "{" not in template):
            path = Path(template).expanduser()
            if not path.is_file():
                raise ModelError(f"chat template not found: {path} (built in: {', '.join(FALLBACK_TEMPLATES)})")
            try:
                return path.read_text(encoding="utf-8"), path.name
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelError(f"could not read the chat template {path}: {exc}") from None
        return str(template), "given"

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The template's text for these messages; a template's refusal is a ContextError naming it."""
        try:
            rendered: str = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                  bos_token=self._bos_text, eos_token=self._eos_text, tools=None)
            return rendered
        except Exception as exc:  # the template's own error (raise_exception, roles out of order, ...)
            raise ContextError(f"the chat template {self.name} could not render this conversation: "
                               f"{_reason(exc)}") from None

    def tokens(self, messages: Sequence[Message | dict[str, Any]]) -> PromptTokens:
        """Tokens to decode before the answer. A final assistant message is a prefill: continued, not closed."""
        msgs = [Message.coerce(m) for m in messages]
        if not msgs:
            raise ContextError("a conversation needs at least one message")
        prefill = msgs[-1].role == "assistant"
        stand_ins = [{"role": m.role, "content": _SENTINEL.format(i)} for i, m in enumerate(msgs)]
        rendered = self.render(stand_ins, add_generation_prompt=not prefill)
        pieces = split_at_sentinels(rendered, len(msgs))
        if pieces is None:
            raise ContextError(f"the chat template {self.name} {_mangled(rendered, msgs)}; guardrail needs each "
                               "message's text once, as is, to keep it out of special-token parsing")
        if prefill and pieces[-2][1] != len(msgs) - 1:
            raise ContextError(f"the chat template {self.name} does not end with the final assistant message, "
                               "so it cannot be continued as a prefill")
        out = PromptTokens()
        contents: dict[str, list[int]] = {}  # a conversation often repeats itself; tokenizing is ~10-100 us a call
        for markup, index in pieces[:-1]:
            self._add_markup(out, markup)
            text = msgs[index].content
            if text not in contents:
                try:
                    contents[text] = self.plain.tokenize(text)
                except ContextError as exc:
                    raise ContextError(f"message {index} ({msgs[index].role}): {exc}") from None
            out.extend(contents[text], index)
        if not prefill:
            self._add_markup(out, pieces[-1][0])
        if self.model.info.add_bos and (not out.ids or out.ids[0] != self.model.bos):
            out.ids.insert(0, self.model.bos)
            out.message.insert(0, -1)
        return out

    def _add_markup(self, out: PromptTokens, markup: str) -> None:
        if not markup:
            return
        ids = self._markup.get(markup)
        if ids is None:
            if len(self._markup) >= 512:  # a template's markup takes few forms; bound it anyway
                self._markup.clear()
            ids = self._markup[markup] = self.model.tokenize(markup, special=True)
        out.extend(ids, -1)


def _mangled(rendered: str, msgs: Sequence[Message]) -> str:
    """What a template did to the messages' text (for the error when the split fails)."""
    found = [int(m.group(1)) for m in _SENTINEL_RE.finditer(rendered)]
    for i, message in enumerate(msgs):
        if found.count(i) != 1:
            verb = "leaves out or rewrites" if i not in found else "repeats"
            return f"{verb} message {i} ({message.role})"
    return "reorders the messages"


def _reason(exc: Exception) -> str:
    """An exception as one line: its message, else its type."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__
