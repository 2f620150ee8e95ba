"""Edges of the motion gate and of a camera's stats (workers/stream.py, workers/analytics.py, workers/motion.py):
objects that leave or appear in a still scene, the decode rate of a camera that stopped sending. CameraPipeline
without Ray (an in-memory publisher), fake sources and a fake infer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import workers.capture
from test_capture_recovery import RecordingPublisher
from workers.sources import Source, SourceFrame
from workers.stream import CameraPipeline

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}
FPS = 10.0
FRAMES = 160  # 16 s: the default max_skip_s (10 s) and some
CHANGE = 20  # the frame the scene changes on (someone leaves, the light goes on)
WHOLE_FRAME = [{"name": "room", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}]


class Scripted(Source):
    """An unpaced file at 10 fps showing ``picture(i)`` on frame i. A frame is read once the camera handled every
    frame before it (``handled()``): the gate then decides on each with all the results before it, whatever the
    machine's speed."""

    picture = staticmethod(lambda i: np.zeros((72, 128, 3), np.uint8))
    handled = staticmethod(lambda: 1 << 60)

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, False, FPS
        self._index = 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame | None:
        i = self._index
        if i >= FRAMES:
            return None
        deadline = time.monotonic() + 10
        while self.handled() < i and time.monotonic() < deadline:
            time.sleep(0.001)
        self._index += 1
        return SourceFrame(i, i / FPS, time.time(), (72, 128), self.picture(i))

    def close(self) -> None:
        pass


class EventPublisher(RecordingPublisher):
    """Also records, with each event, the frame it came on (the next frame published after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[tuple[str, int]] = []  # (event type, frames published before it)

    def publish_event(self, message: dict) -> None:
        super().publish_event(message)
        self.at.append((message["type"], len(self.frames)))

    def frame_of(self, type_: str) -> int | None:
        """The frame the first ``type_`` event came on; None: none came before the source's end."""
        return next((self.frames[n] for t, n in self.at if t == type_ and n < len(self.frames)), None)


def person_on(present):
    """An infer function: one confident person standing in the middle of the picture on frames where
    ``present(frame)``."""
    async def infer(request):
        n = 1 if present(request.frame) else 0
        return {h: {"boxes": np.array([[60, 20, 100, 90]] * n, np.float32).reshape(n, 4),
                    "scores": np.full(n, 0.9, np.float32), "class_ids": np.zeros(n, np.int64)} for h in request.heads}
    return infer


def run_scene(monkeypatch, picture, present, zones: list) -> EventPublisher:
    """Runs a camera with the motion gate (default settings) on ``Scripted`` to its end; returns what it published."""
    pub, skipped, skipped_frame = EventPublisher(), [], CameraPipeline._skipped_frame

    def counted(self, item):
        skipped_frame(self, item)
        skipped.append(item.index)

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Scripted(url))
    monkeypatch.setattr(Scripted, "picture", staticmethod(picture))
    monkeypatch.setattr(Scripted, "handled", staticmethod(lambda: len(pub.frames) + len(skipped)))
    monkeypatch.setattr(CameraPipeline, "_skipped_frame", counted)
    camera = {"id": "room", "url": "/clips/room.mp4", "realtime": False, "heads": ["people"],
              "motion": {"enabled": True}, "snapshot": {"enabled": False}, "zones": zones}
    stats = asyncio.run(asyncio.wait_for(CameraPipeline(camera, person_on(present), MODEL_INFO, pub).run(), 30))
    assert stats["state"] == "ended" and stats["skipped"] > 0
    print({t: pub.frame_of(t) for t in ("track_started", "zone_entered", "track_ended", "zone_left")},
          "frames analysed", pub.frames)
    return pub


