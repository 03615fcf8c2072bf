"""Chat templates: the model's own Jinja template, with markup special and content plain.

Every message's content is swapped for a sentinel, the template is rendered and
cut at the sentinels: template text is tokenized with special tokens on, user
and assistant text with special tokens off, so a user typing ``<|im_end|>`` gets
plain text. ``PromptTokens.message`` says which message each token came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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

_SENTINEL = "\u2063GR{}\u2063"  # invisible separator: never in a template, survives trim


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    @classmethod
    def coerce(cls, value: Message | dict[str, Any]) -> Message:
        if isinstance(value, Message):
            return value
        role, content = value.get("role"), value.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ContextError(f"a message needs role system/user/assistant and text content: {value!r}")
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


class ChatFormat:
    """Renders messages with the model's own Jinja template, content kept out of special parsing.

    Each message's content is replaced by a sentinel, the template is rendered,
    and the result is cut at the sentinels: the template's text is tokenized
    with special tokens on, the contents with special tokens off.
    """

    def __init__(self, model: Model, template: str | None = None):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = template or model.info.chat_template
        if source in FALLBACK_TEMPLATES:
            source = FALLBACK_TEMPLATES[source]
        if source is None:
            source = FALLBACK_TEMPLATES.get(model.info.architecture)
        if source is None:
            raise ModelError(
                f"{model.info.name} has no chat template; pass one (e.g. --template chatml)")
        self.model = model
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])

        def raise_exception(message: str) -> None:
            raise ContextError(f"the chat template refused the conversation: {message}")

        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the model's chat template does not parse: {exc}") from None
        self._bos_text = model.piece(model.bos, special=True).decode("utf-8", "replace") if model.bos >= 0 else ""

    def tokens(self, messages: Sequence[Message | dict[str, Any]]) -> PromptTokens:
        """Tokens to decode before the answer. A final assistant message is a prefill: continued, not closed."""
        msgs = [Message.coerce(m) for m in messages]
        if not msgs:
            raise ContextError("a conversation needs at least one message")
        prefill = msgs[-1].role == "assistant"
        stand_ins = [{"role": m.role, "content": _SENTINEL.format(i)} for i, m in enumerate(msgs)]
        try:
            rendered = self._template.render(
                messages=stand_ins, add_generation_prompt=not prefill,
                bos_token=self._bos_text, eos_token="")
        except ContextError:
            raise
        except Exception as exc:  # a template's own error, e.g. roles out of order
            raise ContextError(f"the chat template could not render this conversation: {exc}") from None
        out = PromptTokens()
        rest = rendered
        for i, message in enumerate(msgs):
            marker = _SENTINEL.format(i)
            if rest.count(marker) != 1:
                raise ContextError("the chat template rewrites message text; guardrail cannot "
                                   "keep user text out of special-token parsing with it")
            markup, rest = rest.split(marker)
            self._add_markup(out, markup)
            out.extend(self.model.tokenize(message.content, special=False), i)
        if not prefill:
            self._add_markup(out, rest)
        if self.model.info.add_bos and (not out.ids or out.ids[0] != self.model.bos):
            out.ids.insert(0, self.model.bos)
            out.message.insert(0, -1)
        return out

    def _add_markup(self, out: PromptTokens, markup: str) -> None:
        if markup:
            out.extend(self.model.tokenize(markup, special=True), -1)


