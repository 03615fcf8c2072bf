"""Features for training and evaluating heads: the host model's own states for labelled conversations.

Several conversations share each ``llama_decode`` (one KV sequence each; the
prefix they share is decoded once), and their probes share the next one. What
each block means, and the window, come from :mod:`guardrail.runtime.features`,
the same code the decoding loop uses. Besides the states: ``opener``, the
model's own log-odds of refusal vs compliance openers as its next token, and
the window's text (for the lexical baseline).
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardrail.artifacts.wheels import cache_dir
from guardrail.runtime.capture import layer_name
from guardrail.runtime.chat import ChatFormat, PromptTokens
from guardrail.errors import CaptureError
from guardrail.runtime.engine import Context, DecodeResult, Entry, Model
from guardrail.runtime.features import (
    POOLINGS,
    StateHistory,
    Window,
    check_features,
    first_window,
    probe_tokens,
    split_conversation,
)
from guardrail.runtime.probe import DEFAULT_PROBE_TEXT, Probe, WindowParams, runs

from .data.format import Example, Message

REFUSAL_OPENERS = ("Sorry", "I", "As", "Unfortunately", "No")
COMPLIANCE_OPENERS = ("Sure", "Here", "Certainly", "Absolutely", "Step", "To", "1")




@dataclass(frozen=True)
class FeatureConfig:
    """``probes``: the first gives blocks ``l_out-L/probe``, the j-th ``l_out-L/probe<j>``."""

    layers: tuple[int, ...]
    probes: tuple[str, ...] = (DEFAULT_PROBE_TEXT,)
    window: WindowParams = WindowParams()
    max_tokens: int = 640
    n_parallel: int = 8
    n_batch: int = 1024
    n_threads: int | None = None  # None: every core ($GUARDRAIL_THREADS)
    # None: llama.cpp's choice (on). Training keeps it although a one-answer guard on a CPU decodes with it
    # off (engine.default_flash_attn): with 8 conversations in one cache, off extracted 1.4x slower, and the
    # shipped head read the same on either (README, "A chat that keeps its cache").
    flash_attn: bool | None = None


@dataclass
class Features:
    """Feature blocks (name -> (n, d) float32) and the window text of every conversation."""

    blocks: dict[str, np.ndarray]
    texts: list[str]

    def take(self, index: np.ndarray) -> Features:
        return Features({k: v[index] for k, v in self.blocks.items()}, [self.texts[i] for i in index])




def opener_tokens(model: Model) -> tuple[list[int], list[int]]:
    first = lambda w: model.tokenize(w)[0]  # noqa: E731
    return [first(w) for w in REFUSAL_OPENERS], [first(w) for w in COMPLIANCE_OPENERS]


def opener_logodds(logits: np.ndarray, refusal: Sequence[int], compliance: Sequence[int]) -> np.ndarray:
    """log P(refusal openers) - log P(compliance openers), and each side's log-probability."""
    z = logits - logits.max()
    log_norm = np.log(np.exp(z).sum())
    lr = np.log(np.exp(z[list(refusal)]).sum()) - log_norm
    lc = np.log(np.exp(z[list(compliance)]).sum()) - log_norm
    return np.array([lr - lc, lr, lc], dtype=np.float32)


