"""The server's guard interface binds the real Guard and the test double alike (the type checker holds
the signatures; these tests call each member as the server does), and the stop-string hold-back sends
exactly the text before the first stop string."""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from fake_guard import FakeGuard

from guardrail.runtime.engine import DEFAULT_MAX_TOKENS, SamplingParams
from guardrail.runtime.events import DoneEvent, Event, TokenEvent
from guardrail.runtime.options import ResolvedOptions
from guardrail.serve.protocol import GuardLike
from guardrail.serve.stream import StopHoldBack

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = SamplingParams()
# every keyword the server passes (body.sampling plus a request's guard options)
SERVER_CALL = dict(max_tokens=3, temperature=SAMPLING.temperature, top_p=SAMPLING.top_p, top_k=SAMPLING.top_k,
                   min_p=SAMPLING.min_p, seed=1, repeat_penalty=SAMPLING.repeat_penalty, stop=["zz"], policy="halt")


def conforms_at_run_time(guard: GuardLike) -> None:
    """Each member called the way the server calls it (the type checker holds the signatures)."""
    assert isinstance(guard, GuardLike)
    assert isinstance(guard.model_name, str) and guard.n_ctx > 0
    resolved = guard.resolve_options(threshold=0.25)
    assert isinstance(resolved, ResolvedOptions) and resolved.threshold == 0.25 and resolved.tau >= 1
    messages = [{"role": "user", "content": "one two"}]
    for events in (guard.chat(messages, **SERVER_CALL), guard.complete("one two", **SERVER_CALL)):
        seen = list(events)
        assert all(isinstance(e, Event) for e in seen) and isinstance(seen[-1], DoneEvent)
    verdict = guard.score(messages, threshold=0.25)
    assert isinstance(verdict.risk, float) and isinstance(verdict.malicious, bool) and verdict.threshold == 0.25
    assert guard.n_parallel >= 1
    batched(guard, messages)


def batched(guard: GuardLike, messages: list[dict[str, str]]) -> None:
    """``batch()`` as the server's worker calls it (a guard of two slots or more): two answers stepped
    together, the second cancelled after its first token while the first goes on, then a score."""
    seen: dict[int, list[Event]] = {0: [], 1: []}
    ended: dict[int, BaseException | None] = {}
    verdicts: list[tuple[Any, BaseException | None]] = []
    with closing(guard.batch()) as batch:
        jobs = [batch.start(guard.chat_request(messages, **SERVER_CALL), seen[i].append,
                            lambda exc, i=i: ended.__setitem__(i, exc)) for i in (0, 1)]
        assert None not in jobs
        while batch.active:
            batch.step()
            if any(isinstance(e, TokenEvent) for e in seen[1]) and 1 not in ended:
                batch.cancel(jobs[1])
        assert batch.score(guard.chat_request(messages), lambda v, exc: verdicts.append((v, exc))) is not None
        while batch.active:
            batch.step()
    assert isinstance(seen[0][-1], DoneEvent) and ended[0] is None
    assert not any(isinstance(e, DoneEvent) for e in seen[1]) and ended[1] is None
    [(verdict, error)] = verdicts
    assert error is None and verdict.threshold == guard.resolve_options().threshold


def test_the_fake_guard_is_what_the_server_calls():
    conforms_at_run_time(FakeGuard(delay=0, n_parallel=2))


@pytest.mark.slow
def test_the_real_guard_is_what_the_server_calls(model_path):
    from guardrail import Guard

    with Guard(str(model_path), n_ctx=256, n_parallel=2) as guard:
        conforms_at_run_time(guard)


def test_the_sampling_defaults_are_the_librarys():
    import inspect

    params = inspect.signature(FakeGuard.chat).parameters
    assert params["max_tokens"].default == DEFAULT_MAX_TOKENS
    assert {k: params[k].default for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")} == {
        k: getattr(SAMPLING, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")}


DOUBLE = """
class {name}:
    model_name, n_ctx, n_parallel = "double", 64, 1

    def resolve_options(self, **overrides: Any) -> Any:
        raise NotImplementedError

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, seed: int | None = None,
             repeat_penalty: float = 1.0, stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Any]:
        raise NotImplementedError

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                 top_k: int = 40, min_p: float = 0.05, seed: int | None = None, repeat_penalty: float = 1.0,
                 stop: Sequence[str] | str | None = None, **guard: Any) -> Iterator[Any]:
        raise NotImplementedError

    def score(self, messages: Sequence[Mapping[str, str]], **guard: Any) -> Any:
        raise NotImplementedError

    def chat_request(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                     seed: int | None = None, repeat_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
                     **guard: Any) -> Any:
        raise NotImplementedError

    def text_request(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
                     top_k: int = 40, min_p: float = 0.05, seed: int | None = None, repeat_penalty: float = 1.0,
                     stop: Sequence[str] | str | None = None, **guard: Any) -> Any:
        raise NotImplementedError

    def batch(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


def conforms_{name}(guard: {name}) -> GuardLike:
    return guard
"""
DRIFTS = {"Renamed": ("def score(", "def rate("), "Retyped": ("prompt: str", "prompt: list[str]"),
          "NewArgument": ("def close(self) -> None", "def close(self, now: bool) -> None")}


def test_the_type_checker_sees_a_drifted_guard(tmp_path):
    """The Protocol binds through the type checker: each drifted double (a renamed method, another type, a
    new required argument) fails ``make typecheck``, the same double undrifted passes. An argument renamed
    into ``**guard`` still type-checks; the runtime test above catches that one (the server's keyword
    becomes an unknown guard option). mypy reads only the Protocol's module and the doubles: a second or two."""
    pytest.importorskip("mypy")
    source = ("from collections.abc import Iterator, Mapping, Sequence\nfrom typing import Any\n"
              "from guardrail.serve.protocol import GuardLike\n" + DOUBLE.format(name="Fine"))
    source += "".join(DOUBLE.format(name=name).replace(*drift) for name, drift in DRIFTS.items())
    (tmp_path / "doubles.py").write_text(source)
    result = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=skip", "--ignore-missing-imports",
                             "--no-incremental", "--config-file=", str(ROOT / "guardrail" / "serve" / "protocol.py"),
                             str(tmp_path / "doubles.py")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    failed = {name for name in ["Fine", *DRIFTS]
              if f'Incompatible return value type (got "{name}", expected "GuardLike")' in result.stdout}
    assert failed == set(DRIFTS), result.stdout + result.stderr


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
