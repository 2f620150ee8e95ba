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


def test_the_live_table_keeps_an_error_to_a_line_or_two():
    """Review: redrawn live, a table taller than the terminal loses its bottom rows (the healthy cameras below a
    failing one): there the error is cut at LIVE_ERROR_CHARS, as before, but says it was cut."""
    console = Console(width=200, record=True, color_system=None)
    console.print(status_table([{"camera": "x", "state": "failed", "last_error": "y" * 1000}]))
    squeezed = " ".join(console.export_text().split()).replace("│", "").replace(" ", "")
    assert "y" * 117 in squeezed and "y" * 118 not in squeezed and "..." in squeezed