class FeatureExtractor:
    """Runs conversations through the model (several per decode) and collects their features."""

    def __init__(self, model: Model, config: FeatureConfig):
        self.model = model
        self.config = config
        self.format = ChatFormat(model)
        self.hooks = tuple(layer_name(layer) for layer in config.layers)
        if any(layer >= model.info.n_layer - 1 for layer in config.layers):
            raise ValueError("features read layers below the last (the last holds output rows only)")
        self.probes = [probe_tokens(model, text) for text in config.probes]
        self.probe_names = ["probe"] + [f"probe{j}" for j in range(1, len(self.probes))]
        n_seq = 2 * config.n_parallel
        self.context = Context(model, n_ctx=config.n_parallel * (config.max_tokens + 64) + 256,
                               n_batch=config.n_batch, n_seq_max=n_seq, hooks=self.hooks,
                               n_threads=config.n_threads, flash_attn=config.flash_attn)
        self.refusal, self.compliance = opener_tokens(model)
        self.tokens_decoded = 0  # prompt tokens of the conversations (probes not counted)

    def close(self) -> None:
        self.context.close()

    def extract(self, conversations: Sequence[Sequence[dict]],
                progress: Callable[[int], None] | None = None) -> Features:
        prepared = [self._prepare(messages) for messages in conversations]
        n = len(prepared)
        d = self.model.info.n_embd
        blocks = {f"{h}/{kind}": np.zeros((n, d), np.float32)
                  for h in self.hooks for kind in (*POOLINGS, *self.probe_names)}
        blocks["opener"] = np.zeros((n, 3), np.float32)
        texts = [""] * n
        group: list[int] = []
        used = 0
        for i, (prompt, _window) in enumerate(prepared):
            if group and (len(group) == self.config.n_parallel or used + len(prompt) > self.config.n_batch):
                self._run_group(group, prepared, blocks, texts)
                if progress:
                    progress(len(group))
                group, used = [], 0
            group.append(i)
            used += len(prompt)
        if group:
            self._run_group(group, prepared, blocks, texts)
            if progress:
                progress(len(group))
        return Features(blocks, texts)

    def _prepare(self, messages: Sequence[dict]) -> tuple[PromptTokens, list[int]]:
        prompt = self.format.tokens(messages).truncated(self.config.max_tokens)
        query, answer = split_conversation(prompt, messages)
        window = first_window(query, answer, self.config.window)
        return prompt, window

    def _run_group(self, group: list[int], prepared, blocks, texts) -> None:
        """Decode a group of conversations, one sequence each; the prefix they share
        (the template's system preamble, mostly) is decoded once for all of them."""
        ctx = self.context
        ctx.clear()
        prompts = [prepared[i][0].ids for i in group]
        shared = _common_prefix(prompts)
        everyone = tuple(range(len(group)))
        prefix_rows = {}
        if shared:
            first = ctx.decode([Entry(t, p, everyone) for p, t in enumerate(prompts[0][:shared])])
            prefix_rows = {h: _rows(first)[h].copy() for h in self.hooks}
        entries: list[Entry] = []
        spans = []
        for seq, ids in enumerate(prompts):
            spans.append(len(entries))
            last = len(ids) - 1
            entries.extend(Entry(ids[p], p, (seq,), p == last) for p in range(shared, len(ids)))
        result = ctx.decode(entries)
        self.tokens_decoded += shared + len(entries)
        names = [f"{h}/{kind}" for h in self.hooks for kind in POOLINGS]
        for seq, i in enumerate(group):
            prompt, window = prepared[i]
            start, n_own = spans[seq], len(prompt) - shared
            history = StateHistory(self.hooks, self.model.info.n_embd, capacity=len(prompt))
            own = {h: _rows(result)[h][start:start + n_own] for h in self.hooks}
            if shared:
                history.append(prefix_rows)
            history.append(own)
            # the same function the decoding loop's checks read
            for name, vector in check_features(names, history, Window.of(window, len(prompt) - 1)).items():
                blocks[name][i] = vector
            blocks["opener"][i] = opener_logodds(ctx.logits(start + n_own - 1), self.refusal, self.compliance)
            texts[i] = self.model.detokenize([prompt.ids[p] for p in window])
        for tokens, kind in zip(self.probes, self.probe_names):
            probe_entries: list[Entry] = []
            probe_last = []
            for seq, i in enumerate(group):
                probe = Probe(ctx, tokens, seq=self.config.n_parallel + seq, src=seq)
                probe_entries.extend(probe.attach(runs(prepared[i][1])))
                probe_last.append(len(probe_entries) - 1)
            probed = ctx.decode(probe_entries)
            for seq, i in enumerate(group):
                for h in self.hooks:
                    blocks[f"{h}/{kind}"][i] = _rows(probed)[h][probe_last[seq]]
                ctx.seq_rm(self.config.n_parallel + seq, -1, -1)


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


