"""The guard's decisions over whole answers, per answer: what a user meets on 256-token answers.

The model answers held-out requests of both labels (its own answers, generated once and
stored, see :mod:`guardrail.training.answers`); each answer is replayed through the guard's
two decisions exactly as the loop makes them: the query check (the check head over the
first window) and the answer stage (its head over its window at every answer token, its
rule, its threshold). A greedy or seeded answer is the same tokens with and without the
guard up to the first alarm, so the replay is what the guard would do, and one run gives
both sides: the unguarded answer (as stored) and where the guard would have cut it.

Counted per answer: a benign answer cut anywhere is one failure; a harmful answer is
stopped at the query, stopped during the answer, or not at all, and, by a hand reading
(or the content judge where no reader labelled it), stopped before or after the answer
starts to serve the request. The curve sweeps the
answer stage's threshold with the query check fixed, so it shows the answer stage's own
trade-off over the answers the query check let through.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardrail.training.answer_stage import (answer_stage_of, by_form, by_source, curve, in_time, prefill_threshold_of,
                                             rates, replay)

_FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# The held-out answers read by hand, per known model: each model answers the same requests in its own words.
HAND_LABELS = {"smollm2-135m-instruct": _FIXTURES / "answer_labels_test.jsonl",
               "gemma3-270m": _FIXTURES / "answer_labels_test_gemma3-270m.jsonl"}


def hand_label_file(sha: str) -> Path | None:
    """The project's hand readings of this model's held-out answers, where someone read them."""
    from guardrail.artifacts.models import KNOWN_MODELS

    for name, path in HAND_LABELS.items():
        if KNOWN_MODELS[name].sha256 == sha and path.is_file():
            return path
    return None


def read_labels(path: Path) -> dict[str, dict[str, Any]]:
    """Hand labels by conversation id: ``complied`` (or ``label``) and ``served_from_words``."""
    import json

    from guardrail.errors import DataError

    out = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: not a hand label ({exc})") from None
    return out


def answer_report(model_spec: str | None, head_path: str | None, *, data_dir: Path | None = None,
                  n_harmful: int | None = None, n_benign: int | None = None, max_tokens: int = 256,
                  labels: Path | None = None, draws: Sequence[int] = (1,), progress: bool = True) -> dict[str, Any]:
    """Held-out requests answered by the model (stored answers reused), replayed through the guard.

    Where a harmful answer has a hand label (``labels``, by default the project's hand-read test
    answers of this model when they exist), that reading says whether and from where it serves the request; the
    rule judge reads the rest (it over-counts service on long answers: README, "The content judge").
    A draw > 1 answers fresh held-out requests (:func:`~guardrail.training.answers.draw_requests`): benign
    cuts and harmful stops need no reader, so a second draw re-measures them at no reading cost. Several
    ``draws`` are pooled (each draw's own rates under ``by_draw``)."""
    from guardrail.training.answer_stage import hand_served
    from guardrail.training.pipeline import ANSWER_PLANS, ensure_training_set, model_and_head, split_answers

    model, sha, head = model_and_head(model_spec, head_path)
    data_dir = data_dir or ensure_training_set("full", progress=progress)
    plan = ANSWER_PLANS["full"].test  # the held-out answers training reported on, by default
    counts = (plan[0] if n_harmful is None else n_harmful, plan[1] if n_benign is None else n_benign)
    label_file = labels or hand_label_file(sha)
    read = read_labels(label_file) if label_file else {}
    draws = sorted(set(draws))
    convs: list[Any] = []
    hand: list[int | None | bool] = []
    served: list[int | None] = []
    of_draw: list[int] = []
    cost = {"answers": 0.0, "tokens": 0.0, "seconds": 0.0}
    for draw in draws:
        got, judged, spent = split_answers(model, sha, data_dir, "test", counts, max_tokens, progress, draw=draw)
        read_by_hand = hand_served(got, read, model.detokenize) if read else [False] * len(got)
        convs += got
        hand += read_by_hand
        served += [j if h is False else h for h, j in zip(read_by_hand, judged)]
        of_draw += [draw] * len(got)
        cost = {k: cost[k] + spent.get(k, 0) for k in cost}
    replays = replay(head, convs, served)
    _, window, rule, answer_threshold = answer_stage_of(head)
    prefill = prefill_threshold_of(head)
    points = (head.threshold, answer_threshold, prefill)
    harmful = [c.example.label == 1 for c in convs]
    return {"data": str(data_dir / "test.jsonl"), "draws": draws, "answers": len(replays), "max_tokens": max_tokens,
            "generated": cost, "query_threshold": head.threshold, "answer_threshold": answer_threshold,
            "prefill_threshold": prefill,
            "rule": rule.describe(), "window": {"recent": window.recent, "query": window.query},
            "answer_head": head.answer_head is not None,
            "served_by": {"hand labels": sum(h is not False for h, m in zip(hand, harmful) if m),
                          "rule judge": sum(h is False for h, m in zip(hand, harmful) if m),
                          "labels": str(label_file) if label_file else None},
            "overall": rates(replays, *points),
            "sources": by_source(replays, *points),
            "forms": by_form(replays, *points),
            "by_draw": {str(d): rates([r for r, k in zip(replays, of_draw) if k == d], *points)
                        for d in draws} if len(draws) > 1 else {},
            "in_time": in_time(replays, head.threshold, prefill, answer_threshold),
            "curve": curve(replays, head.threshold, prefill_threshold=prefill)}