def walker(i: int) -> np.ndarray:
    """A person (a bright block that moves a little each frame, so the gate lets the frames through) before
    CHANGE, then the empty, still room."""
    picture = np.full((72, 128, 3), 100, np.uint8)
    if i < CHANGE:
        picture[10:70, 40 + i % 4:72 + i % 4] = 220
    return picture


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zones", [WHOLE_FRAME, []])
def test_an_object_that_leaves_a_still_scene_leaves_its_zone_and_its_track_ends_without_waiting_for_max_skip_s(
        monkeypatch, zones):
    """A person leaves the picture from inside a zone: the first empty frame is analysed (it differs from the last
    one), the occupant is missed once, then the scene is still and the gate skipped every frame until max_skip_s
    (10 s): zone_left came ~10 s late (the counts said the zone was occupied all that time), and the track, whose
    lost-track budget is counted in analysed frames, ended only after 10 of them, ~100 s late."""
    pub = run_scene(monkeypatch, walker, lambda f: f < CHANGE, zones)
    left, ended = pub.frame_of("zone_left"), pub.frame_of("track_ended")
    # the zone's patience (at most lost_s, 3 s) and the tracker's (its lost-track buffer, re-ID's 2 s): not 10 s
    if zones:
        assert "zone_entered" in pub.event_types()
        assert left is not None and left - CHANGE <= 4 * FPS, left
    assert ended is not None and ended - CHANGE <= 4 * FPS, ended


def lights_on(i: int) -> np.ndarray:
    """A dark room until CHANGE, then lit, a person sitting still in it."""
    picture = np.full((72, 128, 3), 30 if i < CHANGE else 150, np.uint8)
    if i >= CHANGE:
        picture[10:70, 40:72] = 220
    return picture


@pytest.mark.timeout(60)
def test_an_object_that_appears_and_stands_still_is_tracked_and_enters_its_zone_without_waiting_for_max_skip_s(
        monkeypatch):
    """The light goes on over a person sitting still: that frame is analysed, but a new track is confirmed only on
    the next one it is seen on, and a zone's entry only after min_inside_s of analysed frames; the gate skipped
    them all until max_skip_s: track_started came 10 s late and zone_entered 20 s late, with entered_pts 10 s
    late too."""
    pub = run_scene(monkeypatch, lights_on, lambda f: f >= CHANGE, WHOLE_FRAME)
    started, entered = pub.frame_of("track_started"), pub.frame_of("zone_entered")
    assert started is not None and started - CHANGE <= 5, started
    assert entered is not None and entered - CHANGE <= 5, entered
    event = next(e for e in pub.events if e["type"] == "zone_entered")
    assert event["entered_pts"] <= (CHANGE + 5) / FPS, event


class StillSlot:
    """Stands in for the camera's FrameSlot in stats(): ``decoded`` frames so far, nothing waiting."""

    def __init__(self, decoded: int) -> None:
        self.decoded = decoded

    def snapshot(self) -> dict:
        return {"decoded": self.decoded, "dropped_rate": 0, "dropped_budget": 0, "replaced": 0, "abandoned": 0,
                "pending": 0}


def test_decode_fps_is_the_recent_rate_not_the_average_since_the_start(monkeypatch):
    """decode_fps was frames decoded over the time since the start: a camera that decoded 25 fps for an hour and
    then nothing for an hour (still 'reconnecting') read '12.5 decoded' on the dashboard and the status table."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    camera = {"id": "gone", "url": "rtsp://cam/main", "heads": ["people"]}
    pipe = CameraPipeline(camera, person_on(lambda f: False), MODEL_INFO, RecordingPublisher())
    pipe.started_at, pipe._slot = time.time() - 7200, StillSlot(25 * 3600)
    assert pipe.stats()["decode_fps"] == 12.5  # one look: the rate since the start is all there is
    for _ in range(6):  # the status loop, once a second: nothing decoded any more
        clock[0] += 1.0
        assert pipe.stats()["decode_fps"] == 0.0
    for _ in range(6):  # it sends again, 10 frames a second
        clock[0] += 1.0
        pipe._slot.decoded += 10
        decode_fps = pipe.stats()["decode_fps"]
    assert decode_fps == 10.0