# ---------------------------------------------------------------------------
# Extraction as a job: a store of rows by conversation, resumable, with an ETA

CHUNK = 256  # conversations per saved part: a killed run loses at most one part's work
_LAYOUT = "features-v6"  # bump when what a stored row holds changes
PARTIAL = ".part.npz"  # a part while it is written; renamed to its own name once whole


def conversation(example: Example) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in example.messages]


def plain_examples(example: Example) -> tuple[Example, Example, Example] | None:
    """The example's request as the query check also reads it when its last user turn reads as
    encoded or split (:func:`guardrail.runtime.encodings.read_conversation`): (its decoded spans or
    joined pieces alone, its text with them in place, what it says around them), a final prefill
    left out (the query check reads the request alone); None when it reads as neither."""
    from dataclasses import replace

    from guardrail.runtime.encodings import read_conversation

    messages = conversation(example)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    read = read_conversation(messages)
    if read is None:
        return None
    def reading(name: str, messages: list[dict[str, str]]) -> Example:
        return replace(example, id=f"{example.id}~{name}", messages=tuple(Message(m["role"], m["content"]) for m in messages))
    return reading("alone", read.alone), reading("in-place", read.in_place), reading("around", read.around)


@dataclass(frozen=True)
class PlainFeatures:
    """Features of the plain readings of the encoded or split requests among some examples: example
    ``i`` with a reading has row ``of[i]`` in ``alone`` (its decoded spans or joined pieces alone),
    ``in_place`` (its text with them in place) and ``around`` (what it says around them); ``of[i]``
    is -1 for the others."""

    of: np.ndarray
    alone: Features
    in_place: Features
    around: Features

    def row(self, i: int) -> tuple[Features, Features, Features] | None:
        k = int(self.of[i])
        if k < 0:
            return None
        one = np.array([k])
        return self.alone.take(one), self.in_place.take(one), self.around.take(one)


def plain_features(model: Model, model_sha: str, examples: Sequence[Example], config: FeatureConfig, *,
                   progress: bool = False) -> PlainFeatures | None:
    """The plain readings' features of the encoded or split requests among ``examples`` (extracted
    once, stored like any conversation), so a replay or an evaluation scores them as the loop's query
    check does; None when none reads as either."""
    read = [plain_examples(e) for e in examples]
    found = [r for r in read if r is not None]
    if not found:
        return None
    feats = extract_features(model, model_sha, [e for three in found for e in three], config, progress=progress,
                             label="plain readings")
    rows = Features({k: v for k, v in feats.blocks.items() if not k.startswith("__")}, feats.texts)
    of = np.cumsum([r is not None for r in read]) - 1
    of[[r is None for r in read]] = -1
    n = len(found)
    return PlainFeatures(of, *(rows.take(np.arange(k, 3 * n, 3)) for k in range(3)))


