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
