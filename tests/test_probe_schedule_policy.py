"""Window rules, schedules and policies: the decisions, in isolation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from guardrail.errors import OptionsError
from guardrail.runtime.options import GuardOptions
from guardrail.runtime.policy import HALT_MESSAGE, AnswerRule, Policy, acceptable_reason, halt_text, lead_in
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
    ("every", list(range(0, 12))),
    ("first", [0]),
    ("periodic:5", [0, 5, 10]),
])
def test_schedules_say_when_to_check(spec, due):
    schedule = Schedule.parse(spec)
    assert [s for s in range(12) if schedule.due(s)] == due


def test_annealing_is_dense_early_then_sparse_to_the_end_of_the_answer():
    schedule = Schedule.parse("annealing")
    steps = [s for s in range(120) if schedule.due(s)]
    assert steps == [0, 4, 8, 12, 16, 32, 48, 64, 80, 96, 112]
    assert schedule.due(4096)  # checks never stop before the answer does
    assert str(schedule) == "annealing" and str(Schedule.parse("periodic:7")) == "periodic:7"


def test_auto_checks_every_step_when_checks_are_free_and_anneals_when_they_decode_a_probe():
    auto = Schedule.parse("auto")
    assert auto.resolve(checks_are_free=True).kind == "every"
    assert auto.resolve(checks_are_free=False).kind == "annealing"
    assert Schedule.parse("periodic:3").resolve(checks_are_free=True).kind == "periodic"
    with pytest.raises(ValueError):
        auto.due(1)


@pytest.mark.parametrize("spec", ["sometimes", "every-probe", "periodic:0", "periodic:x", "first:2"])
def test_unknown_schedules_are_refused(spec):
    with pytest.raises(ValueError):
        Schedule.parse(spec)


def test_refuse_acts_on_a_malicious_first_verdict():
    policy = Policy("refuse")
    action = policy.on_query(True)
    assert action.kind == "refuse" and action.acts and policy.triggered


def test_refuse_needs_tau_consecutive_malicious_checks_after_a_benign_start():
    policy = Policy("refuse", AnswerRule("streak", tau=3))
    assert not policy.on_query(False).acts
    kinds = [policy.on_answer(r, 0.5)[1].kind for r in (0.9, 0.8, 0.1, 0.7, 0.6, 0.9)]
    assert kinds == ["continue"] * 5 + ["refuse"]
    assert not policy.on_answer(0.99, 0.5)[1].acts  # acts once


def test_a_moving_average_rule_is_not_cut_by_one_spike_but_by_a_sustained_rise():
    rule = AnswerRule("ema", alpha=0.8)
    spike = Policy("refuse", rule)
    assert not any(spike.on_answer(r, 0.5)[1].acts for r in [0.01] * 10 + [0.99] + [0.01] * 10)
    sustained = Policy("refuse", rule)
    acts = [sustained.on_answer(r, 0.5)[1].acts for r in [0.01] * 5 + [0.95] * 10]
    assert acts.index(True) > 5  # after a few high checks, not at the first
    assert rule.statistic([0.5, float("nan")])[-1] > 0.5  # a broken risk counts as harmful


def test_a_prior_keeps_an_answers_first_checks_from_acting_as_a_second_query_check():
    # "Give me steps to change a flat tyre": query risk 0.858 (let through), the answer head's
    # first two checks 0.983 and 0.976, a threshold of 0.994 (a head trained on 1,400 answers).
    first, prior = (AnswerRule("ema", alpha=0.95, query_weight=1.0),
                    AnswerRule("ema", alpha=0.95, query_weight=1.0, prior=-2.0))
    assert first.statistic([0.983, 0.976], 0.858)[-1] >= 0.994          # started at the first check: cut
    assert prior.statistic([0.983, 0.976], 0.858)[-1] < 0.9             # started at a benign prior: not
    sustained = prior.statistic([0.99] * 60, 0.858)
    assert sustained[-1] >= 0.994 and sustained[20] < 0.994              # an answer that stays high is still cut, later
    assert AnswerRule.parse("ema:0.95:1") == first and AnswerRule.parse("ema:0.95:1:-2") == prior


def test_halt_stops_and_monitor_never_acts_but_records_what_it_saw():
    assert Policy("halt").on_query(True).kind == "halt"
    monitor = Policy("monitor", AnswerRule("streak", tau=1))
    assert not monitor.on_query(True).acts
    assert all(not monitor.on_answer(0.9, 0.5)[1].acts for _ in range(5))
    assert monitor.triggered == "the query was judged malicious"


def test_the_prefill_check_runs_the_answer_rule_over_the_prefill_at_its_own_threshold():
    rule = AnswerRule("ema", alpha=0.95, query_weight=1.0)
    compliant = [0.9, 0.95, 0.97, 0.98, 0.98]                   # a start that already serves the request
    peak, action = Policy("refuse", rule).on_prefill(compliant, 0.7, 0.95)
    assert peak == max(rule.statistic(compliant, 0.7)) >= 0.95 and action.kind == "refuse"
    assert "prefill" in action.reason
    assert not Policy("refuse", rule).on_prefill([0.2, 0.3, 0.1], 0.7, 0.95)[1].acts   # a plain start: no
    assert not Policy("refuse", rule).on_prefill([0.999], 0.9, 0.5)[1].acts             # one token alone never cuts
    peak, action = Policy("refuse", rule).on_prefill([], 0.9, 0.5)
    assert peak == 0.0 and not action.acts                                               # no prefill, nothing
    monitor = Policy("monitor", rule)
    assert not monitor.on_prefill(compliant, 0.7, 0.95)[1].acts and "prefill" in (monitor.triggered or "")
    # the answer's own rule starts afresh at its first written token: the prefill check primes nothing
    after = Policy("refuse", rule)
    after.on_query(False, 0.7)
    after.on_prefill(compliant, 0.7, 1.0)
    assert after.on_answer(0.2, 0.5)[0] == 0.0                  # min_checks: its first written check cannot act


def test_the_prefill_threshold_comes_from_the_heads_answer_stage_unless_given():
    stage = {"rule": "ema:0.95:1", "prefill": {"threshold": 0.93}}
    answer = SimpleNamespace(threshold=0.99, tau=6, extra={"answer_stage": stage})
    head = SimpleNamespace(threshold=0.8, tau=6, answer_head=answer)
    assert GuardOptions().resolve(head).prefill_threshold == 0.93
    assert GuardOptions().updated(prefill_threshold=0.5).resolve(head).prefill_threshold == 0.5
    older = SimpleNamespace(threshold=0.8, tau=6, answer_head=SimpleNamespace(threshold=0.99, tau=6, extra={}))
    assert GuardOptions().resolve(older).prefill_threshold == 1.0                      # none in the file: never acts
    assert GuardOptions().resolve(SimpleNamespace(threshold=0.8, tau=6)).prefill_threshold == 1.0
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(OptionsError):
            GuardOptions().updated(prefill_threshold=bad)


@pytest.mark.parametrize("spec", ["ema", "ema:0.8", "ema:0.95:1:-2", "ema:0.9:0:-1.5", "streak:4"])
def test_answer_rules_parse_and_describe_themselves(spec):
    rule = AnswerRule.parse(spec)
    assert AnswerRule.parse(rule.describe()) == rule
    for bad in ("median:3", "ema:0.9:1:-2:5", "ema:x"):
        with pytest.raises(ValueError):
            AnswerRule.parse(bad)


@pytest.mark.parametrize("options", [{"policy": "maybe"}, {"tau": 0}, {"tau": True}, {"threshold": 1.5}])
def test_policy_tau_and_threshold_are_validated_once_in_the_options(options):
    with pytest.raises(OptionsError):
        GuardOptions().updated(**options)


def test_resolved_options_take_the_heads_threshold_and_tau_unless_given():
    head = SimpleNamespace(threshold=0.7, tau=6)
    resolved = GuardOptions().resolve(head)
    assert (resolved.threshold, resolved.tau, resolved.policy) == (0.7, 6, "refuse")
    given = GuardOptions().updated(threshold=0.0, tau=1, r2=4).resolve(head)
    assert (given.threshold, given.tau, given.value("r2"), given.value("threshold")) == (0.0, 1, 4, 0.0)
    with pytest.raises(OptionsError):
        given.value("window")


def test_a_refusal_after_written_text_starts_a_new_paragraph_never_mid_word():
    assert lead_in("") == ""
    assert lead_in("The answer is a type") == "\n\n"
    assert lead_in("Line one\n") == "\n"
    assert halt_text("...is a type") == "\n\n" + HALT_MESSAGE


@pytest.mark.parametrize("reason, ok", [
    (" it could be used to hurt people.", True),
    (" making explosives is dangerous and illegal.", True),
    (" I'm not a chatbot", False),                                   # not a finished sentence
    (" it is illegal. However, here is how to do it:", False),       # drifts back to the task
    (" you need the following materials: 1. a pipe", False),
    (" it is illegal.\n\nStep 1: get a pipe.", False),
    (" it is illegal. But I can help you with the first step.", False),
    (" no.", False),                                                 # too short to be a reason
])
def test_the_models_reason_is_kept_only_when_it_is_one_plain_complete_sentence(reason, ok):
    assert acceptable_reason(reason) is ok


def test_window_runs_are_the_chosen_window_as_runs_in_every_state():
    import random

    from guardrail.runtime.probe import window_runs

    rng = random.Random(0)
    for _ in range(500):
        query = sorted(rng.sample(range(40), rng.randint(0, 12)))
        start = 40 + rng.randint(0, 3)
        answer = list(range(start, start + rng.randint(0, 30)))
        state = WindowState(rng.choice([None, True, False]), None)
        if state.query_malicious is False and answer and rng.random() < 0.5:
            state.switch_at = rng.randint(0, len(answer))
        params = WindowParams(rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6), rng.random() < 0.7)
        assert window_runs(runs(query), answer, state, params) == runs(choose_window(query, answer, state, params))
