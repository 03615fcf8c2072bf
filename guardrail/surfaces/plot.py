"""A small SVG line chart: the answer stage's trade-off curve as a file the README can show.

No plotting library: the chart is a few lines, axes and a marker, written as SVG text,
so it needs nothing installed and diffs as text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH, HEIGHT = 640, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 40, 56
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass(frozen=True)
class Series:
    """One line: (x, y) points in the chart's units, and its name in the legend."""

    name: str
    points: Sequence[tuple[float, float]]
    dashed: bool = False


@dataclass(frozen=True)
class Marker:
    """A labelled point (the chosen operating point)."""

    label: str
    x: float
    y: float


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, x_max: float, y_max: float,
               markers: Sequence[Marker] = (), ticks: int = 5) -> str:
    """An SVG document with the series drawn over [0, x_max] x [0, y_max]."""
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + w * min(max(x, 0.0), x_max) / x_max

    def py(y: float) -> float:
        return TOP + h * (1 - min(max(y, 0.0), y_max) / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i in range(ticks + 1):
        x, y = x_max * i / ticks, y_max * i / ticks
        out.append(f'<line x1="{px(x):.1f}" y1="{TOP}" x2="{px(x):.1f}" y2="{TOP + h}" stroke="#eee"/>')
        out.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + w}" y2="{py(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{TOP + h + 16}" text-anchor="middle">{x:g}</text>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 14}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="16" y="{TOP + h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {TOP + h / 2})">{escape(y_label)}</text>')
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(s.points))
        dash = ' stroke-dasharray="5,4"' if s.dashed else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        ly = TOP + 16 + 16 * i
        out.append(f'<line x1="{LEFT + w - 190}" y1="{ly - 4}" x2="{LEFT + w - 170}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{LEFT + w - 164}" y="{ly}">{escape(s.name)}</text>')
    for m in markers:
        out.append(f'<circle cx="{px(m.x):.1f}" cy="{py(m.y):.1f}" r="5" fill="black"/>')
        out.append(f'<text x="{px(m.x) + 8:.1f}" y="{py(m.y) + 16:.1f}">{escape(m.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def answer_curve_svg(report: Mapping[str, Any]) -> str:
    """The answer stage's trade-off from ``guardrail eval --answers``: benign answers cut mid-answer vs
    harmful answers (that the query check let through) stopped, and stopped before they serve the
    request, as the answer threshold moves; the head's own threshold marked."""
    points = report["curve"]

    def pct(v: Any) -> float:
        return 100.0 * float(v or 0.0)
    stopped = [(pct(p["benign_cut_mid_answer"]), pct(p["passed_stopped_mid_answer"])) for p in points]
    before = [(pct(p["benign_cut_mid_answer"]), pct(p["passed_served_stopped_before"])) for p in points]
    overall = report["overall"]
    x_max = max(10.0, min(100.0, max((x for x, _ in stopped), default=10.0)))
    marker = Marker(f"default (answer threshold {report['answer_threshold']:.3f})",
                    pct(overall["benign_cut_mid_answer"]), pct(overall["passed_stopped_mid_answer"]))
    title = (f"Answer stage on {report['answers']} held-out answers of {report['max_tokens']} tokens "
             f"({overall['passed_query']} harmful let through by the query check)")
    return line_chart([Series("harmful answers stopped mid-answer", stopped),
                       Series("... stopped before they serve the request", before, dashed=True)],
                      title=title, x_label="benign answers cut mid-answer (%)",
                      y_label="harmful answers the query check let through (%)", x_max=x_max, y_max=100.0,
                      markers=[marker])
