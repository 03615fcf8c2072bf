"""The serving benchmarks run end to end (on the fake guard here; the figures in the README come
from the default model)."""

from __future__ import annotations

from fake_guard import FakeGuard
from serving import served


def test_server_benchmark_reports_ratios():
    from guardrail.measure.serve_bench import server_benchmark

    report = server_benchmark(FakeGuard(delay=0.001), ["alpha beta", "one two three"], max_tokens=4, runs=2)
    assert report["samples"] == 4 and report["same_text"] is True
    assert report["in_process"]["tokens"] == report["server"]["tokens"] == 4
    assert report["ratios"]["ttft"] > 0 and report["ratios"]["tokens_per_s"] > 0


def test_a_load_run_accounts_for_every_request():
    from guardrail.measure.serve_bench import load_run

    fake = FakeGuard(delay=0.01)
    with served(fake, queue_size=1) as srv:
        report = load_run(srv.url, clients=4, seconds=1.0, max_tokens=5, prompts=["a b c", "d e"])
    assert report["lost"] == 0 and report["still_running"] == 0
    assert report["answered"] + report["refused"] == report["requests"] > 4
    assert report["answered"] > 0 and set(report["refused_by_status"]) <= {"429"}
    assert report["refused"] > 0  # four clients, one turn and one place in the queue
    assert 0 < report["ttft_p50_s"] <= report["ttft_p95_s"]
    assert fake.overlaps == 0


def test_one_request_at_a_time_is_timed_on_a_slotted_server_beside_a_one_slot_server(model_path):
    from guardrail.measure.serve_bench import single_request_benchmark

    report = single_request_benchmark(str(model_path), ["Name three primary colors."], parallel=2, max_tokens=4,
                                      runs=2, guard_options={"n_ctx": 512, "flash_attn": True})
    assert report["parallel"] == 2 and report["n_ctx"] == {"one": 512, "slots": 512}
    assert report["one_slot"]["tokens"] == report["slots"]["tokens"] == 4
    # greedy, one attention kernel on both (by default a one-slot guard on a CPU runs flash attention off):
    # a lone answer is the same answer on either server
    assert report["same_text"] is True
    assert all(r is not None and r > 0 for r in report["ratios"].values())
