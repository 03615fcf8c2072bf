"""What the operator decides: limits, what clients may change, what they see, who may call.

Everything here is fixed when the server starts; a request can only ask within it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from guardrail.errors import OptionsError
from guardrail.runtime.shapes import DETAILS

#: sampling fields a server-wide default may set (a request's own fields override them)
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")

#: how far a client may move each guard option in its request's ``guardrail`` object:
#: ``any`` value, only ``stricter`` ones (equal counts), or ``none`` (a 403 if it differs)
RULES = ("any", "stricter", "none")
#: the guard options a request may name, with their JSON types (the runtime checks the values)
OPTION_TYPES: Mapping[str, tuple[type, ...]] = MappingProxyType({
    "policy": (str,), "schedule": (str,), "threshold": (int, float), "answer_threshold": (int, float),
    "tau": (int,), "opener": (str,),
    "r1": (int,), "r2": (int,), "r3": (int,)})
OPTION_KEYS = tuple(OPTION_TYPES)
STRICTER = MappingProxyType({"policy": "stricter", "threshold": "stricter", "answer_threshold": "stricter",
                             "tau": "stricter"})


def client_rules(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """The rule per guard option from ``stricter`` (the default: policy, threshold and tau
    only towards stricter, the rest fixed), ``none``, ``any``, or ``KEY=RULE,...`` over
    the default (e.g. ``threshold=any,schedule=any``)."""
    rules = dict.fromkeys(OPTION_KEYS, "none") | dict(STRICTER)
    if spec is None or spec == "stricter":
        return rules
    if spec in ("any", "none"):
        return dict.fromkeys(OPTION_KEYS, spec)
    pairs = spec.items() if isinstance(spec, Mapping) else (
        item.partition("=")[::2] for item in spec.split(",") if item.strip())
    for key, rule in pairs:
        key, rule = key.strip(), rule.strip()
        if key not in OPTION_KEYS:
            raise OptionsError(f"client options: unknown guard option {key!r}; known: {', '.join(OPTION_KEYS)}")
        if rule not in RULES:
            raise OptionsError(f"client options: {key}={rule!r}; a rule is one of {', '.join(RULES)}")
        rules[key] = rule
    return rules


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, checked before any tokenizing; over one is a 400 or 413 naming it."""

    max_body_bytes: int = 1 << 20     # the raw body, checked before it is read whole
    max_messages: int = 256           # messages in one conversation
    max_chars: int = 200_000          # characters of text in one request (all messages or inputs)
    max_stop: int = 4                 # stop strings (OpenAI's own limit)
    max_stop_chars: int = 256         # characters in one stop string
    max_inputs: int = 32              # texts in one moderation call

    def __post_init__(self) -> None:
        for f in fields(self):
            if int(getattr(self, f.name)) < 1:
                raise OptionsError(f"limit {f.name} must be at least 1")


@dataclass(frozen=True)
class ServerConfig:
    """How a server runs. ``allowed_hosts``: the host names accepted in the Host header (any port;
    a guard against DNS rebinding on a loopback server); empty means any. ``detail``: ``full``, ``summary`` or ``none``
    (see :mod:`guardrail.runtime.shapes`)."""

    api_key: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    client_options: Mapping[str, str] = field(default_factory=lambda: client_rules(None))
    detail: str = "full"
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 16             # requests waiting for the guard; one more is a 429
    queue_timeout_s: float = 60.0    # a request waiting longer gets a 429
    send_timeout_s: float = 30.0     # a streaming client that reads nothing this long loses its answer
    allowed_hosts: tuple[str, ...] = ()
    audit_log: str | None = None
    audit_text: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(SAMPLING_KEYS))
        if unknown:
            raise OptionsError(f"unknown server defaults: {', '.join(unknown)}; known: {', '.join(SAMPLING_KEYS)}")
        if self.detail not in DETAILS:
            raise OptionsError(f"detail must be one of {', '.join(DETAILS)}, not {self.detail!r}")
        bad = {k: v for k, v in self.client_options.items() if k not in OPTION_KEYS or v not in RULES}
        if bad:
            raise OptionsError(f"client options: {bad}; keys {', '.join(OPTION_KEYS)}, rules {', '.join(RULES)}")
        if self.queue_size < 0 or self.queue_timeout_s <= 0 or self.send_timeout_s <= 0:
            raise OptionsError("queue size must be >= 0 and the timeouts positive")


#: requests ``guardrail serve`` answers at once (``--parallel``), chosen by load runs on this project's 2-core
#: CPU (16 streaming clients, 32-token answers, 30 s, one process; README, "Slots and turns"): time to
#: first token at the median 8.0 s with 1 slot, 5.1 with 4, 3.6-3.7 with 8, 0.6-0.7 with 16; whole
#: requests 8.3 / 6.4-6.6 / 5.9-6.2 / 7.9-8.2 s; 49 / 57 / 61 / 56 tokens/s. 8 serves the most and
#: finishes requests soonest; 16 starts every answer at once but each then streams at 1/16th.
DEFAULT_PARALLEL = 8

#: the addresses a loopback server binds to (``--host``)
LOOPBACK_ADDRESSES = ("127.0.0.1", "localhost", "::1")
#: what a client sends in the ``Host`` header to reach a loopback server (IPv6 in brackets)
LOOPBACK_HOST_HEADERS = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(address: str) -> bool:
    """Whether a bind address is loopback (only this machine can connect)."""
    return address in LOOPBACK_ADDRESSES


def read_settings(path: str) -> dict[str, Any]:
    """Server settings from a YAML (or JSON) file, for :func:`make_config`.

    Keys: ``detail``, ``client_options`` (a rule string or a mapping), ``queue_size``,
    ``queue_timeout_s``, ``send_timeout_s``, ``allowed_hosts``, ``audit_log``, ``audit_text``,
    ``defaults`` (sampling), ``limits`` (the fields of :class:`Limits`), ``api_key``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file) or {}
    except OSError as exc:
        raise OptionsError(f"cannot read the server config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise OptionsError(f"the server config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"the server config {path} must be a mapping of settings")
    return data


def make_config(data: Mapping[str, Any] | None = None, **overrides: Any) -> ServerConfig:
    """A :class:`ServerConfig` from plain settings (a config file's, then ``overrides``)."""
    settings = dict(data or {}) | {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise OptionsError(f"unknown server setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    limits = settings.pop("limits", None) or {}
    if not isinstance(limits, Mapping):
        raise OptionsError("limits must be a mapping of limit names to numbers")
    limit_names = {f.name for f in fields(Limits)}
    if set(limits) - limit_names:
        raise OptionsError(f"unknown limit(s): {', '.join(sorted(set(limits) - limit_names))}; "
                           f"known: {', '.join(sorted(limit_names))}")
    if "client_options" in settings:
        settings["client_options"] = client_rules(settings["client_options"])
    if "allowed_hosts" in settings:
        settings["allowed_hosts"] = tuple(settings["allowed_hosts"])
    try:
        return ServerConfig(limits=Limits(**{k: int(v) for k, v in limits.items()}), **settings)
    except (TypeError, ValueError) as exc:
        raise OptionsError(f"server settings: {exc}") from None
