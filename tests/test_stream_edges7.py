"""Edges of a live URL change and of the camera's heartbeat clock (workers/stream.py): the abandoned decoder's
last frame, frames the motion gate skips at the change, the first heartbeat before Redis's TIME is known.
CameraPipeline without Ray (an in-memory publisher) or CameraHost on a real Redis, with fake sources and
replicas."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import redis

import workers.capture
import workers.stream
from pipeline.status import redis_now
from test_camera_update import until
from test_capture_recovery import RecordingPublisher, no_detections
from test_stream_edges import Replica
from workers.publish import Publisher
from workers.settings import CameraConfig, RedisConfig
from workers.sources import Source, SourceFrame
from workers.stream import CameraHost, CameraPipeline

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}


class HeldFrame(SourceFrame):
    """A frame whose decoder, once ``hold`` is set, stops right after its stop check (the first read of the
    frame's index) until ``go`` is set: the decoder is abandoned there, between checking and counting."""

    hold: threading.Event | None = None
    arrived, go = threading.Event(), threading.Event()

    @property
    def index(self) -> int:
        if self.hold is not None and self.hold.is_set():
            self.hold.clear()
            self.arrived.set()
            self.go.wait(10)
        return self._index

    @index.setter
    def index(self, value: int) -> None:
        self._index = value


class TwoCameras(Source):
    """Live cameras: 'rtsp://old' shows grey 100, 'rtsp://new' grey 200 and opens once ``new_opens`` is set."""

    new_opens = threading.Event()
    hold = threading.Event()

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, 25.0
        self._index = 0

    def open(self) -> None:
        if self.url.endswith("new"):
            self.new_opens.wait(10)

    def read(self) -> SourceFrame:
        time.sleep(0.01)
        grey = 200 if self.url.endswith("new") else 100
        frame = HeldFrame(self._index, self._index / 25, time.time(), (72, 128), np.full((72, 128, 3), grey, np.uint8))
        frame.hold = self.hold if not self.url.endswith("new") else None
        self._index += 1
        return frame

    def close(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_the_abandoned_decoders_last_frame_is_not_numbered_like_the_new_sources_first(monkeypatch):
    """A URL change read the old decoder's frame count, then retired it: a frame that decoder counted and handed
    over in between was numbered like the new source's first frame and accepted. The stream held that frame
    number twice, and the old scene's frame was taken for the new scene's first (tracks, zones)."""
    for e in (TwoCameras.new_opens, TwoCameras.hold, HeldFrame.arrived, HeldFrame.go):
        e.clear()
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: TwoCameras(url))
    real_capture = workers.stream.Capture

    def capture(*args, **kwargs):  # the replacement's construction: let the old decoder run its frame out
        HeldFrame.go.set()
        old._thread.join(10)
        assert not old.alive
        return real_capture(*args, **kwargs)

    pub = RecordingPublisher()
    camera = {"id": "cam", "url": "rtsp://old", "heads": ["people"]}

    async def main() -> int:
        nonlocal old
        pipe = CameraPipeline(camera, no_detections(), MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: len(pub.frames) >= 3, 20, "the old source's frames")
            TwoCameras.hold.set()
            await until(HeldFrame.arrived.is_set, 20, "the old decoder past its stop check")
            old = pipe._capture
            monkeypatch.setattr(workers.stream, "Capture", capture)
            pipe.update(pipe.camera.model_copy(update={"url": "rtsp://new"}))
            first = pipe._capture.playback_start
            await until(lambda: pipe._slot.snapshot()["pending"] == 0 and pipe.stats()["in_flight"] == 0, 20,
                        "what the old decoder handed over to be published")
            TwoCameras.new_opens.set()
            await until(lambda: sum(f >= first for f in pub.frames) >= 3, 20, "the new source's frames")
            return first
        finally:
            HeldFrame.go.set()
            TwoCameras.new_opens.set()
            pipe.stop(drain=False)
            await asyncio.wait_for(task, 20)

    old = None
    first = asyncio.run(main())
    assert len(pub.frames) == len(set(pub.frames)), f"frame {first} published twice: {pub.frames}"


class SameCamera(Source):
    """A live camera, the same under any URL: its picture changes every frame until ``still`` is set, then
    stays grey 100 (nothing moves: the motion gate skips it)."""

    still = threading.Event()

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, 25.0
        self._index = 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame:
        time.sleep(0.01)
        grey = 100 if self.still.is_set() else 100 + 50 * (self._index % 2)
        picture = np.full((72, 128, 3), grey, np.uint8)
        frame = SourceFrame(self._index, self._index / 25, time.time(), (72, 128), picture)
        self._index += 1
        return frame

    def close(self) -> None:
        pass


def person(request) -> dict:
    """One confident person standing in the middle of the frame (model input 160x96)."""
    return {h: {"boxes": np.array([[60, 20, 100, 90]], np.float32), "scores": np.array([0.9], np.float32),
                "class_ids": np.zeros(1, np.int64)} for h in request.heads}


def url_change_of_a_still_camera(monkeypatch, infer, skipped: list[int], drawn: list[tuple]) -> tuple[int, object]:
    """Runs a camera with the motion gate and a zone on SameCamera until a person stands in its zone and the
    picture is still, changes its URL (the same view), runs until 2 snapshots of the new source were drawn or
    15 of its frames skipped; records the frames skipped and the snapshots drawn (frame, boxes, analytics).
    Returns the new source's first frame number and the old scene's analytics."""
    SameCamera.still.clear()
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: SameCamera(url))
    render, queue_skipped = workers.stream.Snapshotter.render, CameraPipeline._queue_skipped

    def recording(self, picture, size, detections, analytics, frame, *args):
        drawn.append((frame, sum(len(d) for d in detections), analytics))
        return render(self, picture, size, detections, analytics, frame, *args)

    def skipping(self, item, results):
        skipped.append(item.index)
        queue_skipped(self, item, results)

    monkeypatch.setattr(workers.stream.Snapshotter, "render", recording)
    monkeypatch.setattr(CameraPipeline, "_queue_skipped", skipping)
    camera = {"id": "cam", "url": "rtsp://cam/main", "heads": ["people"], "motion": {"enabled": True},
              "snapshot": {"fps": 10}, "zones": [{"name": "all", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}]}

    async def main() -> tuple[int, object]:
        pipe = CameraPipeline(camera, infer, MODEL_INFO, RecordingPublisher())
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: pipe.open_tracks() == 1 and pipe.analytics.counts().get("zone:all:people:person"),
                        20, "a person in the zone")
            SameCamera.still.set()
            before = len(skipped)
            await until(lambda: len(skipped) >= before + 3, 20, "the still picture skipped")
            old = pipe.analytics
            pipe.update(pipe.camera.model_copy(update={"url": "rtsp://cam/sub"}))
            infer.first = first = pipe._capture.playback_start
            await until(lambda: sum(f >= first for f, _, _ in drawn) >= 2 or sum(f >= first for f in skipped) >= 15,
                        20, "snapshots of the new source, or its frames skipped")
            return first, old
        finally:
            pipe.stop(drain=False)
            await asyncio.wait_for(task, 20)

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_frames_the_motion_gate_skips_after_a_url_change_are_not_drawn_with_the_old_scene(monkeypatch):
    """Frames of the new source that the motion gate skipped before any of its frames was analysed (its first
    failed in inference, the next ones were still against it) were drawn on snapshots, and counted, with the
    old scene's zones and tracked boxes (tracks ended at the change)."""
    skipped: list[int] = []
    drawn: list[tuple] = []
    requested: list[int] = []  # frames sent to inference, in order

    async def infer(request):
        requested.append(request.frame)
        if request.frame >= infer.first and [f for f in requested if f >= infer.first] == [request.frame]:
            deadline = time.monotonic() + 10  # the new source's first frame sent fails, once frames wait behind it
            while sum(f >= infer.first for f in skipped) < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            raise RuntimeError("the replica restarted")
        return person(request)

    infer.first = 1 << 60
    first, old = url_change_of_a_still_camera(monkeypatch, infer, skipped, drawn)
    new_requests = [f for f in requested if f >= first]
    analysed = new_requests[1] if len(new_requests) > 1 else 1 << 60  # the new source's first frame analysed
    new = [(f, boxes, analytics is old) for f, boxes, analytics in drawn if first <= f < analysed]
    assert new and all(boxes == 0 and not was_old for _, boxes, was_old in new), new


