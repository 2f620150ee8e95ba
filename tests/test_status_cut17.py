"""The final table's "last error" column (round 17)."""

from __future__ import annotations

from rich.console import Console

from pipeline.status import status_table

# admission's refusal of an HLS playlist added at run time: what to do is at its end
ERROR = ("camera.url: http://127.0.0.1:26519/hls/live/index.m3u8 is a playlist or manifest (HLS, DASH, concat, SDP), "
         "which a camera added at run time may not open (it names other URLs, unchecked): put it in the config file")


def _render(stats: list[dict]) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(status_table(stats, final=True))
    return " ".join(console.export_text().split())


def test_the_last_error_keeps_what_to_do_at_its_end():
    """The cell was cut at 120 characters with no mark of the cut: "...which a camera added at run" and no more."""
    text = _render([{"camera": "hls", "state": "failed", "last_error": ERROR}])
    assert "putitintheconfigfile" in text.replace("│", "").replace(" ", "")  # folded over lines in its column


def test_an_error_longer_than_the_cell_says_it_was_cut():
    text = _render([{"camera": "x", "state": "failed", "last_error": "y" * 1000}])
    squeezed = text.replace("│", "").replace(" ", "")
    assert "y" * 390 in squeezed and "y" * 400 not in squeezed and "..." in squeezed
