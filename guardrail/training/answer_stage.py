"""The answer stage: a head for the checks during an answer, trained on the model's own answers,
and a sequential rule calibrated per answer.

The query check decides once, on the request. The checks during an answer decide
at every token of answers the query check let through, so a rate per check says
little: a 256-token answer is checked 256 times. What a user meets is the rate per
answer, so that is what the rule is calibrated for: its statistic is the largest
value the rule reaches over a whole answer, and its threshold is chosen on
validation answers of benign requests so that at most ``alpha`` of benign answers
are cut, held for three draws of validation answers in four (:func:`allowed_cuts`).
The query check and the answer stage share one such budget, split between them on
validation answers (:func:`choose_operating_points`).

Positions are labelled two ways, side by side: by the request (every position of an
answer to a harmful request is 1) and by content (1 from the first token at which the
answer, as the content judge reads it, serves the harmful request; refusals and
benign answers 0). Features come from the runtime's own feature function over the
window the answer head reads (:class:`AnswerWindow`), so training and the loop
cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from guardrail.head import Head, ModelFingerprint
from guardrail.runtime.encodings import encoded_risk
from guardrail.runtime.features import HeadReader, StateHistory, Window, check_features, parse_block, request_window
from guardrail.runtime.options import GuardOptions
from guardrail.runtime.policy import AnswerRule
from guardrail.runtime.probe import AnswerWindow, WindowParams, runs

from .answers import AnswerStore, Trajectory
from .data.format import Example, variant_family
from .extraction import Features, PlainFeatures
from .judge import DEFAULT_JUDGE

# ---------------------------------------------------------------------------
# What the answer head reads


@dataclass(frozen=True)
class Conversation:
    """A trajectory with where its parts are: the query's content runs and where the answer starts
    (a prefill is part of the answer)."""

    trajectory: Trajectory
    example: Example
    query_runs: tuple[tuple[int, int], ...]
    answer_start: int
    plain: tuple[Features, Features, Features] | None = None  # plain readings (alone, in place, around)

    @classmethod
    def of(cls, trajectory: Trajectory, example: Example) -> Conversation:
        message = trajectory.message.tolist()
        prefill = len(example.messages) - 1 if example.messages[-1].role == "assistant" else -2
        query = [p for p, m in enumerate(message) if m >= 0 and m != prefill]
        answer = [p for p, m in enumerate(message) if m == prefill]
        start = answer[0] if answer else trajectory.n_prompt
        return cls(trajectory, example, tuple(runs(query)), start)

    @property
    def n_positions(self) -> int:
        return len(self.trajectory.ids)

    def history(self, hooks: Sequence[str]) -> StateHistory:
        states = self.trajectory.states
        history = StateHistory(hooks, states[hooks[0]].shape[1], capacity=self.n_positions)
        history.append({h: states[h].astype(np.float32) for h in hooks})
        return history

    def window(self, spec: AnswerWindow, step: int) -> Window:
        """The window of the check after ``step`` written answer tokens (step >= 1)."""
        end = self.trajectory.n_prompt + step
        return Window(tuple(spec.runs(self.query_runs, self.answer_start, end)), end - 1)


def hooks_of_blocks(blocks: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({parse_block(b)[0] for b in blocks}, key=lambda h: int(h.split("-")[1])))


def step_features(conversations: Sequence[Conversation], blocks: Sequence[str], spec: AnswerWindow,
                  steps_of: Callable[[Conversation], Sequence[int]]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                             np.ndarray]:
    """Feature blocks at chosen answer steps of each conversation: (blocks, conversation index, step)."""
    hooks = hooks_of_blocks(blocks)
    rows: dict[str, list[np.ndarray]] = {b: [] for b in blocks}
    which, steps = [], []
    for i, conv in enumerate(conversations):
        history = conv.history(hooks)
        for step in steps_of(conv):
            for name, vector in check_features(blocks, history, conv.window(spec, step)).items():
                rows[name].append(vector)
            which.append(i)
            steps.append(step)
    return ({b: np.asarray(v, np.float32).reshape(len(which), -1) for b, v in rows.items()},
            np.asarray(which, np.int64), np.asarray(steps, np.int64))


def every_step(conv: Conversation) -> range:
    return range(1, conv.trajectory.n_answer + 1)


def sampled_steps(every: int) -> Callable[[Conversation], list[int]]:
    """Steps 1, 2, 4, 8 (where answers commit) and then every ``every``-th, and the last."""
    def steps(conv: Conversation) -> list[int]:
        n = conv.trajectory.n_answer
        out = sorted({s for s in (1, 2, 4, 8) if s <= n} | set(range(every, n + 1, every)) | ({n} if n else set()))
        return out
    return steps


def _reader(head: Head, conv: Conversation) -> HeadReader:
    """The loop's own reader of ``head`` over every stored position of one conversation."""
    hooks = hooks_of_blocks([b.name for b in head.blocks])
    states = conv.trajectory.states
    history = StateHistory(hooks, states[hooks[0]].shape[1], vectors=not HeadReader.is_linear(head),
                           capacity=conv.n_positions)
    reader = HeadReader(head, history)
    history.append({h: states[h].astype(np.float32) for h in hooks})
    return reader


