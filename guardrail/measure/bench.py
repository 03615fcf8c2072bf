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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import llama_cpp

from guardrail.runtime.capture import layer_name
from guardrail.runtime.engine import Context, Entry, Model, Sampler, SamplingParams, default_flash_attn, prefill
from guardrail.runtime.events import DoneEvent, TokenEvent

_TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
         "changed how knowledge travelled across Europe. Scholars, merchants and clergy ")


def _prompt_tokens(model: Model, n: int) -> list[int]:
    tokens = model.tokenize(_TEXT * (n // 20 + 2))
    return [model.bos, *tokens][:n] if model.info.add_bos else tokens[:n]


def _engine_runner(model: Model, hooks: Sequence[str], n_ctx: int, threads: int,
                   prompt: list[int], continuation: list[int]) -> Callable[[], tuple[float, float]]:
    context = Context(model, n_ctx=n_ctx, n_batch=512, hooks=hooks, n_threads=threads,
                      flash_attn=default_flash_attn(1))  # as a one-answer guard decodes
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

    run.context = context  # type: ignore[attr-defined]  # kept alive with the runner
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


# What `guardrail bench guard` and the demo both measure, so they print the same figure.
OVERHEAD_PROMPTS = ("What are three good habits for staying healthy?", "Explain how rainbows form.",
                    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.")


def guard_overhead(guard: Any, prompts: Sequence[str] = OVERHEAD_PROMPTS, *, max_tokens: int = 64, runs: int = 3,
                   schedules: Sequence[str] = ("auto",)) -> dict[str, Any]:
    """Tokens/s of guarded answers (policy monitor, so the tokens are the same) vs plain greedy
    generation on the same model, context size and prompts; runs interleaved in one process.
    The guard's cache is emptied before each answer, as the plain side's is: both decode the
    whole prompt every time."""
    from guardrail.runtime.chat import ChatFormat
    from guardrail.runtime.engine import generate

    model = guard.model
    plain_ctx = Context(model, n_ctx=guard.n_ctx, n_batch=512, n_threads=guard.context.n_threads,
                        flash_attn=guard.context.flash_attn)
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
            guard.reset()
            for event in guard.chat(messages, max_tokens=max_tokens, policy="monitor", schedule=schedule):
                if isinstance(event, DoneEvent):
                    n += event.completion_tokens
        return n, time.perf_counter() - start

    plain()
    for schedule in schedules:
        guarded(schedule)
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in ("plain", *schedules)}
    for run in range(runs):
        sides = [("plain", plain)] + [(s, lambda s=s: guarded(s)) for s in schedules]
        for name, side in (sides if run % 2 == 0 else sides[::-1]):
            results[name].append(side())
    plain_ctx.close()

    def tps(rows: list[tuple[int, float]]) -> float:
        return statistics.median(n / t for n, t in rows)

    base = tps(results["plain"])
    return {"plain_tps": base, "runs": runs, "max_tokens": max_tokens, "prompts": len(prompts),
            "schedules": [{"schedule": s, "guarded_tps": tps(results[s]), "plain_tps": base,
                           "ratio": tps(results[s]) / base} for s in schedules]}


# ---------------------------------------------------------------------------
# Several answers at once: the guard batched vs plain batched llama.cpp

BATCH_PROMPTS = OVERHEAD_PROMPTS + (
    "How do I keep basil alive indoors?", "Summarise the causes of the French Revolution.",
    "What is a good routine for learning to play the guitar?", "Explain compound interest with an example.",
    "Describe a walk through a pine forest in autumn.")


def _plain_batched(context: Context, prompts: Sequence[Sequence[int]], max_tokens: int) -> tuple[int, float]:
    """Greedy answers to ``prompts``, one sequence each, every running answer's next token in one
    ``llama_decode`` per step (what llama.cpp's own batched decoding does); (tokens, seconds)."""
    model = context.model
    context.clear()
    start = time.perf_counter()
    samplers = [Sampler(model) for _ in prompts]
    nexts = []  # each prompt's first token, sampled before the next decode overwrites its logits
    for i, ids in enumerate(prompts):
        nexts.append(samplers[i].sample(context, int(prefill(context, ids, seq=i).outputs[-1])))
    pos = [len(ids) for ids in prompts]
    running = [i for i in range(len(prompts)) if not model.is_eog(nexts[i])]
    written = 0
    for _ in range(max_tokens):
        if not running:
            break
        result = context.decode([Entry(nexts[i], pos[i], (i,), True) for i in running])
        written += len(running)
        for row, i in enumerate(running):
            pos[i] += 1
            nexts[i] = samplers[i].sample(context, int(result.outputs[row]))
        running = [i for i in running if not model.is_eog(nexts[i])]
    for sampler in samplers:
        sampler.close()
    return written, time.perf_counter() - start


def batch_benchmark(path: Path, head: str | None, *, ns: Sequence[int] = (1, 2, 4, 8), max_tokens: int = 96,
                    runs: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Aggregate tokens/s of N guarded answers decoded together (``Guard.chat_many``, policy monitor so
    the tokens are the same) vs N plain greedy answers batched the same way on plain llama.cpp, same
    prompts, same context size and threads; runs interleaved in one process, for each N."""
    from guardrail.runtime.chat import ChatFormat
    from guardrail.runtime.guard import Guard

    rows: list[dict[str, Any]] = []
    for n in ns:
        conversations = [[{"role": "user", "content": p}] for p in BATCH_PROMPTS[:n]]
        with Guard(path, head, n_parallel=n, n_threads=threads) as guard:
            plain_ctx = Context(guard.model, n_ctx=guard.n_ctx, n_batch=512, n_seq_max=max(2, n),
                                n_threads=guard.context.n_threads, flash_attn=guard.context.flash_attn)
            prompts = [ChatFormat(guard.model).tokens(m).ids for m in conversations]

            def guarded() -> tuple[int, float]:
                guard.reset()
                start = time.perf_counter()
                tokens = sum(e.completion_tokens for _, e in guard.chat_many(conversations, max_tokens=max_tokens,
                                                                              policy="monitor")
                             if isinstance(e, DoneEvent))
                return tokens, time.perf_counter() - start

            def plain() -> tuple[int, float]:
                return _plain_batched(plain_ctx, prompts, max_tokens)

            plain(), guarded()  # warm both
            results: dict[str, list[tuple[int, float]]] = {"plain": [], "guarded": []}
            for run in range(runs):
                for name, side in ((("plain", plain), ("guarded", guarded)) if run % 2 == 0
                                   else (("guarded", guarded), ("plain", plain))):
                    results[name].append(side())
            plain_ctx.close()
        tps = {k: statistics.median(t / s for t, s in v) for k, v in results.items()}
        rows.append({"n": n, "plain_tps": tps["plain"], "guarded_tps": tps["guarded"],
                     "ratio": tps["guarded"] / tps["plain"],
                     "tokens": {k: [t for t, _ in v] for k, v in results.items()}})
    base = float(rows[0]["plain_tps"]) if rows else 1.0
    for row in rows:
        row["plain_speedup"] = float(row["plain_tps"]) / base
    return {"kind": "batch", "max_tokens": max_tokens, "runs": runs, "rows": rows}


# ---------------------------------------------------------------------------
# A chat: does the guard keep its cache between turns like llama_cpp.Llama does?

CHAT_TURNS = (
    "Hi! I'm planning a vegetable garden. Where should I start?",
    "Which vegetables are easiest for a beginner?",
    "How often should I water tomatoes?",
    "What about in a heat wave?",
    "Should I use mulch? What kind?",
    "How do I keep slugs away without chemicals?",
    "When do I harvest carrots?",
    "Can I grow herbs in the same bed?",
    "Which herbs go well with tomatoes in cooking?",
    "Give me a simple recipe that uses them.",
)


def chat_benchmark(guard: Any, path: Path, *, turns: Sequence[str] = CHAT_TURNS, max_tokens: int = 96,
                   runs: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Time to first token and whole-turn time at every turn of one chat, guarded vs ``llama_cpp.Llama``.

    Both sides get the same user turns; each side's history holds its own (greedy) answers, as
    in a real chat, so each answers the new turn from its own cache, kept between turns (the
    guard's ConversationCache; Llama's prefix cache). Giving both the guard's answers would
    make Llama re-read every answer it did not write itself. Runs alternate which side goes
    first; medians per turn; ``same_answers`` counts the turns where the two answers agree."""
    threads = threads or guard.context.n_threads
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=guard.n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def guarded(messages: list[dict[str, str]]) -> tuple[float, float, str]:
        t0, first, text = time.perf_counter(), None, ""
        for event in guard.chat(messages, max_tokens=max_tokens, policy="monitor"):
            if isinstance(event, TokenEvent) and first is None:
                first = time.perf_counter()
            if isinstance(event, DoneEvent):
                text = event.text
        end = time.perf_counter()
        return (first or end) - t0, end - t0, text

    def plain(messages: list[dict[str, str]]) -> tuple[float, float, str]:
        t0, first, pieces = time.perf_counter(), None, cast(list[str], [])
        sampling = SamplingParams()  # the guard's defaults, greedy
        stream = llm.create_chat_completion(messages=cast(Any, messages), max_tokens=max_tokens,
                                            temperature=sampling.temperature, top_k=sampling.top_k,
                                            top_p=sampling.top_p, min_p=sampling.min_p,
                                            repeat_penalty=sampling.repeat_penalty, stream=True)
        for chunk in cast(Iterator[dict[str, Any]], stream):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                first = first or time.perf_counter()
                pieces.append(piece)
        end = time.perf_counter()
        return (first or end) - t0, end - t0, "".join(pieces)

    rows: dict[str, list[list[tuple[float, float]]]] = {"guarded": [[] for _ in turns], "plain": [[] for _ in turns]}
    prompt_tokens, same = [], 0
    for run in range(runs + 1):  # the first run warms both sides up and is not counted
        guard.reset()
        llm.reset()
        histories: dict[str, list[dict[str, str]]] = {"guarded": [], "plain": []}
        for i, user in enumerate(turns):
            for history in histories.values():
                history.append({"role": "user", "content": user})
            sides = [("guarded", guarded), ("plain", plain)]
            results = {}
            for name, side in (sides if run % 2 == 0 else sides[::-1]):
                results[name] = side(list(histories[name]))
            if run:
                for name in rows:
                    rows[name][i].append(results[name][:2])
            if run == 1:
                prompt_tokens.append(len(guard.format.tokens(histories["guarded"])))
                same += results["guarded"][2] == results["plain"][2]
            for name, history in histories.items():
                history.append({"role": "assistant", "content": results[name][2]})
    per_turn = []
    for i in range(len(turns)):
        g_ttft = statistics.median(r[0] for r in rows["guarded"][i])
        p_ttft = statistics.median(r[0] for r in rows["plain"][i])
        g_turn = statistics.median(r[1] for r in rows["guarded"][i])
        p_turn = statistics.median(r[1] for r in rows["plain"][i])
        per_turn.append({"turn": i + 1, "prompt_tokens": prompt_tokens[i], "ttft_guarded_s": g_ttft,
                         "ttft_plain_s": p_ttft, "ttft_ratio": g_ttft / p_ttft, "turn_guarded_s": g_turn,
                         "turn_plain_s": p_turn, "turn_ratio": g_turn / p_turn})
    llm.close()
    return {"model": guard.model_name, "runs": runs, "max_tokens": max_tokens, "threads": threads,
            "same_answers": same, "turns": per_turn}


# ---------------------------------------------------------------------------
# Feature extraction vs plain prompt processing

def extraction_benchmark(model: Model, conversations: Sequence[Sequence[dict[str, str]]], config: Any, *,
                         runs: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Prompt tokens/s of training's feature extraction vs plain llama.cpp prompt processing of the
    same token sequences, batched the same way (several conversations per decode), same threads."""
    from dataclasses import replace

    from guardrail.runtime.chat import ChatFormat
    from guardrail.training.extraction import FeatureExtractor

    threads = threads or os.cpu_count() or 1
    extractor = FeatureExtractor(model, replace(config, n_threads=threads))
    fmt = ChatFormat(model)
    prompts = [fmt.tokens(m).ids[-config.max_tokens:] for m in conversations]
    plain_ctx = Context(model, n_ctx=extractor.context.n_ctx, n_batch=config.n_batch,
                        n_seq_max=config.n_parallel, n_threads=threads, flash_attn=config.flash_attn)

    def plain() -> tuple[int, float]:
        n, start, used = 0, time.perf_counter(), 0
        group: list[list[int]] = []
        for ids in [*prompts, None]:
            if group and (ids is None or len(group) == config.n_parallel or used + len(ids) > config.n_batch):
                plain_ctx.clear()
                entries = [Entry(t, p, (s,), p == len(g) - 1) for s, g in enumerate(group) for p, t in enumerate(g)]
                plain_ctx.decode(entries)
                n += len(entries)
                group, used = [], 0
            if ids is not None:
                group.append(ids)
                used += len(ids)
        return n, time.perf_counter() - start

    def extract() -> tuple[int, float]:
        start = time.perf_counter()
        extractor.tokens_decoded = 0
        extractor.extract(conversations)
        return extractor.tokens_decoded, time.perf_counter() - start

    plain()
    extract()
    samples: dict[str, list[float]] = {"plain": [], "extraction": []}
    for run in range(runs):
        for name, side in ((("plain", plain), ("extraction", extract)) if run % 2 == 0
                           else (("extraction", extract), ("plain", plain))):
            n, seconds = side()
            samples[name].append(n / seconds)
    extractor.close()
    plain_ctx.close()
    plain_tps, extract_tps = statistics.median(samples["plain"]), statistics.median(samples["extraction"])
    return {"model": model.info.name, "conversations": len(conversations), "runs": runs, "threads": threads,
            "layers": list(config.layers), "probes": list(config.probes),
            "plain_tokens_per_s": plain_tps, "extraction_tokens_per_s": extract_tps, "ratio": extract_tps / plain_tps}


def extraction_benchmark_default(model: Model, *, n: int = 64, runs: int = 3, threads: int | None = None) -> dict:
    """The extraction benchmark on the first ``n`` test-split conversations, with the training recipe's config."""
    from guardrail.training.data import read_jsonl
    from guardrail.training.extraction import conversation
    from guardrail.training.pipeline import default_config, ensure_dataset

    examples = read_jsonl(ensure_dataset(None) / "test.jsonl")[:n]
    return extraction_benchmark(model, [conversation(e) for e in examples], default_config(model), runs=runs,
                                threads=threads)
