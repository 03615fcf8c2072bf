"""The safety head and its GGUF file: scoring, int8 round trip, model fingerprint, corrupt files.

Heads here are trained on synthetic "hidden states" and text in well under a
second; no model and no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Collection
from pathlib import Path

import gguf
import numpy as np
import pytest

from guardrail.errors import HeadError
from guardrail.head import FeatureBlock, Head, ModelFingerprint, fingerprint_file, load_head, quantized, save_head
from guardrail.head.core import dequantize_rows, quantize_rows
from guardrail.head.lexical import HashedNgrams
from guardrail.head.model import Standardizer
from guardrail.training.evaluate import quantization_report
from guardrail.training.metrics import auroc
from guardrail.training.trainer import train_logreg, train_mlp

FP = ModelFingerprint("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama", 64, 30)
HARMFUL = ["bomb", "poison", "steal", "malware", "weapon", "hack", "kill"]
BENIGN = ["recipe", "poem", "garden", "algebra", "travel", "essay", "music"]


def synthetic(n: int, seed: int) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """Two 'hidden state' blocks with a weak signal plus texts that carry another."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    direction = np.random.default_rng(7).standard_normal(64)
    last = (rng.standard_normal((n, 64)) * 3 + 10 + np.outer(y - 0.5, direction)).astype(np.float32)
    mean = (rng.standard_normal((n, 64)) + np.outer(y - 0.5, direction[::-1]) * 0.5).astype(np.float32)
    texts = [" ".join(rng.choice(HARMFUL if (t if rng.random() < 0.8 else 1 - t) else BENIGN, 5)) + " now please"
             for t in y]
    return {"l_out-3/last": last, "l_out-3/mean": mean}, texts, y


def build_head(kind: str) -> Head:
    features, texts, y = synthetic(600, seed=0)
    lexical = HashedNgrams(n_buckets=1024).fit(texts)
    blocks = (FeatureBlock("l_out-3/last", 64), FeatureBlock("l_out-3/mean", 64), FeatureBlock("lexical", 1024))
    raw = [features["l_out-3/last"], features["l_out-3/mean"], lexical.transform(texts)]
    scalers = tuple(Standardizer.fit(x) for x in raw)
    Z = np.concatenate([s.transform(x) for s, x in zip(scalers, raw)], axis=1)
    if kind == "logreg":
        model = train_logreg(Z, y, lr=1e-2, max_epochs=15)
    else:
        model = train_mlp(Z, y, hidden=16, lr=3e-3, max_epochs=10)
    return Head(FP, blocks, scalers, model, temperature=1.3, threshold=0.62, target_fpr=0.05,
                layers=(3,), pooling=("last", "mean"), lexical=lexical,
                manifest={"sources": {"adv_bench": {"n": 520, "licence": "MIT"}}},
                metrics={"auroc": 0.93, "undefined": float("nan")}, extra={"note": "synthetic"})


def build_token_head(kind: str) -> Head:
    """A small per-token companion: its own block and its own (smaller) lexical featurizer."""
    features, texts, y = synthetic(600, seed=2)
    lexical = HashedNgrams(n_buckets=256).fit(texts)
    blocks = (FeatureBlock("l_out-3/token", 64), FeatureBlock("lexical", 256))
    raw = [features["l_out-3/last"], lexical.transform(texts)]
    scalers = tuple(Standardizer.fit(x) for x in raw)
    Z = np.concatenate([s.transform(x) for s, x in zip(scalers, raw)], axis=1)
    if kind == "logreg":
        model = train_logreg(Z, y, lr=1e-2, max_epochs=15)
    else:
        model = train_mlp(Z, y, hidden=8, lr=3e-3, max_epochs=10)
    return Head(FP, blocks, scalers, model, temperature=0.8, threshold=0.37, target_fpr=0.02, tau=2,
                layers=(3,), pooling=("token",), lexical=lexical, metrics={"auroc": 0.8}, extra={"role": "token"})


@pytest.fixture(scope="module", params=["logreg", "mlp"])
def head(request) -> Head:
    return build_head(request.param)


@pytest.fixture(scope="module")
def paired(head) -> Head:
    """The main head with a companion of the other model kind."""
    return dataclasses.replace(head, token_head=build_token_head("mlp" if head.kind == "logreg" else "logreg"))


@pytest.fixture()
def paired_file(paired, tmp_path) -> Path:
    path = tmp_path / "paired.gguf"
    save_head(paired, path)
    return path


