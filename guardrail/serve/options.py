"""A request's ``guardrail`` object: checked by the runtime's own option validation, then
against what the operator lets clients change (by default: only towards a stricter guard).

A value the guard would refuse is a 400 naming the key; a value the guard would take but
the operator does not allow is a 403 saying what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardrail.errors import OptionsError
from guardrail.runtime.policy import POLICIES

from .config import OPTION_TYPES
from .errors import APIError, bad_request

# policies from the most lenient to the strictest: monitor never acts, halt stops at once
_POLICY_RANK = {"monitor": 0, "refuse": 1, "halt": 2}
assert set(_POLICY_RANK) == set(POLICIES), "rank every policy the runtime knows"


def _effective(options: Any, head: Any, key: str) -> Any:
    """An option's value as the guard will use it (threshold and tau fall back to the head's)."""
    if key in ("r1", "r2", "r3"):
        return getattr(options.window, key)
    value = getattr(options, key)
    if value is None and key in ("threshold", "tau"):
        return getattr(head, key)
    return value


def _stricter(key: str, wanted: Any, base: Any) -> bool:
    if key == "policy":
        return _POLICY_RANK[wanted] >= _POLICY_RANK[base]
    if key in ("threshold", "tau"):  # a lower threshold flags more; a lower tau acts sooner
        return wanted <= base
    return wanted == base  # no order: only the operator's own value


def _allowed(key: str, old: Any) -> str:
    if key == "policy":
        order = " < ".join(sorted(POLICIES, key=_POLICY_RANK.__getitem__))
        return f"a policy at least as strict as {old!r} ({order})"
    if key in ("threshold", "tau"):
        return f"a {key} of at most {old!r}"
    return f"only its own value, {old!r}"


def request_options(given: Mapping[str, Any] | None, guard: Any, rules: Mapping[str, str]) -> dict[str, Any]:
    """The guard options of a request, checked; raises a 400 or 403 :class:`APIError`."""
    if not given:
        return {}
    base = guard.options
    for key, value in given.items():
        types = OPTION_TYPES.get(key)
        if types is None:
            raise bad_request(f"Invalid request: guardrail.{key}: unknown guard option; a request may name "
                              f"{', '.join(OPTION_TYPES)}", param=f"guardrail.{key}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise bad_request(f"Invalid request: guardrail.{key}: expected {' or '.join(t.__name__ for t in types)}",
                              param=f"guardrail.{key}", code="invalid_type")
        try:
            base.updated(**{key: value})
        except OptionsError as exc:
            raise bad_request(f"Invalid request: guardrail.{key}: {exc}", param=f"guardrail.{key}") from None
    try:
        wanted = base.updated(**given)
    except OptionsError as exc:
        raise bad_request(f"Invalid request: guardrail: {exc}", param="guardrail") from None
    for key in given:
        rule = rules.get(key, "none")
        if rule == "any":
            continue
        new, old = _effective(wanted, guard.head, key), _effective(base, guard.head, key)
        if new == old or (rule == "stricter" and _stricter(key, new, old)):
            continue
        if rule == "stricter":
            why = f"this server lets clients only tighten the guard: {_allowed(key, old)}"
        else:
            why = f"this server does not let clients change it (it is {old!r})"
        raise APIError(403, f"guardrail.{key} = {given[key]!r} refused: {why}.", type="permission_error",
                       param=f"guardrail.{key}", code="guard_option_forbidden")
    return dict(given)
