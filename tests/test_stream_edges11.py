"""Edges of one camera inside its process (workers/stream.py): the motion gate across a change of the source's
frame size, and a stop that comes before the camera's run took its first step. CameraPipeline without Ray, with
scripted sources and an in-memory publisher."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import workers.capture
from test_capture_recovery import RecordingPublisher, ScriptedCamera, no_detections, run_until
from workers.sources import Source, SourceFrame
from workers.stream import CameraPipeline

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}


class Resizing(Source):
    """A live camera showing one still, plain view; from its 10th frame on at twice the resolution (a camera
    switching streams): letterboxed to the model's input, both sizes give the same picture."""

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, 25.0
        self._index = 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame:
        time.sleep(0.005)
        h, w = (72, 128) if self._index < 10 else (144, 256)
        frame = SourceFrame(self._index, self._index / 25, time.time(), (h, w), np.full((h, w, 3), 120, np.uint8))
        self._index += 1
        return frame

    def close(self) -> None:
        pass


class SizePublisher(RecordingPublisher):
    """Also keeps each message's frame size (width, height)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def publish_detections(self, message: dict) -> None:
        super().publish_detections(message)
        self.sizes.append(tuple(message["size"]))


@pytest.mark.timeout(60)
def test_the_first_frame_at_a_new_frame_size_goes_to_inference_behind_the_motion_gate(monkeypatch):
    """The gate compared the new size's letterboxed input with the old size's: the same view, so every frame at
    the new size was skipped until max_skip_s (10 s by default), behind tracks, zones and snapshot boxes of the
    old size's pixels."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Resizing(url))
    pub = SizePublisher()
    camera = {"id": "cam", "url": "rtsp://cam/x", "motion": {"enabled": True, "max_skip_s": 1000},
              "snapshot": {"enabled": False}}
    pipe = CameraPipeline(camera, no_detections(), MODEL_INFO, pub)
    final = asyncio.run(run_until(pipe, lambda: pipe.stats()["decoded"] >= 40 and pipe.stats()["skipped"] > 0, 30,
                                  "40 frames decoded, one of them skipped (the gate still skips a still view)"))
    assert (128, 72) in pub.sizes, "the first frame went to inference"
    assert (256, 144) in pub.sizes, f"no frame at the new size was analysed: {pub.sizes}, {final['skipped']} skipped"


@pytest.mark.timeout(60)
def test_a_stop_before_the_runs_first_step_ends_the_run(monkeypatch):
    """A stop (with drain) that came between the run's creation and its first step found no slot to close and
    no decoder to tell: the camera read and published on until a stop without drain (CameraHost's, 10 s later)."""
    ScriptedCamera.reads, ScriptedCamera.script = 0, {}
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: ScriptedCamera(url))
    pub = RecordingPublisher()
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/x"}, no_detections(), MODEL_INFO, pub)

    async def main() -> dict | None:
        task = asyncio.ensure_future(pipe.run())
        pipe.stop()  # before the task's first step
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            pipe.stop(drain=False)
            await task
            return None
        return task.result()

    final = asyncio.run(main())
    assert final is not None, f"the stop was lost: {len(pub.frames)} frames published after it"
    assert final["state"] == "stopped" and pub.frames == []
    assert pub.statuses[-1]["state"] == "stopped"
