"""The host model's own answers to training requests, with the hidden states of every token.

The checks during an answer read states of answers this model writes, so that is
what the answer stage is trained on: for each chosen request, the model answers
(greedy or sampled, up to ``max_tokens``), unguarded, exactly as it would before
the guard's first answer check, and every position's states at the chosen layers
are kept. Answers are generated several at a time through the runtime's batcher
(one ``llama_decode`` per step for all of them, see :mod:`guardrail.runtime.batch`).

Each answer is stored in its own file under the model's store, keyed by the model,
the layers, the request and how it was sampled: a killed run resumes where it
stopped, and any other job that asks for the same answer reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from guardrail.artifacts.wheels import cache_dir
from guardrail.runtime.batch import Batcher, Decode, Decoded
from guardrail.runtime.capture import layer_name
from guardrail.runtime.chat import ChatFormat, PromptTokens
from guardrail.runtime.engine import Context, Detokenizer, Entry, Model, Sampler, SamplingParams

from .data.format import Example, variant_family

_LAYOUT = "answers-v1"  # bump when what a stored answer holds changes


@dataclass(frozen=True)
class AnswerSpec:
    """How one answer is written: its length cap and sampling (temperature 0 = greedy)."""

    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    max_prompt: int = 320


@dataclass
class Trajectory:
    """One stored answer: the prompt and answer tokens, which prompt tokens are content, and the
    states of every position (float16 (n, d) per hook; float32 where float16 would overflow)."""

    key: str
    ids: np.ndarray            # int32, prompt then answer
    n_prompt: int
    message: np.ndarray        # int16, per prompt position: its message index, -1 for template markup
    states: dict[str, np.ndarray]
    text: str
    finish: str                # stop | length
    seconds: float

    @property
    def n_answer(self) -> int:
        return len(self.ids) - self.n_prompt


def answer_key(model_sha: str, hooks: Sequence[str], example: Example, spec: AnswerSpec) -> str:
    what = [_LAYOUT, model_sha, list(hooks), example.id, [[m.role, m.content] for m in example.messages], asdict(spec)]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:24]


def answers_dir(model_sha: str) -> Path:
    return cache_dir() / "answers" / model_sha[:16]


def _messages(example: Example) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in example.messages]


def _rollout(context: Context, seq: int, prompt: PromptTokens, spec: AnswerSpec,
             hooks: Sequence[str]) -> Generator[Decode, Decoded, tuple[list[int], dict, str, str]]:
    """One unguarded answer in KV sequence ``seq``, with the states of every position it decoded."""
    model = context.model
    rows: dict[str, list[np.ndarray]] = {h: [] for h in hooks}

    def keep(got: Decoded, n: int) -> None:
        assert got.states is not None
        for h in hooks:
            rows[h].append(np.array(got.states.rows[h][:n], np.float32))

    pending = [Entry(t, p, (seq,), p == len(prompt) - 1) for p, t in enumerate(prompt.ids)]
    out = -1
    while pending:
        got = yield Decode(pending, split=True)
        keep(got, got.taken)
        if pending[got.taken - 1].output:
            out = got.index(got.taken - 1)
        pending = pending[got.taken:]
    sampler = Sampler(model, SamplingParams(temperature=spec.temperature, seed=spec.seed))
    detok = Detokenizer(model)
    answer: list[int] = []
    text, finish = "", "length"
    for _ in range(spec.max_tokens):
        token = sampler.sample(context, out)
        if model.is_eog(token):
            finish = "stop"
            break
        got = yield Decode([Entry(token, len(prompt) + len(answer), (seq,), True)])
        keep(got, 1)
        out = got.index(0)
        answer.append(token)
        text += detok.push(token)
    text += detok.flush()
    return answer, {h: np.concatenate(r) for h, r in rows.items()}, text, finish


def _save(path: Path, t: Trajectory) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part.npz")
    states = {f"state:{h}": (v.astype(np.float16) if np.abs(v).max(initial=0) < 6e4 else v)
              for h, v in t.states.items()}
    arrays: dict[str, np.ndarray] = {"ids": t.ids, "n_prompt": np.array([t.n_prompt]), "message": t.message,
                                     "meta": np.array(json.dumps({"text": t.text, "finish": t.finish,
                                                                  "seconds": t.seconds})), **states}
    np.savez(partial, **arrays)  # type: ignore[arg-type]
    partial.replace(path)


def load_trajectory(path: Path) -> Trajectory:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        states = {k[len("state:"):]: f[k] for k in f.files if k.startswith("state:")}
        return Trajectory(path.stem, f["ids"], int(f["n_prompt"][0]), f["message"], states, meta["text"],
                          meta["finish"], float(meta["seconds"]))


class AnswerStore:
    """Answers of one model at chosen layers: generated once, stored by answer, read back by key."""

    def __init__(self, model: Model, model_sha: str, layers: Sequence[int]):
        self.model = model
        self.model_sha = model_sha
        self.hooks = tuple(layer_name(layer) for layer in sorted(layers))
        self.dir = answers_dir(model_sha)
        self.format = ChatFormat(model)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def keys(self, items: Sequence[tuple[Example, AnswerSpec]]) -> list[str]:
        return [answer_key(self.model_sha, self.hooks, e, s) for e, s in items]

    def _unique(self, items: Sequence[tuple[Example, AnswerSpec]]) -> list[tuple[int, str]]:
        """(index, key) of each item whose key was not given before it."""
        seen: set[str] = set()
        out = []
        for i, key in enumerate(self.keys(items)):
            if key not in seen:
                out.append((i, key))
            seen.add(key)
        return out

    def missing(self, items: Sequence[tuple[Example, AnswerSpec]]) -> list[int]:
        return [i for i, key in self._unique(items) if not self.path(key).is_file()]

    def todo(self, items: Sequence[tuple[Example, AnswerSpec]], *, whole: bool = False) -> list[int]:
        """The items :meth:`generate` writes: the missing ones, or, for a ``whole`` draw with any
        missing, every one (each key once)."""
        unique = self._unique(items)
        missing = [i for i, key in unique if not self.path(key).is_file()]
        return [i for i, _ in unique] if whole and missing else missing

    def generate(self, items: Sequence[tuple[Example, AnswerSpec]], *, n_parallel: int = 12, whole: bool = False,
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Write every missing answer; returns what it cost (answers, tokens, seconds).

        A greedy answer is not a function of its request alone: its neighbours in the batch and the
        shared context's size move the last bits of its states, and at a near-tie its next token
        (measured: a test draw resumed twice kept 14 of its 200 harmful answers' text). So answers
        resume one by one only where no one reads their text; a ``whole`` draw (the answers hand
        labels are read on) is written in one run: with any answer missing, all of them are written
        again, exactly as an uninterrupted run writes them."""
        todo = self.todo(items, whole=whole)
        if not todo:
            return {"answers": 0, "tokens": 0, "seconds": 0.0}
        keys = self.keys(items)
        longest = max(min(len(self.format.tokens(_messages(items[i][0]))), items[i][1].max_prompt)
                      + items[i][1].max_tokens for i in todo)
        # Attention reads every cell below the cache's high-water mark, masked or not, so the shared
        # context is sized for the answers in flight and no more (measured: 16 answers decode at 273
        # tokens/s over 100 cells, 107 over 9,000).
        context = Context(self.model, n_ctx=n_parallel * (longest + 8), n_batch=512, n_seq_max=n_parallel,
                          hooks=self.hooks)
        started, tokens = time.perf_counter(), 0
        try:
            batcher = Batcher(context, prompt_chunk=128)
            queue = list(todo)
            free = list(range(n_parallel))

            def start(i: int, seq: int) -> None:
                example, spec = items[i]
                prompt = self.format.tokens(_messages(example)).truncated(spec.max_prompt)
                began = time.perf_counter()
                result: list[tuple[list[int], dict, str, str]] = []

                def run() -> Generator[Decode, Decoded, None]:
                    result.append((yield from _rollout(context, seq, prompt, spec, self.hooks)))

                def done(exc: BaseException | None) -> None:
                    nonlocal tokens
                    context.seq_rm(seq, -1, -1)
                    free.append(seq)
                    if exc is not None:
                        raise exc
                    answer, states, text, finish = result[0]
                    t = Trajectory(keys[i], np.asarray(prompt.ids + answer, np.int32), len(prompt),
                                   np.asarray(prompt.message, np.int16), states, text, finish,
                                   time.perf_counter() - began)
                    _save(self.path(keys[i]), t)
                    tokens += len(t.ids)
                    if progress:
                        progress(1)
                batcher.add(run(), lambda event: None, done)
            while queue or batcher.active:
                while queue and free:
                    start(queue.pop(0), free.pop(0))
                batcher.step()
        finally:
            context.close()
        return {"answers": len(todo), "tokens": tokens, "seconds": time.perf_counter() - started}

    def load(self, key: str) -> Trajectory:
        return load_trajectory(self.path(key))


