"""Rich renderables: each renders one thing from plain data and decides nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .engine import ModelInfo

console = Console()


def render_model_info(info: ModelInfo, out: Console | None = None) -> None:
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
    """Tokens coloured by a per-token value in [0, 1] (a norm now, a risk once the head exists)."""

    def __init__(self, pieces: Sequence[str], values: Sequence[float]):
        self.pieces = pieces
        self.values = values

    def __rich__(self) -> Text:
        text = Text()
        for piece, value in zip(self.pieces, self.values):
            text.append(piece, style=heat_style(value))
        return text


def render_benchmark(report: Mapping[str, Any], out: Console | None = None) -> None:
    out = out or console
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