def answer_risks(head: Head, conv: Conversation, spec: AnswerWindow) -> np.ndarray:
    """The answer head's probability at every step of one answer, through the loop's own reader."""
    reader = _reader(head, conv)
    return np.array([reader.risk(conv.window(spec, s)) for s in every_step(conv)], np.float64)


def prefill_risks(head: Head, conv: Conversation, spec: AnswerWindow) -> np.ndarray:
    """The answer head's probability at each token of a caller's prefill, as the prefill check reads
    them (``guard._Run.prefill_check``); empty without a prefill."""
    positions = list(range(conv.answer_start, conv.trajectory.n_prompt))
    if not positions:
        return np.zeros(0, np.float64)
    reader = _reader(head, conv)
    return np.array([reader.risk(Window(tuple(w), p)) for w, p in spec.over_prefill(conv.query_runs, positions)],
                    np.float64)


# ---------------------------------------------------------------------------
# Labels: by the request, and where the answer starts to serve it


def served_from(conv: Conversation, request: str, detokenize: Callable[[Sequence[int]], str],
                judge: Callable[[str, str], bool], every: int = 8) -> int | None:
    """The first answer step at which the content judge reads the answer so far (prefill included) as
    serving the request, on an ``every``-token grid (so at most ``every - 1`` tokens late); None if the
    whole answer never does. A prefill that already serves it gives 1."""
    t = conv.trajectory
    prefill = detokenize(t.ids[conv.answer_start:t.n_prompt].tolist())
    answer = t.ids[t.n_prompt:].tolist()
    if not answer or not judge(request, prefill + detokenize(answer)):
        return None
    if prefill and judge(request, prefill):
        return 1
    for step in [*range(every, len(answer), every), len(answer)]:
        if judge(request, prefill + detokenize(answer[:step])):
            return step
    return len(answer)


def step_of_word(conv: Conversation, detokenize: Callable[[Sequence[int]], str], word: int) -> int:
    """The answer step at which the answer's ``word``-th word (1-based, whitespace-separated, of the
    model's own text after any prefill) has been written; 0 words (the prefill itself serves) is step 1.
    How a reader's "served from word N" becomes the step the guard would have had to stop before."""
    answer = conv.trajectory.ids[conv.trajectory.n_prompt:].tolist()
    if word <= 0 or not answer:
        return 1
    lo, hi = 1, len(answer)
    while lo < hi:  # the first step whose text holds that many words
        mid = (lo + hi) // 2
        if len(detokenize(answer[:mid]).split()) >= word:
            hi = mid
        else:
            lo = mid + 1
    return lo


def hand_served(convs: Sequence[Conversation], labels: Mapping[str, Mapping[str, Any]],
                detokenize: Callable[[Sequence[int]], str]) -> list[int | None | bool]:
    """Where each harmful answer starts to serve its request by a hand label (``complied`` and
    ``served_from_words``); False where the answer has no hand label, or where the label was read on
    another text (its ``answer``): a greedy answer regenerated in another batch can part from the one
    read, at a near-tie, and a reading says nothing about text nobody read."""
    out: list[int | None | bool] = []
    for conv in convs:
        label = labels.get(conv.example.id)
        read_on = None if label is None else label.get("answer")
        if read_on is not None and str(read_on).strip() != conv.trajectory.text.strip():
            label = None
        if label is None or conv.example.label != 1:
            out.append(False)
        elif not label.get("complied", label.get("label")):
            out.append(None)
        else:
            out.append(step_of_word(conv, detokenize, int(label.get("served_from_words") or 0)))
    return out


