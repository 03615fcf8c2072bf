"""Feature extraction as a job: stored by conversation, resumable, reused across datasets."""

from __future__ import annotations

import numpy as np
import pytest

from guardrail.runtime.features import EOT_PROBE
from guardrail.training import extraction
from guardrail.training.data import Example, Message
from guardrail.training.extraction import FeatureConfig, extract_features

CONFIG = FeatureConfig(layers=(10, 20), probes=(EOT_PROBE,), max_tokens=64)


def _examples(n: int) -> list[Example]:
    topics = ["bread", "rivers", "chess", "tides", "owls", "glass", "maps", "bees"]
    return [Example(f"t-{i}", "test", i % 2, (Message("user", f"Tell me one fact about {topics[i % 8]} ({i})."),))
            for i in range(n)]


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Isolate the cache and count the conversations the model actually reads."""
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path))
    seen: list[int] = []
    real = extraction.FeatureExtractor.extract

    def extract(self, conversations, progress=None):
        seen.append(len(conversations))
        return real(self, conversations, progress)

    monkeypatch.setattr(extraction.FeatureExtractor, "extract", extract)
    return seen


def test_a_dataset_that_shares_conversations_reuses_their_rows(model, counted):
    rows = _examples(6)
    first = extract_features(model, "sha", rows[:4], CONFIG, progress=False)
    again = extract_features(model, "sha", rows[2:], CONFIG, progress=False)
    assert counted == [4, 2]  # only the two new conversations were read
    for name in ("l_out-20/mean", "l_out-10/last", "l_out-20/probe"):
        assert np.array_equal(first.blocks[name][2:4], again.blocks[name][:2])
    assert again.texts[:2] == first.texts[2:4]


def test_a_killed_run_continues_where_it_stopped(model, counted, monkeypatch):
    rows = _examples(5)
    monkeypatch.setattr(extraction, "CHUNK", 2)
    real = extraction.FeatureExtractor.extract
    calls = {"n": 0}

    def dies_on_the_second_part(self, conversations, progress=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run is killed mid-way
        return real(self, conversations, progress)

    monkeypatch.setattr(extraction.FeatureExtractor, "extract", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, "sha", rows, CONFIG, progress=False)
    monkeypatch.setattr(extraction.FeatureExtractor, "extract", real)
    resumed = extract_features(model, "sha", rows, CONFIG, progress=False)
    monkeypatch.setenv("GUARDRAIL_CACHE", str(extraction.cache_dir() / "fresh"))
    once = extract_features(model, "sha", rows, CONFIG, progress=False)
    for name in once.blocks:
        if not name.startswith("__"):
            assert np.allclose(resumed.blocks[name], once.blocks[name], atol=1e-4), name


def test_a_torn_part_file_is_extracted_again(model, counted):
    rows = _examples(3)
    extract_features(model, "sha", rows, CONFIG, progress=False)
    part = next(extraction.store_dir("sha", CONFIG).glob("part-*.npz"))
    part.write_bytes(part.read_bytes()[:100])
    again = extract_features(model, "sha", rows, CONFIG, progress=False)
    assert counted == [3, 3] and again.blocks["l_out-20/mean"].shape == (3, model.info.n_embd)


def test_a_part_another_run_is_still_writing_is_left_alone(model, counted):
    rows = _examples(3)
    extract_features(model, "sha", rows, CONFIG, progress=False)
    store = extraction.store_dir("sha", CONFIG)
    writing = store / ("part-ffffffffffffffff.npz" + extraction.PARTIAL)
    writing.write_bytes(b"PK\x03\x04 half written")
    again = extract_features(model, "sha", rows, CONFIG, progress=False)
    assert counted == [3] and again.blocks["l_out-20/mean"].shape == (3, model.info.n_embd)
    assert writing.exists()  # a reader never removes a writer's file


def test_threads_change_speed_not_the_store(model):
    from dataclasses import replace

    assert extraction.store_dir("sha", CONFIG) == extraction.store_dir("sha", replace(CONFIG, n_threads=1))
    assert extraction.store_dir("sha", CONFIG) != extraction.store_dir("sha", replace(CONFIG, max_tokens=65))
    # the attention kernel rounds differently, so its states are stored apart
    assert extraction.store_dir("sha", CONFIG) != extraction.store_dir("sha", replace(CONFIG, flash_attn=False))


def test_a_conversation_given_twice_is_read_once_and_returned_twice(model, counted):
    rows = _examples(3)
    features = extract_features(model, "sha", [*rows, rows[1]], CONFIG, progress=False)
    assert counted == [3]
    assert np.array_equal(features.blocks["l_out-20/mean"][3], features.blocks["l_out-20/mean"][1])
