"""The guard's benchmarks run both sides on the same work (the figures in the README come from longer runs)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.model


def test_the_batch_benchmark_decodes_the_same_greedy_answers_on_both_sides(model_path):
    from guardrail.measure.bench import batch_benchmark

    report = batch_benchmark(model_path, None, ns=(1, 2), max_tokens=12, runs=1)
    assert [r["n"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        # policy monitor: the guarded side writes the plain side's tokens, answer for answer
        assert row["tokens"]["guarded"] == row["tokens"]["plain"]
        assert row["tokens"]["plain"][0] <= 12 * row["n"]
        assert row["ratio"] > 0
    assert report["rows"][0]["plain_speedup"] == 1.0
