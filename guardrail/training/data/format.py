"""The one labelled-example format: JSONL, one conversation per line.

Users bring their own data in this format (``guardrail eval --data``), so
everything read is validated and every fault names the file and line.
Label 1 means the trajectory is malicious: a harmful request, whatever the
answer so far does (complies, refuses, or has not started); 0 means benign.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrail.errors import DataError

ROLES = ("system", "user", "assistant")
REQUIRED = ("id", "source", "label", "messages")
OPTIONAL = ("variant", "origin", "meta")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """A labelled conversation; it may end with a partial assistant answer."""

    id: str
    source: str
    label: int
    messages: tuple[Message, ...]
    variant: str = "plain"
    # The id of the root request this example was derived from; all examples
    # of one origin share a split, so a variant never leaks across splits.
    origin: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        # Validated here, so an Example built in code is as sound as one read from a file.
        for key in ("id", "source"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise DataError(f"field {key!r} must be a non-empty string")
        if type(self.label) is not int or self.label not in (0, 1):
            raise DataError(f"label must be 0 (benign) or 1 (malicious), got {self.label!r}")
        if not self.messages:
            raise DataError("'messages' must be a non-empty list")
        for i, msg in enumerate(self.messages):
            if msg.role not in ROLES:
                raise DataError(f"message {i} has role {msg.role!r}; expected one of {', '.join(ROLES)}")
            if not msg.content:
                raise DataError(f"message {i} has empty content")
        if not any(m.role == "user" for m in self.messages):
            raise DataError("'messages' has no user message")
        if not self.origin:
            object.__setattr__(self, "origin", self.id)
        object.__setattr__(self, "messages", tuple(self.messages))

    @property
    def is_root(self) -> bool:
        return self.origin == self.id

    def text(self) -> str:
        """All message contents joined: the input to lexical features and dedup."""
        return "\n".join(m.content for m in self.messages)

    def request_text(self) -> str:
        """The system and user turns only: what identifies the request itself."""
        return "\n".join(m.content for m in self.messages if m.role != "assistant")

    def response_prefix(self) -> str:
        """The partial answer the conversation ends with, or "" if it ends on a request."""
        last = self.messages[-1]
        return last.content if last.role == "assistant" else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "label": self.label,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "variant": self.variant,
            "origin": self.origin,
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Any) -> Example:
        """Validate one parsed object; DataError says what is wrong (not where)."""
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}")
        for key in REQUIRED:
            if key not in obj:
                raise DataError(f"missing required field {key!r}")
        unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise DataError(f"unknown field {unknown[0]!r} (put extra information under \"meta\")")
        for key in ("variant", "origin"):
            if key in obj and not isinstance(obj[key], str):
                raise DataError(f"field {key!r} must be a string")
        if "meta" in obj and not isinstance(obj["meta"], dict):
            raise DataError("field 'meta' must be an object")
        return cls(
            id=obj["id"],
            source=obj["source"],
            label=obj["label"],
            messages=_parse_messages(obj["messages"]),
            variant=obj.get("variant") or "plain",
            origin=obj.get("origin") or "",
            meta=obj.get("meta") or {},
        )

    @classmethod
    def from_json(cls, line: str) -> Example:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"bad JSON: {exc.msg} (column {exc.colno})") from None
        return cls.from_dict(obj)


def _parse_messages(raw: Any) -> tuple[Message, ...]:
    """JSON shape only; roles and contents are checked by Example itself."""
    if not isinstance(raw, list):
        raise DataError("'messages' must be a non-empty list")
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise DataError(f"message {i} must be an object with a string 'content'")
        if not isinstance(msg.get("role"), str):
            raise DataError(f"message {i} has role {msg.get('role')!r}; expected one of {', '.join(ROLES)}")
    return tuple(Message(msg["role"], msg["content"]) for msg in raw)


def variant_family(variant: str) -> str:
    """A variant's family: "plain", "jailbreak", "rephrase", "prefix:<kind>", "form:<family or obfuscation>".
    Every report that splits by form of request groups by this, so their tables line up."""
    parts = variant.split(":")
    return ":".join(parts[:2]) if parts[0] in ("prefix", "form") else parts[0]


def read_jsonl(path: Path | str) -> list[Example]:
    """Read and validate a JSONL file; blank lines are skipped, ids must be unique."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                example = Example.from_json(line)
            except DataError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            if example.id in first_line:
                raise DataError(
                    f"{path}:{lineno}: duplicate id {example.id!r} (first on line {first_line[example.id]})")
            first_line[example.id] = lineno
            examples.append(example)
    return examples


def write_jsonl(path: Path | str, examples: Iterable[Example]) -> int:
    """Write examples atomically (a reader never sees half a file); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    count = 0
    with open(partial, "w", encoding="utf-8") as out:
        for example in examples:
            out.write(example.to_json() + "\n")
            count += 1
    os.replace(partial, path)
    return count
