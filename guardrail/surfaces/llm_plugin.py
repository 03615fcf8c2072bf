"""guardrail inside Simon Willison's ``llm`` CLI: ``llm -m guardrail-smollm2 "..."``.

A plugin (entry point group ``llm``) that registers one guarded model per known
model with a shipped head, plus any GGUF registered with ``llm guardrail
register-model``. It only consumes the Guard API: a prompt's conversation becomes
``Guard.chat`` messages, the answer's token events are streamed as text, and the
guard's outcome (query risk, checks, interventions) is the response's
``response_json``, which llm logs: the options the answer ran under (resolved by the
Guard, threshold and tau included) and the summary of the runtime's own answer
accumulator (``runtime.shapes.Answer``), the same object the server returns.

Nothing is loaded when llm starts: a model's Guard is built on its first prompt
and kept for the process (``llm chat`` reuses it every turn); per-prompt options
(policy, schedule, threshold, tau) are passed to ``Guard.chat``, so changing them
never loads the model again.
"""

from __future__ import annotations

import atexit
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import click
import llm
from pydantic import Field

from guardrail.runtime.engine import DEFAULT_MAX_TOKENS, SamplingParams

# The known models a head ships for: llm model id -> guardrail's model name.
KNOWN = {
    "guardrail-smollm2": "smollm2-135m-instruct",
    "guardrail-gemma3": "gemma3-270m",
}
ALIASES = {"guardrail-smollm2": ("guardrail",)}
REGISTRY_FILE = "guardrail-models.json"
PREFIX = "guardrail-"

# guardrail.runtime.policy.POLICIES, spelled out so that registering the plugin
# loads nothing (a test keeps the two equal).
Policy = Literal["refuse", "halt", "monitor"]


# -- one Guard per model, built on first use ---------------------------------------------

_guards: dict[tuple[str, str | None, int], Any] = {}
_lock = threading.Lock()


def guard_for(model: str, head: str | None = None, n_ctx: int = 2048) -> Any:
    """The process's Guard for a model and head, loaded the first time it is asked for."""
    key = (model, head, n_ctx)
    with _lock:
        if key not in _guards:
            from guardrail.runtime.guard import Guard

            _guards[key] = Guard(model, head, n_ctx=n_ctx)
        return _guards[key]


@atexit.register
def close_guards() -> None:
    """Free the models before the interpreter tears llama.cpp down."""
    with _lock:
        while _guards:
            _guards.popitem()[1].close()


# -- building the conversation ------------------------------------------------------------


def _text(message: Any) -> str:
    """The text parts of an llm Message (attachments are refused before this; tools are not offered)."""
    from llm.parts import TextPart

    return "".join(part.text for part in message.parts if isinstance(part, TextPart))


def build_messages(prompt: llm.Prompt, conversation: llm.Conversation | None) -> list[dict[str, str]]:
    """The chat messages for Guard.chat: the conversation's earlier turns, then this prompt.

    llm 0.32+ hands the whole chain as ``prompt.messages`` (``llm -c`` rebuilds it
    from the log); older releases only have the conversation's responses."""
    messages: list[dict[str, str]] = []
    if hasattr(prompt, "messages"):
        for message in prompt.messages:
            text = _text(message)
            if messages and messages[-1]["role"] == message.role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": message.role, "content": text})
        return messages
    system = prompt.system
    for previous in (conversation.responses if conversation else []):
        system = system or previous.prompt.system
        messages += [{"role": "user", "content": previous.prompt.prompt},
                     {"role": "assistant", "content": cast(llm.Response, previous).text_or_raise()}]
    messages.append({"role": "user", "content": prompt.prompt})
    return ([{"role": "system", "content": system}] if system else []) + messages


# -- the model -----------------------------------------------------------------------------


class GuardedModel(llm.Model):
    """A local GGUF chat model answering under guardrail's guard."""

    can_stream = True
    supports_conversation = True

    class Options(llm.Options):
        policy: Policy | None = Field(None, description="what a malicious verdict does (default refuse)")
        schedule: str | None = Field(
            None, description="when to check, a guard schedule such as every or periodic:K (default: the guard's)")
        threshold: float | None = Field(None, ge=0.0, le=1.0,
                                           description="malicious above this risk (default: the head's)")
        answer_threshold: float | None = Field(
            None, ge=0.0, le=1.0, description="the answer stage's threshold, the checks during the answer (default: "
                                             "the head's)")
        tau: int | None = Field(None, ge=1, description="consecutive malicious checks before acting mid-answer "
                                                        "(heads without an answer stage)")
        max_tokens: int | None = Field(None, ge=1, description=f"answer length limit (default {DEFAULT_MAX_TOKENS})")
        temperature: float | None = Field(
            None, ge=0.0, le=2.0, description=f"{SamplingParams.temperature:g} (default) is greedy")
        top_p: float | None = Field(
            None, gt=0.0, le=1.0, description=f"nucleus sampling (default {SamplingParams.top_p:g})")
        seed: int | None = Field(None, description="sampling seed")

    def __init__(self, model_id: str, model: str, head: str | None = None):
        self.model_id = model_id
        self.model = model
        self.head = head

    def __str__(self) -> str:
        return f"guardrail: {self.model_id}"

    def execute(self, prompt: llm.Prompt, stream: bool, response: llm.Response,
                conversation: llm.Conversation | None) -> Iterator[str]:
        from guardrail.errors import GuardrailError
        from guardrail.runtime.events import DoneEvent, TokenEvent
        from guardrail.runtime.shapes import Answer

        chosen = cast(GuardedModel.Options, prompt.options)
        messages = build_messages(prompt, conversation)
        overrides = _given(policy=chosen.policy, schedule=chosen.schedule, threshold=chosen.threshold,
                           answer_threshold=chosen.answer_threshold, tau=chosen.tau)
        sampling = _given(max_tokens=chosen.max_tokens, temperature=chosen.temperature, top_p=chosen.top_p,
                          seed=chosen.seed)
        try:
            guard = guard_for(self.model, self.head)
            resolved = guard.resolve_options(**overrides)
            events = guard.chat(messages, **sampling, **overrides)
        except GuardrailError as exc:
            raise llm.ModelError(str(exc)) from None
        answer = Answer()
        try:
            for event in events:
                answer.add(event)
                if isinstance(event, TokenEvent) and event.text:
                    yield event.text
                elif isinstance(event, DoneEvent) and answer.tail:
                    yield answer.tail  # what the detokenizer held back until the end
        except GuardrailError as exc:
            raise llm.ModelError(str(exc)) from None
        finally:
            events.close()
            response.response_json = {"guardrail": {
                "model": guard.model_name, "policy": resolved.policy, "schedule": str(resolved.schedule),
                "threshold": resolved.threshold, "answer_threshold": resolved.answer_threshold,
                "tau": resolved.tau} | answer.summary()}
            if answer.done is not None:
                response.set_usage(input=answer.done.prompt_tokens, output=answer.done.completion_tokens)


