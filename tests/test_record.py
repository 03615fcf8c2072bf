"""`guardrail record`: the README's terminal picture is a real guarded chat, exported by Rich as SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def screen_text(path: Path) -> str:
    """The terminal's characters as the SVG draws them (Rich writes spaces as no-break spaces)."""
    root = ET.parse(path).getroot()
    return "".join(t.text or "" for t in root.iter(f"{SVG}text")).replace("\xa0", " ")


def test_record_writes_an_svg_of_a_benign_and_a_refused_turn(tmp_path, model_path):
    import cli
    from guardrail.runtime.policy import DEFAULT_OPENER
    from guardrail.surfaces.record import TURNS

    out = tmp_path / "docs" / "chat.svg"
    result = CliRunner().invoke(cli.cli, ["record", "--out", str(out), "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    text = screen_text(out)
    benign, harmful = TURNS
    assert text.index(benign) < text.index("query: benign") < text.index(harmful) < text.index("query: MALICIOUS")
    assert DEFAULT_OPENER in text and "intervened" in text
    assert "▏" in text.split(harmful)[0]  # the benign answer's re-checks are marked in it
    # the answer tokens carry their risk colours: several distinct fills besides the frame's few
    assert len(set(re.findall(r"fill: (#[0-9a-f]{6})", out.read_text()))) >= 6


def test_the_readme_opens_with_the_recorded_picture():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    picture = re.search(r"!\[[^\]]*\]\(([^)]+\.svg)\)", readme.split("\n## ")[0])
    assert picture, "the README's first section shows the recorded chat"
    text = screen_text(ROOT / picture.group(1))
    assert "you>" in text and "query: benign" in text and "query: MALICIOUS" in text
    assert f"guardrail record --out {picture.group(1)}" in readme  # and says how to regenerate it
