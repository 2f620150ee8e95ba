"""The rate of a source that does not say its own (MJPEG over http: timed by arrival) is measured while it delivers:
since its first frame, outages included, a 50 fps camera read ~27 fps two seconds after a 2 s pause, near 0 after
an hour away; a tracker retimed then (a budget decision, a tracker update) ended lost tracks far too early."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import workers.capture
from test_capture_recovery import RecordingPublisher, no_detections, run_until
from workers.sources import Source, SourceFrame
from workers.stream import CameraPipeline

PAUSE_S = 4.0


class NoRate(Source):
    """A live camera that does not say its rate: ~50 frames/s, away for PAUSE_S (past its read_timeout_s: an
    outage) after its 40th frame."""

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, None
        self._index = 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame:
        time.sleep(PAUSE_S if self._index == 40 else 0.02)
        frame = SourceFrame(self._index, time.monotonic(), time.time(), (72, 128),
                            np.full((72, 128, 3), self._index % 200, np.uint8))
        self._index += 1
        return frame

    def close(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_the_rate_of_a_source_without_one_leaves_its_outages_out(monkeypatch) -> None:
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: NoRate(url))
    pipe = CameraPipeline({"id": "cam", "url": "http://cam/video.mjpg", "read_timeout_s": 2}, no_detections(),
                          {"input_size": [96, 160], "heads": {"people": ["person"]}}, RecordingPublisher())
    seen: list[tuple[float, int, float]] = []  # (time since start, decoded, measured rate) after the pause
    t0 = last = time.monotonic()

    def after_the_pause() -> bool:
        nonlocal last
        if time.monotonic() - last < 0.1:  # stats() as the status loop calls it (each second; here ten times)
            return False
        last, decoded = time.monotonic(), pipe.stats()["decoded"]
        if decoded > 40:
            seen.append((last - t0, decoded, pipe._base_fps() or 0.0))
        return decoded >= 160
    asyncio.run(run_until(pipe, after_the_pause, 40, "160 frames"))
    elapsed, decoded, rate = seen[-1]
    since_start = decoded / elapsed  # the pause in it
    assert rate > 1.5 * since_start, (rate, since_start)


class Slow(NoRate):
    """~4 frames/s, no pause: most intervals between two stats() calls see no frame."""

    def read(self) -> SourceFrame:
        time.sleep(0.25)
        frame = SourceFrame(self._index, time.monotonic(), time.time(), (72, 128), np.zeros((72, 128, 3), np.uint8))
        self._index += 1
        return frame


@pytest.mark.timeout(60)
def test_a_slow_sources_quiet_seconds_between_frames_count(monkeypatch) -> None:
    """Left out as an outage, they would make a 4 fps camera read as 10 (one frame an interval of 0.1 s)."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Slow(url))
    pipe = CameraPipeline({"id": "cam", "url": "http://cam/video.mjpg"}, no_detections(),
                          {"input_size": [96, 160], "heads": {"people": ["person"]}}, RecordingPublisher())
    last, first, rates = time.monotonic(), None, []

    def enough() -> bool:
        nonlocal last, first
        if time.monotonic() - last < 0.1:
            return False
        last, decoded = time.monotonic(), pipe.stats()["decoded"]
        first = first or (last if decoded else None)
        if decoded >= 20:
            rates.append((pipe._base_fps() or 0.0, (decoded - 1) / (last - first)))
        return decoded >= 24
    asyncio.run(run_until(pipe, enough, 40, "24 frames"))
    measured, real = rates[-1]
    assert 0.6 * real < measured < 1.5 * real, (measured, real)
