"""Packets that failed to decode and were skipped (a UDP camera's lost RTP packets, a damaged file): each source
counted them "for metrics", and nothing read the count, so an operator could not see a camera's packet loss.
Now: Capture.skipped_packets (over reconnects), the camera's stats, and
hydravision_camera_skipped_packets_total, kept across the actor's restarts as every camera counter."""

from __future__ import annotations

import asyncio
import time

import workers.capture
from pipeline.telemetry import Telemetry
from test_metrics import camera_stats, scrape, value
from workers.capture import Capture, FrameSlot
from workers.settings import CameraConfig
from workers.sources import Source, SourceError


class Lossy(Source):
    """A live camera whose every connection loses 3 packets, then times out."""

    reads = 0

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps, self.decode_errors = url, True, 10.0, 0

    def open(self) -> None:
        pass

    def read(self):
        self.decode_errors += 3
        Lossy.reads += 1
        raise SourceError("timeout", f"{self.url}: no packet within the read timeout")

    def close(self) -> None:
        pass


def test_a_cameras_skipped_packets_are_counted_over_its_reconnects(monkeypatch) -> None:
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Lossy(url))
    monkeypatch.setattr(Capture, "BACKOFF_INITIAL_S", 1e-4)
    monkeypatch.setattr(Capture, "BACKOFF_MAX_S", 1e-3)
    Lossy.reads = 0

    async def main() -> Capture:
        cap = Capture(CameraConfig(id="cam", url="rtsp://127.0.0.1:9/cam"), (96, 160),
                      FrameSlot(asyncio.get_running_loop()), lambda t, f: None)
        cap.start()
        deadline = time.monotonic() + 30
        while Lossy.reads < 5 and time.monotonic() < deadline:  # attempts: reconnects counts the one outage
            await asyncio.sleep(0.01)
        cap.stop()
        return cap

    cap = asyncio.run(main())
    assert Lossy.reads >= 5 and cap.skipped_packets == 3 * Lossy.reads, (cap.reconnects, Lossy.reads)


def test_skipped_packets_reach_the_metrics_and_outlive_an_actor_restart() -> None:
    t = Telemetry()
    t.record_cameras([camera_stats("lobby", pid=100, skipped_packets=7)])
    assert value(scrape(t), "hydravision_camera_skipped_packets_total", camera="lobby") == 7
    t.record_cameras([camera_stats("lobby", pid=101, skipped_packets=2)])  # a new process counts from 0
    assert value(scrape(t), "hydravision_camera_skipped_packets_total", camera="lobby") == 9
