"""Rich renderables: each renders one thing from plain data and decides nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from guardrail.runtime.engine import ModelInfo
from guardrail.runtime.events import CheckEvent, DoneEvent, Event, TokenEvent
from guardrail.runtime.shapes import Answer, is_malicious

console = Console()


def render_model_info(info: ModelInfo, n_ctx: int | None = None, out: Console | None = None) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("path", info.path),
        ("name", info.name),
        ("architecture", info.architecture),
        ("layers", str(info.n_layer)),
        ("embedding width", str(info.n_embd)),
        ("context (trained)", str(info.n_ctx_train)),
        ("KV cache per token", f"{info.kv_bytes_per_token / 1024:.1f} KiB (f16, every layer)"),
        *([("default context", f"{n_ctx} tokens: {n_ctx * info.kv_bytes_per_token / 2**20:.0f} MiB of KV cache")]
          if n_ctx else []),
        ("vocabulary", str(info.n_vocab)),
        ("parameters", f"{info.n_params / 1e6:.1f} M"),
        ("file size", f"{info.size_bytes / 2**20:.1f} MiB"),
        ("chat template", "yes" if info.chat_template else "no (a built-in fallback is used by architecture)"),
        ("adds BOS", "yes" if info.add_bos else "no"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    (out or console).print(table)


def heat_style(value: float) -> str:
    """A colour for a value in [0, 1]: green (low) through yellow to red (high)."""
    v = min(1.0, max(0.0, value))
    if v < 0.5:
        r, g = int(510 * v), 200
    else:
        r, g = 230, int(200 * (1 - v) * 2)
    return f"rgb({r},{g},60)"


class TokenStrip:
    """Tokens coloured by a per-token value in [0, 1] (``guardrail capture-demo``: a scaled hidden-state norm)."""

    def __init__(self, pieces: Sequence[str], values: Sequence[float]):
        self.pieces = pieces
        self.values = values

    def __rich__(self) -> Text:
        text = Text()
        for piece, value in zip(self.pieces, self.values):
            text.append(piece, style=heat_style(value))
        return text


def render_benchmark(report: Mapping[str, Any], out: Console | None = None) -> None:
    """Any of `guardrail bench`'s reports: each is both sides of one run and their ratio."""
    out = out or console
    if "variants" in report:
        _render_capture(report, out)
    elif report.get("kind") == "guard":
        for row in report["lengths"]:
            for s in row["schedules"]:
                out.print(f"guard ({s['schedule']}), {row['max_tokens']}-token answers: {s['ratio']:.3f}x plain "
                          f"tokens/s ({s['guarded_tps']:.1f} vs {s['plain_tps']:.1f}; {row['runs']} runs, "
                          f"{row['prompts']} prompts)")
    elif report.get("kind") == "batch":
        table = Table(title=f"N answers at once, {report['max_tokens']} tokens each: the guard batched vs plain "
                            f"batched llama.cpp ({report['runs']} runs, medians)")
        for column in ("N", "plain tok/s", "guarded tok/s", "ratio", "plain vs N=1"):
            table.add_column(column, justify="right")
        for r in report["rows"]:
            table.add_row(str(r["n"]), f"{r['plain_tps']:.1f}", f"{r['guarded_tps']:.1f}", f"{r['ratio']:.3f}",
                          f"{r['plain_speedup']:.2f}x")
        out.print(table)
    elif "turns" in report:
        table = Table(title=f"A {len(report['turns'])}-turn chat on {report['model']}: guarded vs llama_cpp.Llama "
                            f"({report['runs']} runs, medians)")
        for column in ("turn", "prompt tokens", "TTFT guarded", "TTFT Llama", "TTFT ratio", "turn ratio"):
            table.add_column(column, justify="right")
        for t in report["turns"]:
            table.add_row(str(t["turn"]), str(t["prompt_tokens"]), f"{t['ttft_guarded_s']:.3f} s",
                          f"{t['ttft_plain_s']:.3f} s", f"{t['ttft_ratio']:.2f}", f"{t['turn_ratio']:.2f}")
        out.print(table)
    else:
        out.print(f"extraction {report['extraction_tokens_per_s']:.0f} prompt tok/s vs plain "
                  f"{report['plain_tokens_per_s']:.0f}: {report['ratio']:.3f}x ({report['conversations']} "
                  f"conversations, layers {report['layers']}, probes {report['probes']}, {report['threads']} threads)")