# ---------------------------------------------------------------------------
# Which requests the model answers

# Benign sources whose requests sound sensitive (health and first aid, safety, security
# education, drugs, violence in history and fiction, law): over-represented, since these are
# the answers a guard must not cut.
SENSITIVE_SOURCES = ("overrefusal", "rho_refusal", "healthbench", "consumer_health", "wsr", "redteam_benign",
                     "pyrit_refusal", "forgelm_chat")

# Shares of each form among the answers, by label: the forms the answer stage meets.
HARMFUL_MIX = {"plain": 0.30, "jailbreak": 0.15, "form": 0.20, "rephrase": 0.15, "prefix:prefill": 0.10,
               "prefix:compliant": 0.10}
BENIGN_MIX = {"plain": 0.62, "form": 0.12, "jailbreak": 0.08, "rephrase": 0.06, "prefix:prefill": 0.06,
              "prefix:answer": 0.06}
SENSITIVE_SHARE = 0.5   # of benign plain requests
SAMPLED_SHARE = 1 / 3   # answers sampled at temperature 0.8 rather than greedy


def family(example: Example) -> str:
    """The form of a request as the mixes above name it: its :func:`variant_family`, with the attack
    forms (persona, multi-turn, obfuscation...) drawn as one family, "form"."""
    fam = variant_family(example.variant)
    return "form" if fam.startswith("form:") else fam


