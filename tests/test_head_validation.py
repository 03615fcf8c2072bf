"""A head file is checked on load so that it can neither ask for absurd work nor decide nonsense:
each fault is a one-line HeadError, before any model runs."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from test_head import build_head, rewrite

from guardrail.errors import HeadError
from guardrail.head import load_head, save_head


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "head.gguf"
    save_head(build_head("logreg"), path)
    return path


@pytest.mark.parametrize("fault, match", [
    # a 70 KB file asking for a quantisation block of 2^34 values would need hundreds of GiB to dequantize
    ({"kv": {"guardrail.quant.block_size": (2**34, gguf.GGUFValueType.UINT64)}}, "quantisation block size"),
    ({"kv": {"guardrail.quant.block_size": (0, gguf.GGUFValueType.UINT32)}}, "quantisation block size"),
    ({"kv": {"guardrail.threshold": (2.0, gguf.GGUFValueType.FLOAT64)}}, "threshold 2.0"),
    ({"kv": {"guardrail.threshold": (-0.1, gguf.GGUFValueType.FLOAT64)}}, "threshold -0.1"),
    ({"kv": {"guardrail.threshold": (float("nan"), gguf.GGUFValueType.FLOAT64)}}, "threshold nan"),
    ({"kv": {"guardrail.temperature": (float("inf"), gguf.GGUFValueType.FLOAT64)}}, "temperature"),
    ({"kv": {"guardrail.blocks.names": (["l_out-3/last", "l_out-99/mean", "lexical"], gguf.GGUFValueType.ARRAY)}},
     "reads layer 99, but its base model has 30 layers"),
    ({"kv": {"guardrail.blocks.names": (["l_out-3/last", "logits/refusal", "lexical"], gguf.GGUFValueType.ARRAY)}},
     "neither 'lexical' nor a layer's state"),
    ({"tensors": {"head.w.scale": np.full((1, 36), np.inf, np.float32)}}, "non-finite"),
    ({"tensors": {"head.b": np.array([np.nan], np.float32)}}, "non-finite"),
])
def test_a_head_file_that_asks_for_nonsense_is_refused_in_one_line(head_file, tmp_path, fault, match):
    forged = tmp_path / "forged.gguf"
    rewrite(head_file, forged, **fault)
    with pytest.raises(HeadError, match=match) as info:
        load_head(forged)
    assert "\n" not in str(info.value)


def test_a_head_whose_state_blocks_do_not_match_the_model_width_is_refused(tmp_path):
    head = build_head("logreg")
    narrow = dataclasses.replace(head, fingerprint=dataclasses.replace(head.fingerprint, n_embd=32))
    path = tmp_path / "narrow.gguf"
    save_head(narrow, path)
    with pytest.raises(HeadError, match="has 64 features, the base model's states have 32"):
        load_head(path)


def test_a_head_with_a_threshold_outside_zero_to_one_cannot_be_built():
    head = build_head("logreg")
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(HeadError, match="threshold"):
            dataclasses.replace(head, threshold=bad)
    assert dataclasses.replace(head, threshold=1.0).threshold == 1.0


def test_an_answer_stage_whose_prefill_threshold_is_not_a_probability_cannot_be_built_or_saved(tmp_path):
    head = build_head("logreg")

    def with_prefill(value):
        return dataclasses.replace(head, answer_head=dataclasses.replace(
            head, extra={"answer_stage": {"rule": "ema:0.95:1", "prefill": {"threshold": value}}}))

    for bad in (1.5, -0.1, float("nan"), "0.9", None):
        with pytest.raises(HeadError, match="prefill threshold"):
            with_prefill(bad)
    path = tmp_path / "prefill.gguf"
    save_head(with_prefill(0.95), path)                    # a valid one goes through the file and back
    stage = load_head(path).answer_head.extra["answer_stage"]
    assert stage["prefill"]["threshold"] == 0.95