def token_rows(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"l_out-3/token": features["l_out-3/last"]}


@pytest.fixture(scope="module")
def test_rows():
    return synthetic(400, seed=1)


@pytest.fixture()
def head_file(head, tmp_path) -> Path:
    path = tmp_path / "head.gguf"
    save_head(head, path)
    return path


# ---- scoring ---------------------------------------------------------------------------------

def test_head_scores_a_batch_with_probabilities(head, test_rows):
    features, texts, y = test_rows
    p = head.score(features, texts)
    assert p.shape == (400,) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    assert auroc(y, p) > 0.9


def test_one_row_fast_path_matches_the_batch(head, test_rows):
    features, texts, _ = test_rows
    batch = head.score(features, texts)
    single = [head.score_one({k: v[i] for k, v in features.items()}, texts[i]) for i in range(20)]
    np.testing.assert_allclose(single, batch[:20], atol=1e-5)


def test_weights_that_overflow_fail_closed_in_a_batch_as_for_one_row(head, test_rows):
    """Finite weights can still overflow float32 (a flipped exponent bit in a file): malicious, never NaN."""
    from dataclasses import replace

    features, texts, _ = test_rows
    weights = {"w": head.model.w} if hasattr(head.model, "w") else {"w1": head.model.w1}
    huge = replace(head, model=replace(head.model, **{k: np.full_like(v, 3e38) for k, v in weights.items()}))
    p = huge.score({k: v[:3] for k, v in features.items()}, texts[:3])
    assert p.dtype == np.float32 and np.all(p == 1.0), p
    assert huge.score_one({k: v[0] for k, v in features.items()}, texts[0]) == 1.0


def test_missing_or_misshapen_inputs_are_refused(head, test_rows):
    features, texts, _ = test_rows
    with pytest.raises(HeadError, match="l_out-3/mean"):
        head.score({"l_out-3/last": features["l_out-3/last"]}, texts)
    with pytest.raises(HeadError, match="expects"):
        head.score({**features, "l_out-3/mean": features["l_out-3/mean"][:, :10]}, texts)
    with pytest.raises(HeadError, match="text"):
        head.score(features)
    with pytest.raises(HeadError, match="text"):
        head.score_one({k: v[0] for k, v in features.items()})


def test_inconsistent_heads_cannot_be_built(head):
    with pytest.raises(HeadError, match="inconsistent"):
        dataclasses.replace(head, blocks=head.blocks[:2])
    with pytest.raises(HeadError, match="temperature"):
        dataclasses.replace(head, temperature=0.0)
    with pytest.raises(HeadError, match="lexical"):
        dataclasses.replace(head, lexical=None)


# ---- int8 quantisation and the GGUF round trip ----------------------------------------------

def test_int8_blocks_bound_the_rounding_error():
    w = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32) * [[1], [100], [0]]
    q, scale = quantize_rows(w)
    assert q.dtype == np.int8 and q.shape == (3, 100) and scale.shape == (3, 4)
    back = dequantize_rows(q, scale)
    assert np.all(np.abs(back - w) <= np.repeat(scale, 32, axis=1)[:, :100] / 2 + 1e-7)
    assert not back[2].any()


def test_round_trip_keeps_probabilities_and_ranking(head, head_file, test_rows):
    features, texts, y = test_rows
    loaded = load_head(head_file, expect=FP)
    report = quantization_report(head, loaded, features, texts, y)
    assert report["max_abs_diff"] < 0.01
    assert round(report["auroc_float"], 3) == round(report["auroc_quant"], 3)
    # what is loaded is exactly the in-memory quantised head
    assert np.array_equal(loaded.score(features, texts), quantized(head).score(features, texts))


def test_round_trip_keeps_the_metadata(head, head_file):
    loaded = load_head(head_file)
    for name in ("fingerprint", "blocks", "kind", "temperature", "threshold", "target_fpr", "tau", "layers",
                 "pooling", "probe_text", "manifest", "extra", "created_by"):
        assert getattr(loaded, name) == getattr(head, name), name
    assert loaded.metrics == {"auroc": 0.93, "undefined": None}
    assert loaded.lexical is not None and np.array_equal(loaded.lexical.idf, head.lexical.idf)
    for a, b in zip(loaded.scalers, head.scalers):
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)