@pytest.mark.timeout(60)
def test_a_new_urls_first_frame_goes_to_inference_whatever_the_motion_gate_compared_it_with(monkeypatch):
    """The motion gate compared the new source's first frame with the old source's last analysed one: the same
    view (the camera by another path, new credentials) read as still and was skipped for up to max_skip_s
    (10 s), while the change had ended every track: objects in view were not tracked nor counted in zones."""
    skipped: list[int] = []
    inferred: list[int] = []

    async def infer(request):
        inferred.append(request.frame)
        return person(request)

    infer.first = 1 << 60
    first, _ = url_change_of_a_still_camera(monkeypatch, infer, skipped, [])
    new_inferred = [f for f in inferred if f >= first]
    assert new_inferred and not [f for f in skipped if first <= f < new_inferred[0]], (first, inferred, skipped)


@pytest.mark.timeout(60)
def test_a_cameras_first_heartbeat_is_on_redis_clock_even_when_time_answers_late(redis_server, monkeypatch):
    """The camera's first status (its source's stream_up, within ms of the start) was written before its clock
    had Redis's TIME: on the host's clock, which 30 s behind made `hydravision status` and the dashboard show
    a camera that had just started as stale. And each camera of a process asked TIME for itself."""
    answer = threading.Event()
    real_time, real_redis_time, real_set_status = time.time, redis.Redis.time, Publisher.set_status
    beats: list[float] = []
    asked: list[str] = []  # the cameras' questions (the test's own are asked from its main thread)

    def late_time(self):  # Redis answers TIME late (a busy server, a slow link)
        if threading.current_thread() is not threading.main_thread():
            asked.append(threading.current_thread().name)
        answer.wait(10)
        return real_redis_time(self)

    def recording(self, camera, status):
        beats.append(status["heartbeat_ts"])
        real_set_status(self, camera, status)

    monkeypatch.setattr(redis.Redis, "time", late_time)
    monkeypatch.setattr(workers.stream, "_CLOCKS", {}, raising=False)  # no clock of an earlier test's Redis
    monkeypatch.setattr(Publisher, "set_status", recording)
    cameras = [CameraConfig(id=f"behind-{i}", url="synthetic://street?seed=1&fps=10&size=160x96", heads=["people"])
               for i in (1, 2)]

    async def main() -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() - 30.0)  # the camera host's clock is 30 s behind
        hosts = [CameraHost(c, [Replica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
                 for c in cameras]
        starting = asyncio.gather(*(host.start() for host in hosts))
        try:
            since = time.monotonic()  # TIME answers once a status was written, or after 2 s without one
            await until(lambda: beats or time.monotonic() - since > 2, 20, "a status or 2 s")
            answer.set()
            await asyncio.wait_for(starting, 20)
            await until(lambda: len(beats) >= 4, 20, "the cameras' heartbeats")
        finally:
            answer.set()
            for host in hosts:
                await host.stop(drain=False)

    asyncio.run(main())
    now = redis_now(redis_server.client())
    assert all(abs(beat - now) < 8 for beat in beats), (now, beats)
    assert asked == ["hv-redis-clock"], asked  # one clock for the process's cameras
