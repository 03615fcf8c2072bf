"""A request's ``guardrail`` object: checked by the runtime's own option validation, then
against what the operator lets clients change (by default: only towards a stricter guard).

A value the guard would refuse is a 400 naming the key; a value the guard would take but
the operator does not allow is a 403 saying what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardrail.errors import OptionsError
from guardrail.runtime.options import ResolvedOptions
from guardrail.runtime.policy import POLICIES

from .config import OPTION_TYPES
from .errors import APIError, bad_request
from .protocol import GuardLike

# policies from the most lenient to the strictest: monitor never acts, halt stops at once
_POLICY_RANK = {"monitor": 0, "refuse": 1, "halt": 2}
assert set(_POLICY_RANK) == set(POLICIES), "rank every policy the runtime knows"


def _stricter(key: str, wanted: Any, base: Any) -> bool:
    if key == "policy":
        return _POLICY_RANK[wanted] >= _POLICY_RANK[base]
    if key in ("threshold", "answer_threshold", "tau"):  # a lower threshold flags more; a lower tau acts sooner
        return bool(wanted <= base)
    return bool(wanted == base)  # no order: only the operator's own value


def _allowed(key: str, old: Any) -> str:
    if key == "policy":
        order = " < ".join(sorted(POLICIES, key=_POLICY_RANK.__getitem__))
        return f"a policy at least as strict as {old!r} ({order})"
    if key in ("threshold", "answer_threshold", "tau"):
        return f"a {key} of at most {old!r}"
    return f"only its own value, {old!r}"


def request_options(given: Mapping[str, Any] | None, guard: GuardLike, rules: Mapping[str, str]) -> dict[str, Any]:
    """The guard options of a request, checked; raises a 400 or 403 :class:`APIError`.

    Both sides of a comparison are resolved options (``Guard.resolve_options``), so a
    threshold or tau the operator left to the head is compared as the head's value."""
    if not given:
        return {}
    for key, value in given.items():
        _check_value(guard, key, value)
    try:
        wanted = guard.resolve_options(**given)
    except OptionsError as exc:
        raise bad_request(f"Invalid request: guardrail: {exc}", param="guardrail") from None
    base = guard.resolve_options()
    for key in given:
        _check_rule(key, given[key], rules.get(key, "none"), wanted, base)
    return dict(given)


def _check_value(guard: GuardLike, key: str, value: Any) -> None:
    """One option's JSON type, then the runtime's own validation of it: a 400 naming the key."""
    types = OPTION_TYPES.get(key)
    if types is None:
        raise bad_request(f"Invalid request: guardrail.{key}: unknown guard option; a request may name "
                          f"{', '.join(OPTION_TYPES)}", param=f"guardrail.{key}")
    if isinstance(value, bool) or not isinstance(value, types):
        raise bad_request(f"Invalid request: guardrail.{key}: expected {' or '.join(t.__name__ for t in types)}",
                          param=f"guardrail.{key}", code="invalid_type")
    try:
        guard.resolve_options(**{key: value})
    except OptionsError as exc:
        raise bad_request(f"Invalid request: guardrail.{key}: {exc}", param=f"guardrail.{key}") from None


def _check_rule(key: str, given: Any, rule: str, wanted: ResolvedOptions, base: ResolvedOptions) -> None:
    """The operator's rule for one option: a 403 saying what is allowed when the request breaks it."""
    if rule == "any":
        return
    new, old = wanted.value(key), base.value(key)
    if new == old or (rule == "stricter" and _stricter(key, new, old)):
        return
    if rule == "stricter":
        why = f"this server lets clients only tighten the guard: {_allowed(key, old)}"
    else:
        why = f"this server does not let clients change it (it is {old!r})"
    raise APIError(403, f"guardrail.{key} = {given!r} refused: {why}.", type="permission_error",
                   param=f"guardrail.{key}", code="guard_option_forbidden")