def test_round_trip_carries_the_companion_token_head(paired, paired_file, test_rows):
    features, texts, y = test_rows
    loaded = load_head(paired_file, expect=FP)
    token, saved = loaded.token_head, paired.token_head
    assert token is not None and token.token_head is None
    assert quantization_report(paired, loaded, features, texts, y)["max_abs_diff"] < 0.01
    report = quantization_report(saved, token, token_rows(features), texts, y)
    assert report["max_abs_diff"] < 0.01
    assert round(report["auroc_float"], 3) == round(report["auroc_quant"], 3)
    assert np.array_equal(token.score(token_rows(features), texts),
                          quantized(paired).token_head.score(token_rows(features), texts))
    for name in ("blocks", "kind", "temperature", "threshold", "target_fpr", "tau", "layers", "pooling",
                 "probe_text", "metrics", "extra"):
        assert getattr(token, name) == getattr(saved, name), name
    assert (token.fingerprint, token.manifest, token.created_by) == (FP, paired.manifest, paired.created_by)
    assert token.lexical is not None and np.array_equal(token.lexical.idf, saved.lexical.idf)
    assert (loaded.temperature, loaded.threshold) == (paired.temperature, paired.threshold)


def test_the_companion_is_stored_under_its_own_prefix(paired, paired_file):
    reader = gguf.GGUFReader(paired_file)
    names = {t.name: t.tensor_type for t in reader.tensors}
    weight = "token.head.w" if paired.token_head.kind == "logreg" else "token.head.w1"
    assert names[f"{weight}.q8"] == gguf.GGMLQuantizationType.I8
    assert names["token.block.1.std"] == names["token.lexical.idf"] == gguf.GGMLQuantizationType.F32
    assert reader.fields["guardrail.token.blocks.names"].contents() == ["l_out-3/token", "lexical"]
    assert reader.fields["guardrail.token.temperature"].contents() == 0.8
    assert not [k for k in reader.fields if k.startswith("guardrail.token.") and
                any(part in k for part in ("base_model", "manifest", "created_by", "format_version"))]


def test_a_file_without_a_companion_loads_without_one(head, head_file):
    assert head.token_head is None and load_head(head_file).token_head is None
    assert not [t.name for t in gguf.GGUFReader(head_file).tensors if t.name.startswith("token.")]
    assert quantized(head).token_head is None


def test_companions_cannot_nest_or_belong_to_another_model(paired):
    with pytest.raises(HeadError, match="companion of its own"):
        dataclasses.replace(paired, token_head=paired)
    other = dataclasses.replace(paired.token_head, fingerprint=dataclasses.replace(FP, sha256="0" * 64))
    with pytest.raises(HeadError, match="companion token head was trained for"):
        dataclasses.replace(paired, token_head=other)


def test_probe_text_and_layers_round_trip_when_set_or_empty(head, tmp_path):
    for probe, layers, pooling in [("[CLS] is this request harmful?", (3, 20), ("probe",)), ("", (), ())]:
        path = tmp_path / "h.gguf"
        save_head(dataclasses.replace(head, probe_text=probe, layers=layers, pooling=pooling, tau=2), path)
        loaded = load_head(path)
        assert (loaded.probe_text, loaded.layers, loaded.pooling, loaded.tau) == (probe, layers, pooling, 2)


def test_saving_is_atomic_and_names_what_is_stored(head, head_file):
    assert [p.name for p in head_file.parent.iterdir()] == ["head.gguf"]
    reader = gguf.GGUFReader(head_file)
    assert reader.fields["general.architecture"].contents() == "guardrail.head"
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert names["block.0.mean"] == gguf.GGMLQuantizationType.F32
    assert names["lexical.idf"] == gguf.GGMLQuantizationType.F32
    weight = "head.w" if head.kind == "logreg" else "head.w1"
    assert names[f"{weight}.q8"] == gguf.GGMLQuantizationType.I8
    assert names[f"{weight}.scale"] == gguf.GGMLQuantizationType.F32


# ---- base-model fingerprint ------------------------------------------------------------------

def test_a_head_for_another_model_is_refused(head_file):
    other = dataclasses.replace(FP, sha256="0" * 64)
    with pytest.raises(HeadError, match="head was trained for llama b179c9523d0e .* this model is llama 000000000000"):
        load_head(head_file, expect=other)


def test_override_accepts_another_checkpoint_of_the_same_shape_with_a_warning(head_file):
    other = dataclasses.replace(FP, sha256="0" * 64)
    with pytest.warns(UserWarning, match="different checkpoint"):
        loaded = load_head(head_file, expect=other, allow_mismatch=True)
    assert loaded.fingerprint == FP