# ---------------------------------------------------------------------------
# The per-answer threshold

# Training-conditional: the promise holds for three draws of validation answers in four, not only
# on average over draws (README, "The answer stage": with 500 benign validation answers, the rule on
# average put the query threshold where it cut 3.5% of held-out benign answers for a 2% promise).
HELD = 0.75


def allowed_cuts(n: int, alpha: float, held: float | None = None) -> int:
    """How many of ``n`` benign validation answers may be cut (negative: none).

    ``held=None``: the finite-sample rule on average over draws, ``(cut + 1) / (n + 1) <= alpha``.
    ``held``: the largest ``k`` with ``P(Binomial(n, alpha) <= k) <= 1 - held``, so that a threshold
    cutting ``k`` of them cuts at most ``alpha`` of all benign answers in ``held`` of draws."""
    if held is None:
        return int(math.floor(alpha * (n + 1) - 1 + 1e-9))
    if alpha <= 0.0:
        return -1
    if alpha >= 1.0:
        return n
    cdf, log_a, log_b = 0.0, math.log(alpha), math.log1p(-alpha)
    for k in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_a + (n - k) * log_b)
        if cdf > 1.0 - held + 1e-12:
            return k - 1
    return n


def threshold_for_cuts(values: Sequence[float], cuts: int) -> float:
    """The smallest threshold at which at most ``cuts`` of ``values`` reach it (a value at or above
    the threshold is cut); 1.0 (nothing below certainty cut) where ``cuts`` is negative."""
    ordered = np.sort(np.asarray(values, np.float64))[::-1]
    if cuts < 0:
        return 1.0
    if cuts >= ordered.size:
        return 0.0
    return float(np.nextafter(np.float32(ordered[cuts]), np.float32(np.inf)))


@dataclass(frozen=True)
class OperatingPoints:
    """The two decisions' thresholds, chosen together on validation answers, and what they did there."""

    query: float
    answer: float
    query_cuts: int          # benign validation answers the query check cuts
    answer_cuts: int         # of those it lets through, how many the answer stage may cut (negative: it never cuts)
    budget: int              # both together, by the promise
    prevented: int           # harmful validation answers stopped before they serve (content judge)
    stopped: int             # harmful validation answers stopped at all
    # Every split replayed, (query_cuts, answer_cuts, prevented, stopped), the chosen one among them: the
    # head file keeps them so a reader sees what the chosen split won against, not only that it won.
    splits: tuple[tuple[int, int, int, int], ...] = ()


def choose_operating_points(rows: Sequence[Replay], row_threshold: float, alpha: float, answer_alpha: float, *,
                            held: float | None = HELD, min_cuts: int = 3) -> OperatingPoints:
    """Split one per-answer budget between the query check and the answer stage.

    Both together may cut :func:`allowed_cuts` of the benign validation answers (``alpha``), the
    answer stage alone at most ``answer_alpha`` of those the query check lets through, and the
    query check is never looser than its row-level threshold. Every split of the budget is
    replayed; the one that leaves the fewest harmful validation answers serving their request
    wins (then the most stopped, then the most left to the query check, which stops before a
    word is written). Below ``min_cuts`` the highest risks of a small set are noise: the row-level
    threshold decides alone and the budget is what it leaves."""
    benign = [r for r in rows if not r.harmful]
    harmful = [r for r in rows if r.harmful]
    risks = [r.query_risk for r in benign]
    total = allowed_cuts(len(risks), alpha, held)
    splits = range(total, -1, -1) if total >= min_cuts else [None]
    best: OperatingPoints | None = None
    tried: list[tuple[int, int, int, int]] = []
    for q in splits:
        query = row_threshold if q is None else max(row_threshold, threshold_for_cuts(risks, q))
        cut_q = sum(1 for v in risks if v >= query)
        peaks = [float(r.statistic.max()) if r.statistic.size else 0.0 for r in benign if r.query_risk < query]
        own = allowed_cuts(len(peaks), answer_alpha, held)
        cuts = min(own, total - cut_q)
        answer = threshold_for_cuts(peaks, cuts)
        at = [r.cut_at(query, answer) for r in harmful]
        prevented = sum(1 for r, a in zip(harmful, at)
                        if a is not None and r.served_from is not None and a < r.served_from)
        point = OperatingPoints(query, answer, cut_q, cuts, total, prevented,
                                sum(a is not None for a in at))
        tried.append((point.query_cuts, point.answer_cuts, point.prevented, point.stopped))
        if best is None or (point.prevented, point.stopped) > (best.prevented, best.stopped):
            best = point
    assert best is not None
    return replace(best, splits=tuple(tried))