def example_key(example: Example) -> str:
    """A conversation's identity in the store: its id and its exact messages."""
    text = json.dumps([example.id, conversation(example)], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def store_dir(model_sha: str, config: FeatureConfig) -> Path:
    """Where rows of one (model, extraction config) live; threads change speed, not features."""
    what = {k: v for k, v in asdict(config).items() if k != "n_threads"}
    digest = hashlib.sha256(json.dumps([_LAYOUT, model_sha, what], sort_keys=True, default=str).encode())
    return cache_dir() / "features" / f"{model_sha[:12]}-{digest.hexdigest()[:16]}"


def _rows(result: DecodeResult) -> dict[str, np.ndarray]:
    """The captured states of a decode (the extractor's context always captures its hooks)."""
    if result.states is None:
        raise CaptureError("the extraction context captured nothing; it was built without hooks")
    return result.states.rows


def _save(path: Path, features: Features, keys: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL)
    # float32: some models' residual streams (Gemma 3's) exceed float16's range
    blocks: dict[str, Any] = dict(features.blocks)
    np.savez(partial, __texts__=np.array(json.dumps(features.texts)), __keys__=np.array(list(keys)), **blocks)
    partial.replace(path)


def _index(store: Path) -> dict[str, tuple[Path, int]]:
    """key -> (part file, row) for every stored conversation (reads only each part's keys)."""
    index: dict[str, tuple[Path, int]] = {}
    for part in sorted(store.glob("part-*.npz")):
        if part.name.endswith(PARTIAL):
            continue  # another run is still writing it: not ours to read or remove
        try:
            with np.load(part, allow_pickle=False) as stored:
                for row, key in enumerate(stored["__keys__"].tolist()):
                    index.setdefault(key, (part, row))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            part.unlink(missing_ok=True)  # a torn file: its rows are extracted again
    return index


def _gather(index: dict[str, tuple[Path, int]], keys: Sequence[str]) -> Features:
    by_part: dict[Path, list[tuple[int, int]]] = {}
    for i, key in enumerate(keys):
        part, row = index[key]
        by_part.setdefault(part, []).append((i, row))
    blocks: dict[str, np.ndarray] = {}
    texts = [""] * len(keys)
    seconds = tokens = 0.0
    for part, pairs in by_part.items():
        with np.load(part, allow_pickle=False) as stored:
            mine, rows = np.array([i for i, _ in pairs]), np.array([r for _, r in pairs])
            part_texts = json.loads(str(stored["__texts__"]))
            n_part = len(part_texts)
            for name in stored.files:
                if name.startswith("__"):
                    continue
                data = stored[name]
                if name not in blocks:
                    blocks[name] = np.zeros((len(keys), *data.shape[1:]), np.float32)
                blocks[name][mine] = data[rows]
            for i, r in pairs:
                texts[i] = part_texts[r]
            share = len(pairs) / max(1, n_part)  # this request's share of the part's time and tokens
            seconds += share * float(stored["__seconds__"][0]) if "__seconds__" in stored.files else 0.0
            tokens += share * float(stored["__tokens__"][0]) if "__tokens__" in stored.files else 0.0
    blocks["__seconds__"] = np.array([seconds], np.float64)
    blocks["__tokens__"] = np.array([tokens], np.float64)
    return Features(blocks, texts)


def extract_features(model: Model, model_sha: str, examples: Sequence[Example], config: FeatureConfig, *,
                     progress: bool = True, label: str = "extracting features") -> Features:
    """Features of every example, from a store kept by (model, config) and filled as needed.

    Rows are stored by conversation, so a killed run continues where it stopped (at most one
    part of ``CHUNK`` conversations is lost), and any other dataset that shares conversations
    (a preset inside a bigger one) reuses them. ``__seconds__`` and ``__tokens__`` record the
    extraction's own time and the prompt tokens it decoded for these examples (what
    ``guardrail bench extraction`` compares with plain prompt processing)."""
    from .progress import progress_bar

    store = store_dir(model_sha, config)
    keys = [example_key(e) for e in examples]
    index = _index(store) if store.is_dir() else {}
    missing: dict[str, int] = {}  # a conversation given twice is extracted once
    for i, key in enumerate(keys):
        if key not in index:
            missing.setdefault(key, i)
    todo = list(missing.values())
    extractor = None
    try:
        with progress_bar(progress) as bar:
            cached = sum(1 for k in keys if k in index)
            task = bar.add_task(label + (f" ({cached} stored)" if cached else ""), total=len(todo))
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                extractor = extractor or FeatureExtractor(model, config)
                began = time.perf_counter()
                part = extractor.extract([conversation(examples[i]) for i in chunk],
                                         progress=lambda n: bar.advance(task, n))
                part.blocks["__seconds__"] = np.array([time.perf_counter() - began], np.float64)
                part.blocks["__tokens__"] = np.array([extractor.tokens_decoded], np.float64)
                extractor.tokens_decoded = 0
                path = store / f"part-{time.time_ns():x}.npz"
                _save(path, part, [keys[i] for i in chunk])
                index.update({keys[i]: (path, row) for row, i in enumerate(chunk)})
    finally:
        if extractor is not None:
            extractor.close()
    return _gather(index, keys)
