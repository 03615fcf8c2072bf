"""Benchmarks that run both sides in one process and report ratios, never absolute claims.

The capture benchmark decodes the same prompt and the same token sequence on
plain llama-cpp-python (the low-level loop with no eval callback, and the
high-level ``Llama`` for reference) and on the engine with the capture on 1 and
3 layers, runs interleaved so drift in machine load hits every variant alike.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from guardrail.runtime.capture import layer_name
from guardrail.runtime.engine import Context, Entry, Model, Sampler, prefill

_TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
         "changed how knowledge travelled across Europe. Scholars, merchants and clergy ")


def _prompt_tokens(model: Model, n: int) -> list[int]:
    tokens = model.tokenize(_TEXT * (n // 20 + 2))
    return [model.bos, *tokens][:n] if model.info.add_bos else tokens[:n]


def _engine_runner(model: Model, hooks: Sequence[str], n_ctx: int, threads: int,
                   prompt: list[int], continuation: list[int]) -> Callable[[], tuple[float, float]]:
    context = Context(model, n_ctx=n_ctx, n_batch=512, hooks=hooks, n_threads=threads)
    sampler = Sampler(model)

    def run() -> tuple[float, float]:
        context.clear()
        t0 = time.perf_counter()
        result = prefill(context, prompt)
        t1 = time.perf_counter()
        pos = len(prompt)
        for token in continuation:
            sampler.sample(context, int(result.outputs[-1]))
            result = context.decode([Entry(token, pos, (0,), True)])
            pos += 1
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run.context = context  # type: ignore[attr-defined]  (kept alive with the runner)
    return run


def _llama_runner(path: Path, n_ctx: int, threads: int, prompt: list[int],
                  continuation: list[int]) -> Callable[[], tuple[float, float]]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for token in continuation:
            llm.sample(temp=0.0)
            llm.eval([token])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run.llm = llm  # type: ignore[attr-defined]
    return run


def capture_benchmark(path: Path, *, n_decode: int = 96, n_prompt: int = 384, runs: int = 5,
                      threads: int | None = None) -> dict[str, Any]:
    """Prompt and decode tokens/s for each variant, and each one's ratio to the plain loop."""
    threads = threads or os.cpu_count() or 1
    model = Model(path)
    n_layer = model.info.n_layer
    prompt = _prompt_tokens(model, n_prompt)
    continuation = model.tokenize(_TEXT * (n_decode // 20 + 2))[:n_decode]
    n_ctx = len(prompt) + len(continuation) + 16
    mid = (2 * n_layer) // 3
    variants: dict[str, Callable[[], tuple[float, float]]] = {
        "plain llama-cpp-python (low-level loop)": _engine_runner(model, (), n_ctx, threads, prompt, continuation),
        "capture 1 layer": _engine_runner(model, (layer_name(mid),), n_ctx, threads, prompt, continuation),
        "capture 3 layers": _engine_runner(
            model, tuple(layer_name(i) for i in (n_layer // 3, mid, n_layer - 2)), n_ctx, threads, prompt,
            continuation),
        "llama_cpp.Llama (high-level)": _llama_runner(path, n_ctx, threads, prompt, continuation),
    }
    for run in variants.values():  # warm-up: page the weights in, build the graphs once
        run()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            times[name].append(run())
    baseline = next(iter(variants))
    medians = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
               for name, ts in times.items()}
    base_prompt, base_decode = medians[baseline]
    rows = []
    for name, (t_prompt, t_decode) in medians.items():
        rows.append({
            "name": name,
            "prompt_tps": len(prompt) / t_prompt,
            "decode_tps": len(continuation) / t_decode,
            "prompt_ratio": base_prompt / t_prompt,
            "decode_ratio": base_decode / t_decode,
        })
    return {"model": model.info.name, "baseline": baseline, "runs": runs, "threads": threads,
            "n_prompt": len(prompt), "n_decode": len(continuation), "variants": rows}


def guard_overhead(guard: Any, prompts: Sequence[str], *, max_tokens: int = 64, runs: int = 3,
                   schedules: Sequence[str] = ("annealing",)) -> dict[str, Any]:
    """Tokens/s of guarded answers (policy monitor, so the tokens are the same) vs plain greedy
    generation on the same model, context size and prompts; runs interleaved in one process."""
    from guardrail.runtime.chat import ChatFormat
    from guardrail.runtime.engine import generate

    model = guard.model
    plain_ctx = Context(model, n_ctx=guard.n_ctx, n_batch=512)
    fmt = ChatFormat(model)
    conversations = [[{"role": "user", "content": p}] for p in prompts]

    def plain() -> tuple[int, float]:
        n, start = 0, time.perf_counter()
        for messages in conversations:
            plain_ctx.clear()
            n += sum(1 for s in generate(plain_ctx, fmt.tokens(messages).ids, Sampler(model), max_tokens=max_tokens)
                     if not s.eog)
        return n, time.perf_counter() - start

    def guarded(schedule: str) -> tuple[int, float]:
        n, start = 0, time.perf_counter()
        for messages in conversations:
            for event in guard.chat(messages, max_tokens=max_tokens, policy="monitor", schedule=schedule):
                if event.type == "done":
                    n += event.completion_tokens
        return n, time.perf_counter() - start

    plain()
    results: dict[str, list[tuple[int, float]]] = {"plain": []} | {s: [] for s in schedules}
    for _ in range(runs):
        results["plain"].append(plain())
        for schedule in schedules:
            results[schedule].append(guarded(schedule))
    plain_ctx.close()

    def tps(rows: list[tuple[int, float]]) -> float:
        return statistics.median(n / t for n, t in rows)

    base = tps(results["plain"])
    return {"plain_tps": base, "runs": runs, "max_tokens": max_tokens, "prompts": len(prompts),
            "schedules": [{"schedule": s, "guarded_tps": tps(results[s]), "plain_tps": base,
                           "ratio": tps(results[s]) / base} for s in schedules]}