# ---------------------------------------------------------------------------
# Replaying answers through the guard's two decisions

# The legacy answer stage (a head without an answer-stage head): its check head over the query
# and the latest r2 answer tokens, tau checks in a row.
LEGACY_WINDOW = AnswerWindow(recent=WindowParams().r2, query=True)


@dataclass
class Replay:
    """One answer under the guard: its query risk, its answer stage's statistic after each token,
    and where (by the content judge) it starts to serve a harmful request."""

    example: Example
    query_risk: float
    statistic: np.ndarray
    served_from: int | None
    n_answer: int
    prefill_peak: float = 0.0  # the prefill check's statistic (0 without a prefill)

    @property
    def harmful(self) -> bool:
        return self.example.label == 1

    def cut_at(self, query_threshold: float, answer_threshold: float, prefill_threshold: float = 1.0) -> int | None:
        """0: the query check, or the prefill check (before a word is written); k >= 1: the answer
        stage after k tokens; None: never."""
        if not self.query_risk < query_threshold or not self.prefill_peak < prefill_threshold:
            return 0
        hit = np.flatnonzero(self.statistic >= answer_threshold)
        return int(hit[0]) + 1 if hit.size else None


def answer_stage_of(head: Head) -> tuple[Head, AnswerWindow, AnswerRule, float]:
    """(head, window, rule, threshold) the guard's answer checks use with this head file."""
    resolved = GuardOptions().resolve(head)
    if head.answer_head is None:
        return head, LEGACY_WINDOW, resolved.answer_rule, resolved.answer_threshold
    stage = head.answer_head.extra.get("answer_stage") or {}
    window = AnswerWindow(int(stage.get("recent", 32)), bool(stage.get("query", False)))
    return head.answer_head, window, resolved.answer_rule, resolved.answer_threshold


def query_risk(head: Head, conv: Conversation) -> float:
    """The query check, as the loop makes it: the check head over the request alone, read at the
    assistant's header (a prefill is the answer's first tokens, which the answer stage reads), and
    over its plain readings when it reads as encoded or split."""
    hooks = hooks_of_blocks([b.name for b in head.blocks])
    history = StateHistory(hooks, conv.trajectory.states[hooks[0]].shape[1], vectors=not HeadReader.is_linear(head),
                           capacity=conv.n_positions)
    reader = HeadReader(head, history)  # before the states: a linear head tracks its projections as they arrive
    end = conv.answer_start  # the prompt's end, or the first prefill token: the states before it are the request's
    history.append({h: conv.trajectory.states[h][:end].astype(np.float32) for h in hooks})
    risk = reader.risk(request_window(conv.query_runs, end))
    if conv.plain is None:
        return risk
    alone, in_place, around = (float(head.score(f.blocks, f.texts)[0]) for f in conv.plain)
    return float(encoded_risk(risk, alone, in_place, around))  # encoded or split, read as the loop reads it


def prefill_threshold_of(head: Head) -> float:
    """The prefill check's operating point in this head file; 1.0 (it never acts) where it has none."""
    return GuardOptions().resolve(head).prefill_threshold