def _spread(rows: Sequence[Example], n: int, salt: str) -> list[Example]:
    """Up to ``n`` rows, round-robin over sources, each source's rows in hash order (deterministic)."""
    from .data.augment import unit_hash

    by_source: dict[str, list[Example]] = {}
    for row in sorted(rows, key=lambda e: unit_hash(f"{salt}:{e.id}")):
        by_source.setdefault(row.source, []).append(row)
    out: list[Example] = []
    queues = [list(v) for _, v in sorted(by_source.items())]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def draw_requests(rows: Sequence[Example], n_harmful: int, n_benign: int, *, split: str, draw: int = 1,
                  max_tokens: int = 256) -> list[tuple[Example, AnswerSpec]]:
    """Draw number ``draw`` of a split's answered requests. Draw 1 is the one training reports on; each
    later draw takes only requests whose origin no earlier draw touched, so it measures a head again on
    fresh requests (not on other forms of the same ones): one draw of 400 benign answers puts a 2% rate
    on 8 answers, and whether a half-point between two heads is real needs a second."""
    if draw < 1:
        raise ValueError(f"draw {draw}: draws count from 1")
    pool = list(rows)
    for k in range(1, draw + 1):
        items = choose_requests(pool, n_harmful, n_benign, salt=f"answers-{split}" + (f"-draw{k}" if k > 1 else ""),
                                max_tokens=max_tokens)
        used = {e.origin for e, _ in items}
        pool = [r for r in pool if r.origin not in used]
    return items


def choose_requests(rows: Sequence[Example], n_harmful: int, n_benign: int, *, salt: str = "answers",
                    max_tokens: int = 256) -> list[tuple[Example, AnswerSpec]]:
    """The requests the model answers for the answer stage, each with how its answer is sampled."""
    from .data.augment import unit_hash

    chosen: list[Example] = []
    for label, n, mix in ((1, n_harmful, HARMFUL_MIX), (0, n_benign, BENIGN_MIX)):
        pool = [r for r in rows if r.label == label]
        for fam, share in mix.items():
            group = [r for r in pool if family(r) == fam]
            want = round(n * share)
            if label == 0 and fam == "plain":
                sensitive = [r for r in group if r.source in SENSITIVE_SOURCES]
                picked = _spread(sensitive, round(want * SENSITIVE_SHARE), salt)
                rest = [r for r in group if r.source not in SENSITIVE_SOURCES]
                picked += _spread(rest, want - len(picked), salt)
            else:
                picked = _spread(group, want, salt)
            chosen.extend(picked)
    out = []
    for e in chosen:
        sampled = unit_hash(f"{salt}-sample:{e.id}") < SAMPLED_SHARE
        seed = int(unit_hash(f"{salt}-seed:{e.id}") * 2**31)
        out.append((e, AnswerSpec(max_tokens=max_tokens, temperature=0.8 if sampled else 0.0,
                                  seed=seed if sampled else 0)))
    return out
