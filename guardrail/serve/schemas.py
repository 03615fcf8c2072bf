"""Request bodies. Unknown top-level fields are ignored (OpenAI clients send many); known ones are
strict (a string where a number belongs is a 400), and fields that would change what an answer
means but are not implemented here (``tools``, ``logit_bias``, ...) are a 400 naming the field,
never silently dropped. The ``guardrail`` object is checked by the runtime's own option
validation (see :mod:`guardrail.serve.options`), not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

_STRICT = ConfigDict(strict=True, extra="ignore")


def _unsupported(value: Any, info: ValidationInfo) -> Any:
    """A field this server does not implement may be sent only with its no-op value."""
    harmless = value is None or value is False or value == [] or value == {} or value == 0 or (
        info.field_name == "tool_choice" and value == "none") or (
        info.field_name == "response_format" and value == {"type": "text"}) or (
        info.field_name in ("echo",) and value is False)
    if not harmless:
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


class ContentPart(BaseModel):
    model_config = _STRICT

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    tool_calls: Any = None
    function_call: Any = None

    _no_tools = field_validator("tool_calls", "function_call")(_unsupported)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, not {part.type!r}")
            parts.append(part.text)
        return "".join(parts)


class CommonRequest(BaseModel):
    """What chat and text completions share."""

    model_config = _STRICT

    model: str | None = None  # informational: this server serves one model
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    user: str | None = None
    guardrail: dict[str, Any] | None = None
    # not implemented: a 400 unless sent with their no-op value
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    _not_here = field_validator("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
                                "response_format", "tools", "tool_choice", "functions", "function_call")(_unsupported)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(s == "" for s in stops):
            raise ValueError("a stop string must not be empty (it would end every answer before it starts)")
        return stops or None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage") is True)

    def sampling(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The guard's sampling arguments: request fields over the server's defaults; what neither
        sets is left to the guard."""
        given = {
            "max_tokens": self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty, "seed": self.seed, "stop": self.stop,
        }
        merged = {k: v for k, v in defaults.items() if v is not None}
        merged.update({k: v for k, v in given.items() if v is not None})
        if isinstance(merged.get("stop"), str):
            merged["stop"] = [merged["stop"]]
        return merged


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    echo: Any = None
    suffix: Any = None
    best_of: int | None = None

    _not_here_either = field_validator("echo", "suffix")(_unsupported)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("best_of is not supported by this server (only 1)")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("the prompt is empty: there is nothing to continue")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextInput(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ModerationRequest(BaseModel):
    """OpenAI's moderation body: one text, a list of texts, or a list of text parts."""

    model_config = _STRICT

    input: str | list[str] | list[TextInput]
    model: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[str] | list[TextInput]) -> str | list[str] | list[TextInput]:
        if isinstance(value, list) and not value:
            raise ValueError("input is an empty list: give at least one text")
        return value

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        return [item if isinstance(item, str) else item.text for item in self.input]


# -- what the API documents about its answers (the OpenAPI schema clients and fuzzers read) --------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error object: every refusal this server gives, whatever the status."""

    error: ErrorDetail


_WHY = {400: "the request breaks a bound, a field's rules or the guard's options", 401: "no or a wrong API key",
        403: "a Host that is not the server's, or a guard option the operator does not let clients change",
        404: "no such model or path", 413: "the body is larger than max_body_bytes",
        415: "the body is not sent as application/json", 429: "the queue is full or the wait timed out",
        500: "the guard failed while answering", 503: "the guard was busy"}


def documented(*statuses: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for a route: the error statuses it may answer (as OpenAI's error object) and,
    with ``stream``, a 200 that is JSON or server-sent events."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}
    if stream:
        out[200] = {"description": "the answer: JSON, or server-sent events with stream=true",
                    "content": {"application/json": {}, "text/event-stream": {}}}
    return out