def prefill_peak(answer_head: Head, conv: Conversation, window: AnswerWindow, rule: AnswerRule, query: float) -> float:
    """The prefill check's statistic: the rule's highest value over the prefill's tokens, from the query risk."""
    return max(rule.statistic(prefill_risks(answer_head, conv, window), query), default=0.0)


def replay(head: Head, convs: Sequence[Conversation], served: Sequence[int | None]) -> list[Replay]:
    answer_head, window, rule, _ = answer_stage_of(head)
    out = []
    for conv, start in zip(convs, served):
        q = query_risk(head, conv)
        statistic = np.array(rule.statistic(answer_risks(answer_head, conv, window), q), np.float64)
        peak = prefill_peak(answer_head, conv, window, rule, q) if head.answer_head is not None else 0.0
        out.append(Replay(conv.example, q, statistic, start, conv.trajectory.n_answer, peak))
    return out


def rates(rows: Sequence[Replay], query_threshold: float, answer_threshold: float,
          prefill_threshold: float = 1.0) -> dict[str, Any]:
    """Per-answer rates at one operating point (the prefill check's too: 1.0 never acts)."""
    benign = [r for r in rows if not r.harmful]
    harmful = [r for r in rows if r.harmful]
    passed = [r for r in harmful if r.query_risk < query_threshold]
    served_passed = [r for r in passed if r.served_from is not None]
    cut = {id(r): r.cut_at(query_threshold, answer_threshold, prefill_threshold) for r in rows}
    by_prefill = {id(r) for r in rows if r.query_risk < query_threshold and not r.prefill_peak < prefill_threshold}

    def share(part: Sequence[Replay], test: Any) -> float | None:
        return sum(1 for r in part if test(r)) / len(part) if part else None

    def before(r: Replay) -> bool:
        at = cut[id(r)]
        return at is not None and (r.served_from is None or at < r.served_from)

    return {
        "benign": len(benign),
        "benign_cut": share(benign, lambda r: cut[id(r)] is not None),
        "benign_cut_by_query": share(benign, lambda r: not r.query_risk < query_threshold),
        "benign_cut_by_prefill": share(benign, lambda r: id(r) in by_prefill),
        "benign_cut_mid_answer": share(benign, lambda r: (cut[id(r)] or 0) > 0),
        "harmful": len(harmful),
        "harmful_stopped": share(harmful, lambda r: cut[id(r)] is not None),
        "harmful_stopped_by_query": share(harmful, lambda r: not r.query_risk < query_threshold),
        "harmful_stopped_by_prefill": share(harmful, lambda r: id(r) in by_prefill),
        "harmful_served_unguarded": share(harmful, lambda r: r.served_from is not None),
        "harmful_served_guarded": share(harmful, lambda r: r.served_from is not None and not before(r)),
        "passed_query": len(passed),
        "passed_stopped_mid_answer": share(passed, lambda r: (cut[id(r)] or 0) > 0),
        "passed_stopped_by_prefill": share(passed, lambda r: id(r) in by_prefill),
        "passed_served": len(served_passed),
        "passed_served_stopped_before": share(served_passed, before),
    }


def curve(rows: Sequence[Replay], query_threshold: float, points: int = 60,
          prefill_threshold: float = 1.0) -> list[dict[str, float | None]]:
    """The answer stage's trade-off: one point per answer threshold, the query and prefill checks fixed."""
    passed_benign = [r for r in rows if not r.harmful and r.query_risk < query_threshold]
    peaks = sorted({float(r.statistic.max()) for r in passed_benign if r.statistic.size} | {1.0})
    chosen = np.unique(np.quantile(peaks, np.linspace(0, 1, points))) if peaks else np.array([1.0])
    out = []
    for t in chosen:
        threshold = float(np.nextafter(np.float32(t), np.float32(2.0)))
        r = rates(rows, query_threshold, threshold, prefill_threshold)
        out.append({"threshold": threshold, "benign_cut_mid_answer": r["benign_cut_mid_answer"],
                    "passed_stopped_mid_answer": r["passed_stopped_mid_answer"],
                    "passed_served_stopped_before": r["passed_served_stopped_before"]})
    return out


