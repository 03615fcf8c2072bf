"""Training a safety head: features through the engine and capture, a numpy trainer, a head file.

Lives beside the decoding loop, not inside it. Extraction is the slow part (a
forward pass per conversation on the CPU), so features are cached on disk,
keyed by the model's sha256, the feature config and the examples themselves.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .artifacts import cache_dir
from .data.format import Example
from .engine import Model
from .evaluate import HeadRecipe, Labelled
from .head import Head
from .features import FeatureConfig, FeatureExtractor, Features


def conversation(example: Example) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in example.messages]


def _cache_key(model_sha: str, config: FeatureConfig, examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    digest.update(model_sha.encode())
    digest.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    for example in examples:
        digest.update(json.dumps([example.id, conversation(example)], ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


def extract_features(model: Model, model_sha: str, examples: Sequence[Example], config: FeatureConfig, *,
                     progress: bool = True, label: str = "extracting features") -> Features:
    """Features of every example, from the on-disk cache when this exact request was run before."""
    path = cache_dir() / "features" / f"{_cache_key(model_sha, config, examples)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            blocks = {k: stored[k].astype(np.float32) for k in stored.files if k != "__texts__"}
            texts = json.loads(str(stored["__texts__"]))
        return Features(blocks, texts)
    extractor = FeatureExtractor(model, config)
    started = time.perf_counter()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), disable=not progress, transient=False) as bar:
            task = bar.add_task(label, total=len(examples))
            features = extractor.extract([conversation(e) for e in examples],
                                         progress=lambda n: bar.advance(task, n))
    finally:
        extractor.close()
    features.blocks["__seconds__"] = np.array([time.perf_counter() - started], np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part.npz")
    np.savez(partial, __texts__=np.array(json.dumps(features.texts)),
             **{k: v.astype(np.float16) if v.ndim == 2 and v.shape[1] > 8 else v for k, v in features.blocks.items()})
    partial.replace(path)
    return features


# ---------------------------------------------------------------------------
# The whole recipe: data -> features -> LOSO -> head file

SPLITS = ("train", "val", "test")


def load_labelled(model: Model, model_sha: str, data_dir: Path, config: FeatureConfig,
                  progress: bool = True) -> tuple[list[Example], Labelled]:
    """All splits of a built dataset with their features, in one Labelled table."""
    from .data import read_jsonl

    examples: list[Example] = []
    splits: list[str] = []
    parts: list[Features] = []
    for split in SPLITS:
        rows = read_jsonl(data_dir / f"{split}.jsonl")
        examples.extend(rows)
        splits.extend([split] * len(rows))
        parts.append(extract_features(model, model_sha, rows, config, progress=progress, label=f"features: {split}"))
    names = [k for k in parts[0].blocks if not k.startswith("__")]
    blocks = {k: np.concatenate([p.blocks[k] for p in parts]) for k in names}
    texts = [t for p in parts for t in p.texts]
    data = Labelled(Features(blocks, texts), np.array([e.label for e in examples]),
                    np.array([e.source for e in examples], dtype=object), np.array(splits, dtype=object))
    return examples, data


# The dataset the default head is trained on: every source, capped so that
# extraction (a forward pass per conversation) fits minutes on a 2-core CPU.
DEFAULT_MAX_PER_SOURCE = 200
DEFAULT_PLAN = dict(jailbreak=400, rephrase_harmful=400, rephrase_benign=200, answer_prefixes=360,
                    compliant_prefixes=320, safe_prefixes=160, refusals=200, prefills=400)


def default_data_dir() -> Path:
    return cache_dir() / "data" / "default-v1"


def ensure_dataset(data_dir: Path | None, progress: bool = True) -> Path:
    """The dataset directory, built with the default recipe when it does not exist yet."""
    from .data import build_dataset
    from .data.augment import AugmentPlan

    data_dir = data_dir or default_data_dir()
    if not all((data_dir / f"{s}.jsonl").is_file() for s in SPLITS):
        build_dataset(data_dir, max_per_source=DEFAULT_MAX_PER_SOURCE, plan=AugmentPlan(**DEFAULT_PLAN),
                      progress=progress)
    return data_dir


def train_head(model: Model, model_sha: str, data_dir: Path, config: FeatureConfig, recipe: HeadRecipe,
               token_recipe: HeadRecipe | None, *, loso_sources: bool = True, progress: bool = True,
               log: Callable[[str], None] = print) -> Head:
    """Features -> LOSO metrics (head and text baseline) -> final head with its token companion.

    The final head is fitted on the train split, calibrated and thresholded on
    validation; the test split is only scored, never fitted or tuned on."""
    from .evaluate import baseline_head, evaluate_head, fit_head, loso
    from .head import ModelFingerprint, quantization_report, quantized

    started = time.perf_counter()
    examples, data = load_labelled(model, model_sha, data_dir, config, progress=progress)
    extracted = time.perf_counter()
    info = model.info
    fingerprint = ModelFingerprint(model_sha, info.architecture, info.n_embd, info.n_layer)
    metrics: dict = {"recipe": recipe.describe(), "feature_config": asdict(config)}
    if loso_sources:
        log(f"leave-one-source-out: {recipe.describe()} and the text baseline")
        metrics["loso"] = loso(data, recipe, fingerprint)
        metrics["loso_baseline"] = loso(data, HeadRecipe(blocks=(), lexical=True), fingerprint)
    train = np.flatnonzero(data.splits == "train")
    val = np.flatnonzero(data.splits == "val")
    test = np.flatnonzero(data.splits == "test")
    head = fit_head(data, train, val, recipe, fingerprint, probe_text=config.probes[0], layers=config.layers)
    baseline = baseline_head(data, train, val, fingerprint)
    metrics["test"] = evaluate_head(quantized(head), data, test)
    metrics["test_baseline"] = evaluate_head(baseline, data, test)
    feats = {b.name: data.features.blocks[b.name][test] for b in head.blocks if b.name != "lexical"}
    metrics["quantization"] = quantization_report(head, quantized(head), feats,
                                                  [data.features.texts[i] for i in test], data.labels[test])
    if token_recipe is not None:
        token_head = fit_head(data, train, val, token_recipe, fingerprint, layers=config.layers)
        metrics["token_test"] = evaluate_head(quantized(token_head), data, test)
        head = replace(head, token_head=token_head)
    metrics["seconds"] = {"extraction": extracted - started, "training": time.perf_counter() - extracted}
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest = {k: manifest[k] for k in ("seed_text", "max_per_source", "totals", "sources", "variants")
                if k in manifest}
    manifest["examples"] = len(examples)
    return replace(head, manifest=manifest, metrics=metrics)