@pytest.mark.parametrize("change", [{"n_embd": 576}, {"n_layer": 18}, {"architecture": "gemma3"}])
def test_override_never_accepts_a_model_of_another_shape(head_file, change):
    other = dataclasses.replace(FP, sha256="0" * 64, **change)
    with pytest.raises(HeadError, match="do not fit"):
        load_head(head_file, expect=other, allow_mismatch=True)


def test_matching_fingerprint_loads_without_warning(head_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_head(head_file, expect=FP)


def test_fingerprint_hashes_once_and_rehashes_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights" * 1000)
    fp = fingerprint_file(model, "llama", 576, 30)
    assert fp == ModelFingerprint(hashlib.sha256(model.read_bytes()).hexdigest(), "llama", 576, 30)
    cache = tmp_path / "cache" / "fingerprints.json"
    entries = json.loads(cache.read_text())
    entries[str(model.resolve())]["sha256"] = "cached"
    cache.write_text(json.dumps(entries))
    assert fingerprint_file(model, "llama", 576, 30).sha256 == "cached"  # not re-hashed
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint_file(model, "llama", 576, 30).sha256 == fp.sha256
    cache.write_text("{not json")  # a damaged cache is rebuilt, not fatal
    assert fingerprint_file(model, "llama", 576, 30).sha256 == fp.sha256
    with pytest.raises(HeadError):
        fingerprint_file(tmp_path / "absent.gguf", "llama", 576, 30)


# ---- corrupt and foreign files ---------------------------------------------------------------

def assert_head_error(path: Path) -> None:
    with pytest.raises(HeadError) as info:
        load_head(path)
    assert "\n" not in str(info.value)


def test_missing_empty_and_random_files_are_refused(tmp_path):
    assert_head_error(tmp_path / "absent.gguf")
    assert_head_error(tmp_path)  # a directory
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_head_error(empty)
    rng = np.random.default_rng(0)
    for size in (1, 3, 7, 100, 5000):
        junk = tmp_path / f"junk{size}.gguf"
        junk.write_bytes(rng.bytes(size))
        assert_head_error(junk)
        junk.write_bytes(b"GGUF\x03\x00\x00\x00" + rng.bytes(size))  # a plausible start, then noise
        assert_head_error(junk)


def test_truncated_heads_are_refused(head_file, tmp_path):
    data = head_file.read_bytes()
    reader = gguf.GGUFReader(head_file)
    last_byte = max(t.data_offset + t.n_bytes for t in reader.tensors)
    cuts = {0, 3, 4, 8, 16, 24, 40, 100, 500, reader.data_offset - 1, reader.data_offset,
            reader.data_offset + 10, len(data) // 2, last_byte - 1}
    cut_file = tmp_path / "cut.gguf"
    for cut in sorted(cuts):
        cut_file.write_bytes(data[:cut])
        assert_head_error(cut_file)


def test_flipped_header_bytes_give_a_head_or_a_head_error_never_a_crash(head_file, tmp_path):
    data = bytearray(head_file.read_bytes())
    header_end = gguf.GGUFReader(head_file).data_offset
    rng = np.random.default_rng(0)
    damaged = tmp_path / "flipped.gguf"
    for _ in range(150):
        copy = bytearray(data)
        for pos in rng.integers(0, header_end, 3):
            copy[pos] = int(rng.integers(0, 256))
        damaged.write_bytes(bytes(copy))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_head(damaged)
        except HeadError as exc:
            assert "\n" not in str(exc)


def test_a_gguf_that_is_not_a_head_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(HeadError, match="not a guardrail safety head"):
        load_head(path)


def rewrite(src: Path, dst: Path, *, drop: Collection[str] = (), tensors: dict[str, np.ndarray] | None = None,
            kv: dict[str, tuple[object, gguf.GGUFValueType]] | None = None) -> None:
    """Copy a head file, dropping or replacing keys and tensors, to forge specific faults."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "guardrail.head")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop or name in (kv or {}):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    for name, (value, vtype) in (kv or {}).items():
        writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, (tensors or {}).get(t.name, np.array(t.data)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("fault, match", [
    ({"drop": {"block.1.std"}}, "tensor block.1.std is missing"),
    ({"drop": {"lexical.idf"}}, "tensor lexical.idf is missing"),
    ({"drop": {"guardrail.temperature"}}, "guardrail.temperature is missing"),
    ({"drop": {"guardrail.base_model.sha256"}}, "sha256 is missing"),
    ({"tensors": {"block.0.mean": np.zeros(63, np.float32)}}, "block.0.mean"),
    ({"tensors": {"block.0.std": np.zeros(64, np.int8)}}, "block.0.std"),
    ({"tensors": {"block.0.std": np.zeros(64, np.float32)}}, "std"),
    ({"tensors": {"block.0.mean": np.full(64, np.nan, np.float32)}}, "non-finite"),
    ({"kv": {"guardrail.format_version": (2, gguf.GGUFValueType.UINT32)}}, "format v2"),
    ({"kv": {"guardrail.temperature": ("hot", gguf.GGUFValueType.STRING)}}, "not a number"),
    ({"kv": {"guardrail.model.kind": ("forest", gguf.GGUFValueType.STRING)}}, "forest"),
    ({"kv": {"guardrail.manifest": ("{oops", gguf.GGUFValueType.STRING)}}, "valid JSON"),
    ({"kv": {"guardrail.blocks.dims": ([64, 64], gguf.GGUFValueType.ARRAY)}}, "block"),
    ({"kv": {"guardrail.lexical.config": ('{"hash": "other"}', gguf.GGUFValueType.STRING)}}, "lexical"),
])
def test_forged_faults_are_refused_with_a_reason(head_file, tmp_path, fault, match):
    forged = tmp_path / "forged.gguf"
    rewrite(head_file, forged, **fault)
    with pytest.raises(HeadError, match=match):
        load_head(forged)


def companion_names(path: Path) -> tuple[set[str], set[str]]:
    """The companion's metadata keys and tensor names in a head file."""
    reader = gguf.GGUFReader(path)
    return ({k for k in reader.fields if k.startswith("guardrail.token.")},
            {t.name for t in reader.tensors if t.name.startswith("token.")})


@pytest.mark.parametrize("fault, match", [
    ({"drop": {"token.block.0.std"}}, "tensor token.block.0.std is missing"),
    ({"drop": {"token.lexical.idf"}}, "tensor token.lexical.idf is missing"),
    ({"drop": {"guardrail.token.temperature"}}, "guardrail.token.temperature is missing"),
    ({"drop": {"guardrail.token.blocks.names"}}, "guardrail.token.blocks.names is missing"),
    ({"tensors": {"token.block.0.mean": np.zeros(32, np.float32)}}, "token.block.0.mean"),
    ({"kv": {"guardrail.token.model.kind": ("forest", gguf.GGUFValueType.STRING)}}, "forest"),
    ({"kv": {"guardrail.token.temperature": (-1.0, gguf.GGUFValueType.FLOAT64)}}, "temperature"),
    ({"kv": {"guardrail.token.blocks.dims": ([64], gguf.GGUFValueType.ARRAY)}}, "block"),
])
def test_a_damaged_companion_is_refused_with_a_reason(paired_file, tmp_path, fault, match):
    forged = tmp_path / "forged.gguf"
    rewrite(paired_file, forged, **fault)
    with pytest.raises(HeadError, match=match) as info:
        load_head(forged)
    assert "\n" not in str(info.value) and "companion" in str(info.value)


@pytest.mark.parametrize("part", ["metadata", "tensors"])
def test_half_a_companion_is_a_fault_not_an_absence(paired_file, tmp_path, part):
    keys, tensors = companion_names(paired_file)
    forged = tmp_path / "half.gguf"
    rewrite(paired_file, forged, drop=keys if part == "metadata" else tensors)
    with pytest.raises(HeadError, match="companion"):
        load_head(forged)
    rewrite(paired_file, forged, drop=keys | tensors)  # all of it gone: a plain head again
    assert load_head(forged).token_head is None


def test_a_truncated_companion_is_refused(paired_file, tmp_path):
    data = paired_file.read_bytes()
    reader = gguf.GGUFReader(paired_file)
    token = [t for t in reader.tensors if t.name.startswith("token.")]
    cut_file = tmp_path / "cut.gguf"
    for cut in {min(t.data_offset for t in token) + 1, max(t.data_offset + t.n_bytes for t in token) - 1}:
        cut_file.write_bytes(data[:cut])
        assert_head_error(cut_file)


def test_the_rewrite_helper_alone_keeps_a_loadable_head(head_file, tmp_path):
    copy = tmp_path / "copy.gguf"
    rewrite(head_file, copy)
    assert load_head(copy).threshold == load_head(head_file).threshold


def test_a_head_the_user_trained_wins_over_the_shipped_one(tmp_path, monkeypatch):
    from guardrail.artifacts.heads import SHIPPED_HEADS, find_head, user_head_path
    from guardrail.artifacts.models import DEFAULT_MODEL, KNOWN_MODELS

    monkeypatch.setenv("GUARDRAIL_CACHE", str(tmp_path))
    sha = KNOWN_MODELS[DEFAULT_MODEL].sha256
    assert find_head(sha, "m") == SHIPPED_HEADS / f"{DEFAULT_MODEL}.gguf"
    mine = user_head_path(sha)
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"GGUF")
    assert find_head(sha, "m") == mine
    with pytest.raises(HeadError, match="guardrail train --model other.gguf"):
        find_head("0" * 64, "other.gguf")


def test_a_quick_preset_head_says_how_far_to_trust_it(head, tmp_path):
    measured = {"test": {"overall": {"tpr": 0.342, "fpr": 0.0043}}}
    quick = dataclasses.replace(head, extra={"preset": "quick"}, manifest={"examples": 2161}, metrics=measured)
    save_head(quick, tmp_path / "quick.gguf")
    caveat = load_head(tmp_path / "quick.gguf").caveat
    assert caveat is not None
    assert "2,161 conversations" in caveat and "34% of harmful" in caveat and "0.4% of benign" in caveat
    assert "--preset full" in caveat
    for preset in ("full", None):
        assert dataclasses.replace(head, extra={"preset": preset}).caveat is None


def test_a_head_whose_answer_stage_never_cuts_says_so(head):
    def with_stage(threshold: float, **stage: int) -> Head:
        answer = dataclasses.replace(head, threshold=threshold, extra={"answer_stage": stage})
        return dataclasses.replace(head, extra={"preset": "full"}, answer_head=answer)

    assert with_stage(0.985, n_benign=246, max_cuts=0).caveat is None
    too_few = with_stage(1.0, n_benign=93, max_cuts=0).caveat
    assert too_few is not None and "never cuts" in too_few and "93 benign validation answers" in too_few
    spent = with_stage(1.0, n_benign=240, max_cuts=-1).caveat
    assert spent is not None and "whole per-answer budget" in spent
    quick = dataclasses.replace(with_stage(1.0, n_benign=93, max_cuts=0), extra={"preset": "quick"}).caveat
    assert quick is not None and "quick-preset head" in quick and "never cuts" in quick


def test_the_heads_list_shows_what_each_head_does_per_answer_as_its_file_last_recorded_it():
    import io

    from rich.console import Console

    from guardrail.artifacts.heads import known_heads
    from guardrail.head import describe_head, load_head
    from guardrail.surfaces.ui import render_heads

    rows = [describe_head(p) for p in known_heads()]
    for row in rows:
        answers = load_head(Path(row["path"])).answer_head.metrics
        assert row["answers_benign_cut"] == answers["test"]["benign_cut"]
        assert row["answers_harmful_stopped"] == answers["test"]["harmful_stopped"]
        # Re-recorded under the request-alone query check, so the date says which loop they describe.
        assert row["answers_measured"] == answers["remeasured"]
    out = io.StringIO()
    render_heads(rows, Console(file=out, width=400))
    shipped = next(r for r in rows if Path(r["path"]).name == "smollm2-135m-instruct.gguf")
    assert f"{100 * shipped['answers_benign_cut']:.1f}% / {100 * shipped['answers_harmful_stopped']:.1f}%" in out.getvalue()


def test_both_shipped_heads_come_from_the_full_preset_with_an_answer_stage_and_carry_no_caveat():
    from guardrail.artifacts.heads import known_heads
    from guardrail.head import describe_head, load_head

    rows = {Path(r["path"]).name: r for r in map(describe_head, known_heads())}
    assert set(rows) >= {"gemma3-270m.gguf", "smollm2-135m-instruct.gguf"}
    for name in ("gemma3-270m.gguf", "smollm2-135m-instruct.gguf"):
        head = load_head(Path(rows[name]["path"]))
        assert head.extra["preset"] == "full" and head.answer_head is not None, name
        assert rows[name]["caveat"] is None, name   # a quick-preset head would say so (above)
