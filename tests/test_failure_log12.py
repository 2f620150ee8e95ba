"""An inference failure is logged once per FAILURE_LOG_S per camera and kind, with the count of frames it failed
meanwhile: a replica killed and restarted by Ray failed every frame in flight, a WARNING line each (an operator
saw about 20 per camera for a 6 s restart). Every frame is still counted (dropped.error)."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

import workers.capture
from test_capture_recovery import RecordingPublisher
from workers.source_base import Source
from workers.sources import SourceFrame
from workers.stream import CameraPipeline


class Frames(Source):
    """An unpaced file of ``n`` black frames."""

    def __init__(self, url: str, n: int = 12, **_: object) -> None:
        self.url, self.live, self.nominal_fps, self._index, self.n = url, False, 10.0, 0, n

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame | None:
        if self._index >= self.n:
            return None
        self._index += 1
        return SourceFrame(self._index - 1, self._index / 10, 0.0, (72, 128), np.zeros((72, 128, 3), np.uint8))

    def close(self) -> None:
        pass


@pytest.mark.timeout(120)
def test_the_same_inference_failure_is_one_line_not_one_a_frame(monkeypatch, caplog):
    calls = []

    async def infer(request):
        calls.append(request)
        raise RuntimeError("replica restarting" if len(calls) <= 8 else "another failure")

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Frames(url))
    camera = {"id": "door", "url": "/clips/door.mp4", "realtime": False, "heads": ["people"], "max_inflight": 1,
              "snapshot": {"enabled": False}}
    model = {"input_size": [96, 160], "heads": {"people": ["person"]}}
    with caplog.at_level(logging.WARNING, logger="workers.stream"):
        stats = asyncio.run(asyncio.wait_for(CameraPipeline(camera, infer, model, RecordingPublisher()).run(), 60))
    assert stats["dropped"]["error"] == 12
    lines = [r.getMessage() for r in caplog.records if "inference failed" in r.getMessage()]
    assert len(lines) == 2, lines  # one for each kind, within the same few seconds
    assert "replica restarting" in lines[0] and "another failure" in lines[1]
    assert stats["last_error"] == "inference failed: RuntimeError: another failure"
