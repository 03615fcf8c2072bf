"""Window rules, schedules and policies: the decisions, in isolation."""

from __future__ import annotations

import pytest

from guardrail.runtime.policy import DEFAULT_OPENER, Policy
from guardrail.runtime.probe import WindowParams, WindowState, choose_window, runs, update_window_state
from guardrail.runtime.schedule import Schedule

QUERY = [5, 6, 7, 8]          # content positions of the prompt (markers skipped)
ANSWER = list(range(20, 60))  # 40 answer tokens
P = WindowParams(r1=3, r2=4, r3=2)


def test_the_first_check_reads_the_query_and_any_prefill():
    state = WindowState()
    assert choose_window(QUERY, [], state, P) == QUERY
    assert choose_window(QUERY, [20, 21, 22, 23, 24, 25], state, P) == QUERY + [22, 23, 24, 25]


def test_after_a_malicious_first_verdict_the_probe_reads_query_and_first_r1_answer_tokens():
    state = WindowState()
    update_window_state(state, True, 0)
    assert choose_window(QUERY, ANSWER, state, P) == QUERY + ANSWER[:3]


def test_after_a_benign_first_verdict_the_probe_reads_the_latest_r2_tokens_and_the_query():
    state = WindowState()
    update_window_state(state, False, 0)
    assert choose_window(QUERY, ANSWER[:10], state, P) == QUERY + ANSWER[6:10]
    no_query = WindowParams(r1=3, r2=4, r3=2, keep_query=False)
    assert choose_window(QUERY, ANSWER[:10], state, no_query) == ANSWER[6:10]


def test_a_switch_at_step_s_reads_s_minus_r2_to_s_plus_r3_and_a_false_trigger_falls_back():
    state = WindowState()
    update_window_state(state, False, 0)
    update_window_state(state, True, 10)     # the switch: answer index 10
    assert state.switch_at == 10
    assert choose_window(QUERY, ANSWER[:30], state, P) == QUERY + ANSWER[6:13]
    update_window_state(state, False, 30)    # a false trigger: back to the benign rule
    assert state.switch_at is None
    assert choose_window(QUERY, ANSWER[:30], state, P) == QUERY + ANSWER[26:30]


def test_windows_become_seq_cp_runs():
    assert runs([5, 6, 7, 9, 10, 20]) == [(5, 8), (9, 11), (20, 21)]
    assert runs([]) == []


@pytest.mark.parametrize("spec, due", [
    ("every-probe", list(range(0, 12))),
    ("every", [0, 4, 8]),
    ("first", [0]),
    ("periodic:5", [0, 5, 10]),
])
def test_schedules_say_when_to_check(spec, due):
    schedule = Schedule.parse(spec)
    assert [s for s in range(12) if schedule.due(s)] == due


def test_every_decides_each_step_with_the_token_signal_where_the_probe_does_not_run():
    schedule = Schedule.parse("every")
    assert all(schedule.due(s) != schedule.token_due(s) for s in range(1, 200))
    assert not schedule.token_due(0) and schedule.due(0)
    assert not any(Schedule.parse("annealing").token_due(s) for s in range(200))


def test_annealing_is_dense_early_sparse_later_then_stops():
    schedule = Schedule.parse("annealing")
    steps = [s for s in range(400) if schedule.due(s)]
    assert steps == [0, 4, 8, 12, 16, 32, 48, 64]
    assert str(schedule) == "annealing" and str(Schedule.parse("periodic:7")) == "periodic:7"
    with pytest.raises(ValueError):
        Schedule.parse("sometimes")


def test_refuse_starts_the_answer_with_the_opener_on_a_malicious_first_verdict():
    policy = Policy("refuse")
    action = policy.on_verdict(True, answer_len=0)
    assert action.kind == "insert" and action.text == DEFAULT_OPENER and policy.intervened


def test_refuse_after_a_prefill_puts_the_opener_on_a_new_line():
    action = Policy("refuse").on_verdict(True, answer_len=4)
    assert action.text == "\n" + DEFAULT_OPENER


def test_refuse_needs_tau_consecutive_malicious_verdicts_after_a_benign_start():
    policy = Policy("refuse", tau=3)
    assert policy.on_verdict(False, answer_len=0).kind == "continue"
    kinds = [policy.on_verdict(v, answer_len=10 + i).kind
             for i, v in enumerate([True, True, False, True, True, True])]
    assert kinds == ["continue"] * 5 + ["insert"]
    assert policy.on_verdict(True, answer_len=30).kind == "continue"  # acts once


def test_halt_stops_and_monitor_never_acts():
    assert Policy("halt").on_verdict(True, answer_len=0).kind == "halt"
    monitor = Policy("monitor", tau=1)
    assert all(monitor.on_verdict(True, answer_len=i).kind == "continue" for i in range(5))
    assert not monitor.intervened
    with pytest.raises(ValueError):
        Policy("maybe")