def _given(**values: Any) -> dict[str, Any]:
    """The options a prompt set (llm passes None for the rest, which the guard decides)."""
    return {k: v for k, v in values.items() if v is not None}


# -- registration --------------------------------------------------------------------------


def registry_path() -> Path:
    return llm.user_dir() / REGISTRY_FILE


def registered() -> dict[str, dict[str, str | None]]:
    """Models added with ``llm guardrail register-model``: model id -> {"model": path, "head": path|None}."""
    path = registry_path()
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, TypeError, ValueError) as exc:  # one bad file must not break every llm command
        click.echo(f"guardrail: ignoring {path}: {exc}", err=True)
        return {}


@llm.hookimpl
def register_models(register) -> None:
    for model_id, name in KNOWN.items():
        register(GuardedModel(model_id, name), aliases=ALIASES.get(model_id, ()))
    for model_id, entry in registered().items():
        register(GuardedModel(model_id, str(entry["model"]), entry.get("head")))


def registrable(model: str) -> str:
    """What the registry keeps for MODEL: a store's name as given (after checking it resolves), or a
    file's absolute path; anything else is a one-line click error."""
    from guardrail.artifacts.models import resolve_model
    from guardrail.artifacts.stores import split_spec
    from guardrail.errors import ModelError

    try:
        resolved = resolve_model(model)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    return model if split_spec(model) and not Path(model).is_file() else str(resolved.resolve())


def _default_name(model: str, kept: str) -> str:
    """``ollama:llama3.2:1b`` -> ``llama3.2-1b``; a file -> its stem."""
    if kept == model and ":" in model:
        return model.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").replace(":", "-")
    return Path(kept).stem


@llm.hookimpl
def register_commands(cli) -> None:
    @cli.group(name="guardrail")
    def guardrail_group() -> None:
        """guardrail: guarded local GGUF models (llm -m guardrail-smollm2 "...")."""

    @guardrail_group.command(name="models")
    def list_models() -> None:
        """The guarded models llm knows, with the GGUF and head each one uses."""
        for model_id, name in KNOWN.items():
            click.echo(f"{model_id}: {name} (shipped head)")
        for model_id, entry in registered().items():
            click.echo(f"{model_id}: {entry['model']} (head: {entry.get('head') or 'found by the model sha256'})")

    @guardrail_group.command(name="register-model")
    @click.argument("model")
    @click.option("--head", type=click.Path(exists=True, dir_okay=False, resolve_path=True), default=None,
                  help="a head trained for this model (default: the one found by the model's sha256)")
    @click.option("--name", default=None, help="model id suffix (default: the file's or the model's name)")
    def register_model(model: str, head: str | None, name: str | None) -> None:
        """Guard a local GGUF chat model: it becomes 'guardrail-NAME' for llm -m.

        MODEL is a GGUF path or a name in a store (ollama:NAME[:TAG], hf:ORG/REPO[/FILE],
        lmstudio:PUBLISHER/REPO[/FILE]), kept as a name so it follows what the store holds."""
        path = registrable(model)
        model_id = PREFIX + (name or _default_name(model, path)).lower()
        if model_id in KNOWN:
            raise click.ClickException(f"{model_id} is a built-in guardrail model; pick another --name")
        models = registered()
        models[model_id] = {"model": path, "head": head}  # a store's name stays a name
        registry_path().parent.mkdir(parents=True, exist_ok=True)
        registry_path().write_text(json.dumps(models, indent=2) + "\n", encoding="utf-8")
        click.echo(model_id)

    @guardrail_group.command(name="unregister-model")
    @click.argument("model_id")
    def unregister_model(model_id: str) -> None:
        """Forget a model added with register-model."""
        models = registered()
        if model_id not in models:
            raise click.ClickException(f"no registered guardrail model {model_id!r} (see: llm guardrail models)")
        del models[model_id]
        registry_path().write_text(json.dumps(models, indent=2) + "\n", encoding="utf-8")
