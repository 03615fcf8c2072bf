"""The terminal's renderables: they show what the events say, and decide nothing."""

from __future__ import annotations

from rich.console import Console

from guardrail.runtime.events import CheckEvent
from guardrail.surfaces.ui import Footer, StreamState


def _footer_text(*events: CheckEvent) -> str:
    state = StreamState()
    for event in events:
        state.apply(event)
    console = Console(width=120, record=True, color_system=None)
    console.print(Footer(state))
    return console.export_text()


def test_the_footer_says_when_the_query_check_read_an_encoded_or_split_request_in_plain_words():
    read = CheckEvent(0, 0.97, True, [(3, 9)], "window", reading=("base64", "rot13"))
    assert "query: MALICIOUS (0.97) read plainly: base64, rot13" in _footer_text(read)
    as_written = CheckEvent(0, 0.12, False, [(3, 9)], "window")
    text = _footer_text(as_written)
    assert "query: benign (0.12)" in text and "plainly" not in text
    joined = CheckEvent(0, 0.93, True, [(3, 9)], "window", reading=("joined",))
    assert "query: MALICIOUS (0.93) read plainly: joined" in _footer_text(joined)
