"""`hydravision status` (and the run's live table) showed a finished camera's last rates as what it does now: a
camera stopped by the last run read "5.0 fps, 9.9 decode, 36/113 ms" for as long as its entry stayed in Redis
(the dashboard's tiles already showed none). The run's final table keeps them: they are its last seconds."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from pipeline.status import status_table


def shown(stats: list[dict], **kwargs) -> str:
    out = io.StringIO()
    Console(file=out, width=250).print(status_table(stats, **kwargs))
    return out.getvalue()


@pytest.mark.parametrize("state", ["stopped", "ended", "failed"])
def test_a_finished_camera_shows_no_rate_or_latency(state):
    row = {"camera": "cam-syn", "state": state, "fps": 5.04, "decode_fps": 9.93, "latency_ms_p50": 36.2,
           "latency_ms_p95": 113.7, "published": 1234}
    text = shown([row])
    assert "5.0" not in text and "9.9" not in text and "36" not in text and "113" not in text, text
    assert "1234" in text.replace(",", "")
    final = shown([row], title="final", final=True)
    assert "5.0" in final and "9.9" in final and "36" in final


def test_a_running_camera_shows_its_rates():
    text = shown([{"camera": "c", "state": "running", "fps": 5.04, "decode_fps": 9.93, "latency_ms_p50": 36.2,
                   "latency_ms_p95": 113.7}])
    assert "5.0" in text and "9.9" in text and "36" in text


def test_the_plain_status_line_shows_no_rate_of_a_finished_camera():
    """The line a run without a terminal (logs) prints every few seconds had the same fault (the review)."""
    from pipeline.status import status_line

    line = status_line([{"camera": "file", "state": "ended", "fps": 5.04, "latency_ms_p50": 36.2, "published": 9},
                        {"camera": "live", "state": "running", "fps": 4.96, "latency_ms_p50": 41.0, "published": 7}])
    ended, running = line.split(" | ")
    assert "5.0" not in ended and "36" not in ended and "- fps" in ended, ended
    assert "5.0 fps" in running and "41" in running, running