def _render_capture(report: Mapping[str, Any], out: Console) -> None:
    table = Table(title=f"Capture overhead on {report['model']} ({report['runs']} interleaved runs, medians)")
    for column in ("variant", "prompt tok/s", "decode tok/s", "prompt ratio", "decode ratio"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for row in report["variants"]:
        table.add_row(row["name"], f"{row['prompt_tps']:.0f}", f"{row['decode_tps']:.1f}",
                      f"{row['prompt_ratio']:.3f}", f"{row['decode_ratio']:.3f}")
    out.print(table)
    out.print(f"ratios are against '{report['baseline']}'; {report['n_prompt']} prompt tokens, "
              f"{report['n_decode']} decoded tokens, {report['threads']} threads")


def render_lines(lines: Iterable[str], out: Console | None = None) -> None:
    for line in lines:
        (out or console).print(line)


# ---------------------------------------------------------------------------
# Guarded generation: one state object the events update, small renderables of it


class StreamState:
    """What the screen shows of one guarded answer, updated only by events.

    The numbers (query verdict, risk, checks, tokens, the end) are the runtime's answer
    accumulator's, the same the server and the llm plugin report; this keeps only how
    each piece of text is drawn."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.pieces: list[tuple[str, str]] = []  # (text, style)

    @property
    def done(self) -> DoneEvent | None:
        return self.answer.done

    def apply(self, event: Event) -> None:
        self.answer.add(event)
        if isinstance(event, TokenEvent):
            style = "bold white on red3" if event.forced else (
                heat_style(event.risk) if event.risk is not None else "")
            self.pieces.append((event.text, style))
        elif isinstance(event, CheckEvent) and event.index and (event.signal == "probe" or event.malicious):
            self.pieces.append(("▏", "bold red" if event.malicious else "green"))  # every-step checks: only alarms


class AnswerView:
    """The answer so far: tokens coloured by risk, check points marked, forced text highlighted."""

    def __init__(self, state: StreamState):
        self.state = state

    def __rich__(self) -> Text:
        text = Text()
        for piece, style in self.state.pieces:
            text.append(piece, style=style)
        return text


class Footer:
    """Query verdict, current risk, checks made, speed and the guard's overhead."""

    def __init__(self, state: StreamState):
        self.state = state

    def __rich__(self) -> Text:
        answer = self.state.answer
        text = Text()
        query = answer.query_check
        if query is None:
            text.append("query: …", style="dim")
        else:
            malicious = is_malicious(query)
            text.append(f"query: {'MALICIOUS' if malicious else 'benign'} ({query.risk:.2f})",
                        style="bold red" if malicious else "green")
            if query.reading:
                text.append(f" read plainly: {', '.join(query.reading)}", style="dim")
        risk = answer.token_risk
        text.append(f"  risk now: {'-' if risk is None else f'{risk:.2f}'}  checks: {len(answer.checks)}  "
                    f"tokens: {answer.sampled_tokens}")
        done = answer.done
        if done is not None:
            share = done.guard_s / done.elapsed_s if done.elapsed_s else 0.0
            text.append(f"  {done.tokens_per_s:.1f} tok/s  guard: {done.guard_s * 1000:.0f} ms ({share:.0%})"
                        f"  end: {done.finish_reason}")
        if answer.interventions:
            last = answer.interventions[-1]
            text.append(f"\nintervened — {last.action} at token {last.index}: {last.reason}", style="bold red")
        return text


def stream_view(state: StreamState, title: str = "assistant") -> Any:
    """The answer's panel over its footer: shown live while streaming, printed once in a recording."""
    from rich.console import Group
    from rich.panel import Panel

    return Group(Panel(AnswerView(state), title=title, border_style="blue"), Footer(state))


def render_stream(events: Iterable[Event], *, mode: str = "rich", out: Console | None = None,
                  title: str = "assistant") -> StreamState:
    """Show one guarded answer: ``rich`` (live, coloured), ``plain`` (text only) or ``json`` (events)."""
    import json

    from rich.live import Live

    out = out or console
    state = StreamState()
    if mode == "rich" and not out.is_terminal:
        mode = "plain"
    if mode == "json":
        for event in events:
            state.apply(event)
            out.file.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            out.file.flush()
        return state
    if mode == "plain":
        for event in events:
            state.apply(event)
            if isinstance(event, TokenEvent):
                out.file.write(event.text)
                out.file.flush()
        out.file.write("\n")
        return state
    with Live(stream_view(state, title), console=out, refresh_per_second=12, transient=False):
        for event in events:
            state.apply(event)
    return state


# ---------------------------------------------------------------------------
# Reports


def _number(value: Any, digits: int = 3) -> str:
    """A report's number to ``digits`` places, or "-" where the report has none."""
    return "-" if value is None else f"{value:.{digits}f}"


def render_loso(report: Mapping[str, Any], baseline: Mapping[str, Any] | None = None,
                out: Console | None = None) -> None:
    """Leave-one-source-out AUROC per held-out source, the head beside the text baseline."""
    table = Table(title=f"leave-one-source-out: {report['recipe']}")
    for column in ("held-out source", "n", "label", "AUROC", "baseline AUROC", "flagged at threshold"):
        table.add_column(column, justify="left" if column == "held-out source" else "right",
                         no_wrap=column == "held-out source")
    for name, row in report["sources"].items():
        base = (baseline or {}).get("sources", {}).get(name, {})
        table.add_row(name, str(row["n"]), "/".join(map(str, row["label"])), _number(row["auroc"]),
                      _number(base.get("auroc")), _number(row["flagged"], 2))
    table.add_row("mean", "", "", _number(report["mean_auroc"]), _number((baseline or {}).get("mean_auroc")), "",
                  style="bold")
    table.add_row("min", "", "", _number(report["min_auroc"]), _number((baseline or {}).get("min_auroc")), "", style="bold")
    (out or console).print(table)


def render_eval(report: Mapping[str, Any], out: Console | None = None) -> None:
    out = out or console
    if "loso" in report:
        render_loso(report["loso"], report.get("loso_baseline"), out)
        return
    table = Table(title=f"{report.get('data', '')}  (threshold {_number(report.get('threshold'))})")
    for column in ("source", "n", "AUROC", "vs pool", "TPR@1%FPR", "TPR@5%FPR", "flagged", "baseline AUROC"):
        table.add_column(column, justify="left" if column == "source" else "right", no_wrap=column == "source")
    base = report.get("baseline", {}).get("sources", {})
    for name, row in report["sources"].items():
        table.add_row(name, str(row["n"]), _number(row.get("auroc")), _number(row.get("auroc_vs_pool")),
                      _number(row.get("tpr@1%fpr"), 2), _number(row.get("tpr@5%fpr"), 2), _number(row.get("flagged"), 2),
                      _number(base.get(name, {}).get("auroc_vs_pool")))
    overall = report["overall"]
    table.add_row("overall", str(overall["n"]), _number(overall.get("auroc")), "", _number(overall.get("tpr@1%fpr"), 2),
                  _number(overall.get("tpr@5%fpr"), 2), _number(overall.get("flagged"), 2),
                  _number(report.get("baseline", {}).get("overall", {}).get("auroc")), style="bold")
    out.print(table)
    if report.get("forms"):
        out.print(_forms_table(report["forms"], report.get("threshold")))


def _forms_table(forms: Mapping[str, Mapping[str, Any]], threshold: Any) -> Table:
    """Per form of request: does the head read it (AUROC within the form), and what it flags there."""
    table = Table(title=f"by form of request (flagged at {_number(threshold)})")
    for column in ("form", "benign", "harmful", "AUROC", "benign flagged", "harmful flagged"):
        table.add_column(column, justify="left" if column == "form" else "right", no_wrap=column == "form")
    for name, row in forms.items():
        table.add_row(name, str(row["n_benign"]), str(row["n_harmful"]), _number(row.get("auroc")),
                      _pct(row.get("benign_flagged")), _pct(row.get("harmful_flagged")))
    return table


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def render_answer_eval(report: Mapping[str, Any], out: Console | None = None) -> None:
    """The guard over whole answers, per answer: benign answers cut, harmful answers stopped (and
    stopped before they serve the request), overall, per source and per form of request."""
    out = out or console
    draws = report.get("draws", [1])
    named = f" (draw{'s' if len(draws) > 1 else ''} {'+'.join(map(str, draws))})" if draws != [1] else ""
    title = (f"{report['answers']} held-out answers{named} of {report['max_tokens']} tokens: query threshold "
             f"{_number(report['query_threshold'])}, answer stage {report['rule']} at "
             f"{_number(report['answer_threshold'])}"
             + (f", prefill check at {_number(report['prefill_threshold'])}"
                if report.get("prefill_threshold", 1.0) < 1.0 else ""))
    per_draw = [(f"draw {d}", r) for d, r in (report.get("by_draw") or {}).items()]
    out.print(_answer_table(title, "source", list(report["sources"].items()) + per_draw
                            + [("overall", report["overall"])]))
    if report.get("forms"):
        out.print(_answer_table("the same answers by form of request", "form", list(report["forms"].items())))
    if report.get("in_time"):
        out.print(_in_time_table(report["in_time"]))
    if report.get("curve_file"):
        out.print(f"curve: {report['curve_file']}")


def _in_time_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """One row per harmful answer the query check let through that serves: what stopping it in time would cost."""
    table = Table(title="harmful answers the query check let through that serve: stopping each before it serves")
    for column in ("form", "source", "query risk", "serves from token", "the guard stops it after",
                   "answer threshold to stop it in time", "benign answers it would cut"):
        table.add_column(column, justify="left" if column in ("form", "source") else "right", no_wrap=True)
    for r in rows:
        reach = r["threshold_in_time"]
        stopped = r.get("stopped_at")
        table.add_row(r["form"], r["source"], _number(r["query_risk"]), f"{r['serves_from']} of {r['answer_tokens']}",
                      "never" if stopped is None else "its prefill" if stopped == 0 else f"{stopped} tokens",
                      "the prefill check stops it" if r.get("stopped_by_prefill") else
                      "none (serves at once)" if reach is None else _number(reach),
                      "" if r["benign_cut_in_time"] is None or r.get("stopped_by_prefill")
                      else _pct(r["benign_cut_in_time"]))
    return table


def _answer_table(title: str, first: str, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> Table:
    """One row per ``<group>:<label>`` (a benign row: answers cut; a harmful row: answers stopped), per draw
    where draws are pooled, and overall."""
    table = Table(title=title)
    for column in (first, "n", "cut", "by query", "by prefill", "mid-answer", "served unguarded", "served guarded",
                   "let through: stopped", "... before serving"):
        table.add_column(column, justify="left" if column == first else "right", no_wrap=column == first)
    for name, r in rows:
        whole = name == "overall" or name.startswith("draw ")  # both labels: its cut column is the benign one
        harmful = name.endswith(":harmful") or whole
        table.add_row(name, str(r["benign"] + r["harmful"] if whole else (r["harmful"] or r["benign"])),
                      _pct(r["benign_cut"] if not name.endswith(":harmful") else r["harmful_stopped"]),
                      _pct(r["benign_cut_by_query"] if not name.endswith(":harmful") else r["harmful_stopped_by_query"]),
                      _pct(r.get("benign_cut_by_prefill") if not name.endswith(":harmful")
                           else r.get("harmful_stopped_by_prefill")),
                      _pct(r["benign_cut_mid_answer"]) if not name.endswith(":harmful") else "",
                      _pct(r["harmful_served_unguarded"]) if harmful else "",
                      _pct(r["harmful_served_guarded"]) if harmful else "",
                      _pct((r["passed_stopped_mid_answer"] or 0) + (r.get("passed_stopped_by_prefill") or 0)
                           if r["passed_stopped_mid_answer"] is not None else None) if harmful else "",
                      _pct(r["passed_served_stopped_before"]) if harmful else "",
                      style="bold" if name == "overall" else None)
    return table


def render_training(head: Any, out: Console | None = None) -> None:
    out = out or console
    metrics = head.metrics
    if "loso" in metrics:
        render_loso(metrics["loso"], metrics.get("loso_baseline"), out)
    if "test" in metrics:
        render_eval({"data": "test split", "threshold": head.threshold, **metrics["test"],
                     "baseline": metrics.get("test_baseline", {})}, out)
    answer = getattr(head, "answer_head", None)
    if answer is not None:
        a = answer.metrics
        for split in ("val", "test"):
            r = a.get(split) or {}
            out.print(f"answer stage ({a.get('rule')} at {_number(a.get('threshold'))}), {split} answers: benign cut "
                      f"mid-answer {_pct(r.get('benign_cut_mid_answer'))} of {r.get('benign')}; harmful let through "
                      f"by the query check stopped {_pct(r.get('passed_stopped_mid_answer'))} of "
                      f"{r.get('passed_query')}, before serving {_pct(r.get('passed_served_stopped_before'))}")
        prefill = (answer.extra.get("answer_stage") or {}).get("prefill") or {}
        if prefill:
            v = prefill.get("val") or {}
            out.print(f"prefill check at {_number(prefill.get('threshold'))}: of the prefilled validation requests the "
                      f"query check let through, {v.get('benign_cut')} of {prefill.get('n_benign')} benign cut, "
                      f"{v.get('harmful_stopped')} of {v.get('harmful_passed')} harmful stopped before a word is written")
        splits = (answer.extra.get("answer_stage") or {}).get("splits") or []
        if len(splits) > 1:
            out.print("the budget's splits on validation answers (benign cuts at the query + mid-answer: harmful "
                      "stopped before serving, stopped at all; * chosen): "
                      + ", ".join(f"{'*' if s.get('chosen') else ''}{s['query_cuts']}+{max(s['answer_cuts'], 0)}: "
                                  f"{s['prevented']}, {s['stopped']}" for s in splits))
    q = metrics.get("quantization", {})
    secs = metrics.get("seconds", {})
    out.print(f"int8 vs float: max |Δp| {_number(q.get('max_abs_diff'), 4)}, AUROC {_number(q.get('auroc_float'))} vs "
              f"{_number(q.get('auroc_quant'))}; extraction {secs.get('extraction', 0):.0f} s, "
              f"training {secs.get('training', 0):.0f} s")
    if getattr(head, "caveat", None):
        out.print(f"[yellow]note[/]: {escape(head.caveat)}")


def render_attack(report: Mapping[str, Any], out: Console | None = None, *, sources: bool = False) -> None:
    """The attack suites judged by content: ASR unguarded, by the old rule and by content; benign over-refusal."""
    out = out or console
    settings = [f"{label} {report[key]}" for key, label in (("policy", "policy"), ("schedule", "schedule"),
                                                             ("max_tokens", "tokens"), ("long_tokens", "long suites"))
                if report.get(key) is not None]
    title = "attack suites" + (f" ({', '.join(settings)})" if settings else "")
    table = Table(title=title)
    for column in ("suite", "n", "ASR unguarded", "ASR guarded (old rule)", "ASR guarded (content)",
                   "intervened, still complied", "benign interventions", "benign over-refusal (content)",
                   "benign served, unguarded / guarded"):
        table.add_column(column, justify="left" if column == "suite" else "right")

    def row(name: str, block: Mapping[str, Any]) -> None:
        table.add_row(name, str(block["n"]), _number(block.get("asr_unguarded"), 2), _number(block.get("asr_guarded_old"), 2),
                      _number(block.get("asr_guarded"), 2), _number(block.get("intervened_but_complied"), 2),
                      _number(block.get("intervention_rate"), 2), _number(block.get("over_refusal"), 2),
                      "-" if "served_guarded" not in block else
                      f"{block['served_unguarded']:.2f} / {block['served_guarded']:.2f}")

    for name, block in report["suites"].items():
        row(name, block)
        if sources:
            for source, sub in block.get("sources", {}).items():
                row(f"  {source}", sub)
    for kind, block in report.get("overall", {}).items():
        if kind in ("harmful", "benign"):
            row(f"all {kind}", block)
    read = report.get("served_by")
    if read:
        refusals = read.get("rule judge, guard refusals", 0)
        table.caption = (f"harmful answers judged by a hand reading of the same text: {read['hand labels']}, "
                         f"by the rule judge: {read['rule judge']} ({refusals} of them the guard's refusals)")
    out.print(table)
    pooled = report.get("forms_seen_vs_held_out") or {}
    if pooled:
        forms = Table(title="forms training used vs held-out forms (obfuscation, persona, multi-turn, spread, "
                            "long, language)")
        for column in ("requests", "forms", "n", "ASR unguarded", "intervened", "ASR guarded (content)",
                       "benign interventions"):
            forms.add_column(column, justify="left" if column in ("requests", "forms") else "right")
        for kind, blocks in pooled.items():
            for which, block in blocks.items():
                forms.add_row(kind, which, str(block["n"]), _number(block.get("asr_unguarded"), 2),
                              _number(block.get("intervened"), 2), _number(block.get("asr_guarded"), 2),
                              _number(block.get("intervention_rate"), 2))
        out.print(forms)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def render_models(rows: Sequence[Mapping[str, Any]], out: Console | None = None) -> None:
    """`guardrail models`: one row per GGUF chat model found, then what to run for those without a head."""
    out = out or console
    if not rows:
        out.print("no GGUF chat models found (looked in guardrail's cache, Ollama, the Hugging Face cache and "
                  "LM Studio); `guardrail fetch` gets the default one")
        return
    table = Table(title="GGUF chat models on this machine (--model takes the first column)")
    for column in ("model", "store", "arch", "quant", "size", "head"):
        table.add_column(column, justify="right" if column == "size" else "left")
    heads = {"trained": "[green]trained[/]", "shipped": "[green]shipped[/]", "none": "[yellow]none[/]",
             "unknown": "[dim]not hashed[/]"}
    for row in rows:  # names and errors are Text: a file name with [brackets] is not markup
        if "error" in row:
            table.add_row(Text(row["model"]), row["store"], "-", "-", _size(row["size_bytes"]),
                          Text(row["error"], style="red"))
            continue
        table.add_row(Text(row["model"]), row["store"], row["architecture"] or "-", row["quantization"] or "-",
                      _size(row["size_bytes"]), heads[row["head"]])
    out.print(table)
    for row in rows:
        if row.get("head") == "none":
            out.print(Text.assemble(f"no head for {row['model']}: ", (row["train"], "bold")))
    unknown = sum(row.get("head") == "unknown" for row in rows)
    if unknown:
        out.print(f"{unknown} not hashed yet: `guardrail models --hash` finds their heads (hashes each file once)")


def render_heads(rows: Sequence[Mapping[str, Any]], out: Console | None = None) -> None:
    out = out or console
    if not rows:
        out.print("no safety heads found")
        return
    table = Table(title="safety heads guardrail finds (shipped, then trained with `guardrail train --model`)")
    for column in ("model (sha256)", "arch", "created", "examples", "LOSO mean / min", "test AUROC",
                   "test answers: benign cut / harmful stopped", "path"):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row("-", "-", "-", "-", "-", "-", "-", f"{row['path']}: {row['error']}")
            continue
        table.add_row(row["model_sha256"][:12], row["architecture"], str(row["created"]), str(row["examples"] or "-"),
                      f"{_number(row['loso_mean_auroc'])} / {_number(row['loso_min_auroc'])}", _number(row["test_auroc"]),
                      f"{_pct(row.get('answers_benign_cut'))} / {_pct(row.get('answers_harmful_stopped'))}", row["path"])
    out.print(table)
    for row in rows:
        if row.get("caveat"):
            out.print(f"[yellow]note[/]: {escape(row['path'])}: {escape(row['caveat'])}")