def in_time(rows: Sequence[Replay], query_threshold: float, prefill_threshold: float = 1.0,
            answer_threshold: float = 1.0) -> list[dict[str, Any]]:
    """Each harmful answer the query check lets through and that serves its request: from which step
    it serves, the answer-stage threshold that would have stopped it before then (the highest statistic
    it reached before serving; None where it serves from its first token, so only the query check could
    have stopped it), and the share of the benign answers the query check lets through that threshold
    would cut; whether the prefill check stops it, before any of it is written; and after how many
    tokens the guard at ``answer_threshold`` does stop it (``stopped_at``, None: never), which says how
    late it acts, and so what showing the answer a few tokens late (a hold-back) could buy. Why the
    answer stage stops what it stops in time, and what stopping more would cost."""
    peaks = np.array([float(r.statistic.max()) if r.statistic.size else -np.inf
                      for r in rows if not r.harmful and r.query_risk < query_threshold])
    out = []
    for r in rows:
        if not (r.harmful and r.query_risk < query_threshold and r.served_from is not None):
            continue
        before = r.statistic[:max(r.served_from - 1, 0)]
        reach = float(before.max()) if before.size else None
        stopped = r.cut_at(query_threshold, answer_threshold, prefill_threshold)  # 0: the prefill check (query passed)
        out.append({"id": r.example.id, "form": variant_family(r.example.variant), "source": r.example.source,
                    "query_risk": r.query_risk, "serves_from": r.served_from, "answer_tokens": r.n_answer,
                    "prefill_peak": r.prefill_peak, "stopped_by_prefill": stopped == 0, "stopped_at": stopped,
                    "threshold_in_time": reach,
                    "benign_cut_in_time": None if reach is None or not peaks.size else float(np.mean(peaks >= reach))})
    return out


def by_group(rows: Sequence[Replay], key: Callable[[Example], str], query_threshold: float,
             answer_threshold: float, prefill_threshold: float = 1.0) -> dict[str, Any]:
    """:func:`rates` per group and label, named ``<group>:benign`` / ``<group>:harmful``."""
    groups: dict[str, list[Replay]] = {}
    for r in rows:
        groups.setdefault(f"{key(r.example)}:{'harmful' if r.harmful else 'benign'}", []).append(r)
    return {k: rates(v, query_threshold, answer_threshold, prefill_threshold) for k, v in sorted(groups.items())}


def by_source(rows: Sequence[Replay], query_threshold: float, answer_threshold: float,
              prefill_threshold: float = 1.0) -> dict[str, Any]:
    return by_group(rows, lambda e: e.source, query_threshold, answer_threshold, prefill_threshold)


def by_form(rows: Sequence[Replay], query_threshold: float, answer_threshold: float,
            prefill_threshold: float = 1.0) -> dict[str, Any]:
    """Per form of request (plain, jailbreak template, prefill...): where the benign cuts come from is
    rarely spread evenly, and a per-answer rate hides which forms a head reads as harm. Grouped as
    ``guardrail eval --data`` groups rows (:func:`variant_family`), so the two tables line up."""
    return by_group(rows, lambda e: variant_family(e.variant), query_threshold, answer_threshold, prefill_threshold)


def with_plain(convs: Sequence[Conversation], plain: PlainFeatures | None) -> list[Conversation]:
    """The conversations whose request reads as encoded or split with the features of its plain readings
    (``plain``, of these conversations' examples), so the replayed query check reads what the loop's does."""
    if plain is None:
        return list(convs)
    return [replace(c, plain=plain.row(i)) if plain.of[i] >= 0 else c for i, c in enumerate(convs)]


def load_conversations(store: AnswerStore, items: Sequence[tuple[Example, Any]], by_id: dict[str, Example],
                       detokenize: Any) -> tuple[list[Conversation], list[int | None]]:
    """The stored answers of ``items`` with where each harmful one starts to serve its request."""
    convs, served = [], []
    for (example, _), key in zip(items, store.keys(items)):
        conv = Conversation.of(store.load(key), example)
        convs.append(conv)
        if example.label == 1:
            root = by_id.get(example.origin) or example
            request = "\n".join(m.content for m in root.messages if m.role == "user")
            served.append(served_from(conv, request, detokenize, lambda q, a: DEFAULT_JUDGE.judge(q, a).complied))
        else:
            served.append(None)
    return convs, served



