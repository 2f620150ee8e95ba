"""A decoder thread that crashes now and then, with frames in between, is restarted after the shortest back-off
each time: the back-off grows only while it keeps crashing without delivering a frame."""

from __future__ import annotations

import asyncio

import pytest

from test_capture_recovery import RecordingPublisher, no_detections, run_until, scripted  # noqa: F401 (fixture)
from workers.stream import CameraPipeline


@pytest.mark.timeout(120)
def test_crashes_far_apart_restart_after_the_shortest_back_off(scripted):  # noqa: F811
    """Eight crashes, 30 good frames apart: by the run's crash count the sixth and later waited 15 s each (about
    60 s of back-off in all); from the start again each time, ~0.5 s each."""
    scripted.script = {30 * k: KeyError(f"bug {k}") for k in range(1, 9)}
    pub = RecordingPublisher()
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/x"}, no_detections(), {"input_size": [96, 160],
                          "heads": {"people": ["person"]}}, pub)
    final = asyncio.run(run_until(pipe, lambda: len(pub.frames) >= 8 * 29 + 20, 40, "frames after eight crashes"))
    assert final["capture_crashes"] == 8
