"""The server's guard interface binds the real Guard and the test double alike, and the stop-string
hold-back sends exactly the text before the first stop string."""

from __future__ import annotations

import inspect
import typing

import pytest
from fake_guard import FakeGuard

from guardrail.serve.protocol import GuardLike
from guardrail.serve.stream import StopHoldBack

_KINDS = inspect.Parameter


def _members(protocol) -> set[str]:
    attrs = getattr(protocol, "__protocol_attrs__", None)
    return set(attrs) if attrs is not None else set(typing._get_protocol_attrs(protocol))  # type: ignore[attr-defined]


def _signature_problems(name: str, wanted, given) -> list[str]:
    want, have = inspect.signature(wanted), inspect.signature(given)
    params = {n: p for n, p in have.parameters.items() if n != "self"}
    takes_kwargs = any(p.kind is _KINDS.VAR_KEYWORD for p in params.values())
    problems = []
    for pname, p in want.parameters.items():
        if pname == "self":
            continue
        if p.kind is _KINDS.VAR_KEYWORD:
            if not takes_kwargs:
                problems.append(f"{name}() takes no **{pname}")
            continue
        mine = params.get(pname)
        if mine is None:  # named, not swallowed by **kwargs: a renamed argument would be
            problems.append(f"{name}() has no parameter {pname!r}")
            continue
        positional = (_KINDS.POSITIONAL_ONLY, _KINDS.POSITIONAL_OR_KEYWORD)
        if (p.kind in positional) != (mine.kind in positional):
            problems.append(f"{name}() takes {pname!r} as {mine.kind.description}, not {p.kind.description}")
        if p.default is not _KINDS.empty and mine.default is _KINDS.empty:
            problems.append(f"{name}() requires {pname!r}")
    for pname, mine in params.items():
        required = mine.default is _KINDS.empty and mine.kind not in (_KINDS.VAR_KEYWORD, _KINDS.VAR_POSITIONAL)
        if required and pname not in want.parameters:
            problems.append(f"{name}() requires {pname!r}, which the server never passes")
    return problems


def conformance(guard) -> list[str]:
    """How ``guard`` falls short of what the server calls ([] when it does not)."""
    problems = []
    for name in sorted(_members(GuardLike)):
        if not hasattr(guard, name):
            problems.append(f"no {name}")
            continue
        wanted = getattr(GuardLike, name, None)  # None: an annotated attribute
        if callable(wanted) and not isinstance(inspect.getattr_static(GuardLike, name), property):
            problems += _signature_problems(name, wanted, getattr(guard, name))
    for name in ("threshold", "tau"):
        if not hasattr(getattr(guard, "head", None), name):
            problems.append(f"no head.{name}")
    if not callable(getattr(getattr(guard, "options", None), "updated", None)):
        problems.append("no options.updated()")
    return problems


def test_the_fake_guard_is_what_the_server_calls():
    fake = FakeGuard()
    assert conformance(fake) == [] and isinstance(fake, GuardLike)


@pytest.mark.slow
def test_the_real_guard_is_what_the_server_calls(model_path):
    from guardrail import Guard

    with Guard(str(model_path), n_ctx=256) as guard:
        assert conformance(guard) == []
        assert isinstance(guard, GuardLike)


def test_the_conformance_check_sees_drift():
    class Drifted:
        model_name, n_ctx = "drifted", 64
        head, options = FakeGuard().head, FakeGuard().options

        def chat(self, messages, *, max_new_tokens=256, temperature=0.0, top_p=0.95, top_k=40, min_p=0.05,
                 seed=None, repeat_penalty=1.0, stop=None, **guard):  # a renamed argument
            raise AssertionError

        def complete(self, prompt, context):  # a new required argument, and no **guard
            raise AssertionError

        def close(self):
            pass

    problems = conformance(Drifted())
    assert "no score" in problems
    assert "chat() has no parameter 'max_tokens'" in problems
    assert "complete() takes no **guard" in problems
    assert "complete() requires 'context', which the server never passes" in problems


HOLD_CASES = [
    # pieces, stops, what the stream may send before the end
    ([" owt", " eno", " owt"], ["eno"], " owt "),
    ([" o", "w", "t e", "no"], ["t en"], " ow"),
    ([" a", "b", "c"], ["bd"], " abc"),                   # "b" held, then released by "c"
    (["xx", "yy"], ["xy", "zz"], "x"),                   # the stop spans two pieces
    (["hello"], [], "hello"),
    (["ab", "ab", "ab"], ["abababx"], ""),                # all may begin the stop: held (the end sends it)
]


@pytest.mark.parametrize("pieces,stops,sent", HOLD_CASES)
def test_the_hold_back_sends_exactly_the_text_before_a_stop(pieces, stops, sent):
    hold = StopHoldBack(stops)
    assert "".join(hold.push(p) for p in pieces) == sent


def test_the_hold_back_keeps_a_possible_stop_start_and_stops_for_good():
    hold = StopHoldBack(["END"])
    assert hold.push("abc E") == "abc "  # "E" may begin END
    assert hold.push("N") == ""
    assert hold.push("D and more") == "" and hold.stopped
    assert hold.push("later") == ""
    hold = StopHoldBack(["END"])
    assert hold.push("E") == "" and hold.push("x") == "Ex"