# ---------------------------------------------------------------------------
# Fitting the answer head

LABELS = ("request", "content")


@dataclass(frozen=True)
class AnswerRecipe:
    """What the answer head reads, what it learns, and how its checks add up."""

    blocks: tuple[str, ...]
    window: AnswerWindow = AnswerWindow()
    labels: str = "content"      # request: every step of a harmful request's answer is 1; content: from
                                 # where the answer serves it (refusals and steps before it are left out)
    every: int = 8               # steps sampled per answer for fitting (plus 1, 2, 4, 8 and the last)
    l2: float = 1e-2

    def describe(self) -> str:
        w = f"A{self.window.recent}" + ("+Q" if self.window.query else "")
        return f"{'+'.join(self.blocks)} over {w}, {self.labels} labels"


def step_labels(convs: Sequence[Conversation], served: Sequence[int | None], which: np.ndarray, steps: np.ndarray,
                labels: str) -> tuple[np.ndarray, np.ndarray]:
    """(label, keep) for each sampled step: see :class:`AnswerRecipe`."""
    y = np.zeros(len(which), np.int64)
    keep = np.ones(len(which), bool)
    for row, (i, step) in enumerate(zip(which, steps)):
        harmful = convs[i].example.label == 1
        if labels == "request":
            y[row] = int(harmful)
        elif harmful:
            start = served[i]
            if start is None or step < start:
                keep[row] = False if start is not None else True  # a refusal is a negative; before serving: unknown
                y[row] = 0
            else:
                y[row] = 1
    return y, keep


def answer_weights(convs: Sequence[Conversation], which: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row weights (mean 1): each answer counts the same whatever its length, each (source, label)
    group the same within its label, and each label the same."""
    from .trainer import balanced_weights

    per_answer = np.bincount(which, minlength=len(convs)).astype(np.float64)
    return balanced_weights(y, [convs[i].example.source for i in which], base=1.0 / per_answer[which])


def fit_answer_head(train: Sequence[Conversation], train_served: Sequence[int | None], val: Sequence[Conversation],
                    val_served: Sequence[int | None], recipe: AnswerRecipe, fingerprint: ModelFingerprint,
                    seed: int = 0) -> Head:
    """A calibrated logistic head on sampled steps of the model's own answers (threshold: set later,
    per answer, by :func:`choose_operating_points`)."""
    from guardrail.head import FeatureBlock
    from guardrail.head.model import Standardizer, sigmoid

    from .metrics import threshold_at_fpr
    from .trainer import fit_temperature, train_logreg

    steps = sampled_steps(recipe.every)
    parts = []
    for convs, served in ((train, train_served), (val, val_served)):
        blocks, which, at = step_features(convs, recipe.blocks, recipe.window, steps)
        y, keep = step_labels(convs, served, which, at, recipe.labels)
        w = answer_weights(convs, which[keep], y[keep])
        parts.append(({k: v[keep] for k, v in blocks.items()}, y[keep], w))
    (bt, yt, wt), (bv, yv, wv) = parts
    scalers = [Standardizer.fit(bt[b]) for b in recipe.blocks]
    X = np.concatenate([s.transform(bt[b]) for s, b in zip(scalers, recipe.blocks)], axis=1)
    Xv = np.concatenate([s.transform(bv[b]) for s, b in zip(scalers, recipe.blocks)], axis=1)
    model = train_logreg(X, yt, sample_weight=wt, l2=recipe.l2, X_val=Xv, y_val=yv, w_val=wv, seed=seed)
    temperature = fit_temperature(model.logits(Xv), yv, sample_weight=wv)
    p_val = sigmoid(model.logits(Xv) / temperature)
    return Head(fingerprint=fingerprint, blocks=tuple(FeatureBlock(b, bt[b].shape[1]) for b in recipe.blocks),
                scalers=tuple(scalers), model=model, temperature=float(temperature),
                threshold=float(threshold_at_fpr(p_val[yv == 0], 0.03)), target_fpr=0.03,
                pooling=tuple(sorted({b.split("/")[1] for b in recipe.blocks})))
