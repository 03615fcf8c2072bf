"""`guardrail demo`: what the README's first command shows a newcomer."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.panel import Panel

from .capture import layer_name
from .engine import ChatFormat, Context, Model, Sampler, generate
from .models import resolve_model
from .ui import TokenStrip

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def capture_tour(model_spec: str | None, *, prompt: str | None = None, layer: int | None = None,
                 max_tokens: int = 48, console: Console | None = None) -> None:
    """Generate a short answer and colour each token by its captured residual-stream norm."""
    console = console or Console()
    with Model(resolve_model(model_spec)) as model:
        layer = layer if layer is not None else (2 * model.info.n_layer) // 3
        hook = layer_name(layer)
        prompt = prompt or DEFAULT_PROMPT
        tokens = ChatFormat(model).tokens([{"role": "user", "content": prompt}]).ids
        console.print(f"[bold]{model.info.name}[/] ({model.info.architecture}, {model.info.n_layer} layers, "
                      f"width {model.info.n_embd}); capturing [cyan]{hook}[/] for every token")
        console.print(f"[bold]user:[/] {prompt}")
        pieces: list[str] = []
        norms: list[float] = []
        start = time.perf_counter()
        with Context(model, n_ctx=1024, hooks=(hook,)) as context:
            for step in generate(context, tokens, Sampler(model), max_tokens=max_tokens):
                if step.states is not None:
                    pieces.append(step.text)
                    norms.append(float(np.linalg.norm(step.states[hook])))
        elapsed = time.perf_counter() - start
        if not norms:
            console.print("(the model answered nothing)")
            return
        lo, hi = min(norms), max(norms)
        scaled = [(n - lo) / (hi - lo) if hi > lo else 0.5 for n in norms]
        console.print(Panel(TokenStrip(pieces, scaled), title="assistant",
                            subtitle=f"colour: ||{hook}|| from {lo:.1f} (green) to {hi:.1f} (red)"))
        console.print(f"{len(norms)} tokens in {elapsed:.2f} s ({len(norms) / elapsed:.1f} tok/s incl. prompt), "
                      f"{len(tokens)} prompt tokens; mean ||{hook}|| = {np.mean(norms):.2f}")
