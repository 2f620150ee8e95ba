"""A camera's decoder comes back from whatever stopped it, without replaying or losing frames (issue 12, defects 1, 2).

CameraPipeline without Ray, with sources that fail on cue (a reconnecting camera, a decoder that crashes on a
bug, one stuck inside a read) and a slow model; messages go to an in-memory publisher.
"""
from __future__ import annotations

import asyncio
import threading
import time
import zlib

import numpy as np
import pytest

import workers.capture
from workers.publish import Keys
from workers.sources import Source, SourceError, SourceFrame
from workers.stream import CameraPipeline
from workers.synthetic_source import SyntheticSource

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}


class RecordingPublisher:
    """Stands in for workers.publish.Publisher: keeps what the pipeline publishes, in order."""

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.events: list[dict] = []
        self.statuses: list[dict] = []
        self.lock = threading.Lock()

    def publish_detections(self, message: dict) -> None:
        with self.lock:
            self.frames.append(message["frame"])

    def publish_event(self, message: dict) -> None:
        with self.lock:
            self.events.append(message)

    def set_status(self, camera: str, status: dict) -> None:
        self.statuses.append(status)

    keys = Keys("hv")

    def set_hash(self, key: str, fields: dict) -> None:  # counts and snapshots
        pass

    def stats(self) -> dict:
        return {"connected": True, "last_error": None}

    def event_types(self) -> list[str]:
        with self.lock:
            return [e["type"] for e in self.events]


def no_detections(images: list[np.ndarray] | None = None):
    """An infer function that finds nothing; records each frame's picture (crc32) in ``images``."""
    async def infer(request):
        if images is not None:
            images.append(zlib.crc32(np.ascontiguousarray(request.image).tobytes()))
        return {h: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                    "class_ids": np.zeros(0, np.int64)} for h in request.heads}
    return infer


class ScriptedCamera(Source):
    """A live camera: 25 frames/s of a plain picture; ``script`` maps a read number (counted over every
    connection) to an exception to raise there instead of returning a frame."""

    reads = 0
    script: dict[int, Exception] = {}

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, 25.0
        self._index = 0

    def open(self) -> None:
        self._index = 0

    def read(self) -> SourceFrame | None:
        n = type(self).reads
        type(self).reads += 1
        if n in self.script:
            raise self.script[n]
        time.sleep(0.01)
        frame = SourceFrame(self._index, self._index / 25, time.time(), (72, 128), np.full((72, 128, 3), n % 255, np.uint8))
        self._index += 1
        return frame

    def close(self) -> None:
        pass


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def run_until(pipe: CameraPipeline, predicate, timeout: float, what: str) -> dict:
    """Runs the pipeline until ``predicate()`` holds, then stops it (drained) and returns its final stats."""
    task = asyncio.ensure_future(pipe.run())
    deadline = time.monotonic() + timeout
    while not predicate():
        if task.done():
            raise AssertionError(f"the camera ended ({(await task)['state']}) before {what}")
        if time.monotonic() > deadline:
            pipe.stop()
            await task
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    pipe.stop()
    return await task


@pytest.fixture
def scripted(monkeypatch):
    ScriptedCamera.reads = 0
    ScriptedCamera.script = {}
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: ScriptedCamera(url))
    return ScriptedCamera


@pytest.mark.timeout(60)
def test_reconnect_events_never_touch_pipeline_state_from_the_decode_thread(scripted, monkeypatch):
    """Defect 1: the decode thread called stats(), which iterates deques the event loop appends to
    ("deque mutated during iteration" killed the camera). Pipeline state is read on the loop only."""
    scripted.script = {n: SourceError("refused", "rtsp://cam: connection refused") for n in (5, 12, 20)}
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_INITIAL_S", 0.01)
    callers: set[str] = set()
    original = CameraPipeline.stats

    def recording_stats(self):
        callers.add(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(CameraPipeline, "stats", recording_stats)
    pub = RecordingPublisher()
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/x"}, no_detections(), MODEL_INFO, pub)
    final = asyncio.run(run_until(pipe, lambda: pub.event_types().count("stream_up") >= 4 and len(pub.frames) >= 30,
                                  30, "three reconnects and 30 frames"))
    assert callers == {threading.main_thread().name}, f"stats() called from {callers}"
    assert final["reconnects"] == 3 and final["state"] == "stopped"
    assert pub.event_types().count("stream_reconnecting") == 3
    assert "connection refused" in final["last_error"]


@pytest.mark.timeout(60)
def test_a_decoder_thread_that_crashes_on_a_bug_is_restarted(scripted):
    """Defect 1: an unexpected exception ended the capture thread and the camera for good."""
    scripted.script = {10: KeyError("bug in a decoder path")}
    pub = RecordingPublisher()
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/x"}, no_detections(), MODEL_INFO, pub)
    final = asyncio.run(run_until(pipe, lambda: len(pub.frames) >= 40, 30, "40 frames after the crash"))
    assert final["capture_crashes"] == 1
    assert "decoder thread crashed: KeyError" in final["last_error"]
    frames = pub.frames
    assert frames == sorted(set(frames)), "frame numbers repeat or go backwards after the restart"
    assert "stream_down" in pub.event_types()
    d = final["dropped"]
    assert final["decoded"] == final["published"] + sum(d.values()) + final["in_slot"] + final["in_flight"]


def synthetic_pictures(url: str, n: int) -> list[int]:
    """crc32 of the letterboxed model input of the first n frames of a synthetic scene, decoded independently."""
    src = SyntheticSource(url, realtime=False)
    src.open()
    out = []
    for _ in range(n):
        image, _ = src.read().to_model_input(tuple(MODEL_INFO["input_size"]))
        out.append(zlib.crc32(np.ascontiguousarray(image).tobytes()))
    return out


@pytest.mark.timeout(60)
def test_a_slow_model_does_not_make_a_lossless_source_look_stalled():
    """Defect 2: an unpaced source blocks handing frames to a slow model; the watchdog took that for a stall,
    re-opened the source at frame 0 and replayed old pictures under new frame numbers."""
    url = "synthetic://street?seed=4&frames=12&size=160x96"
    pictures: list[int] = []
    fast = no_detections(pictures)

    async def slow_infer(request):
        await asyncio.sleep(0.25)  # far beyond the 0.2 s stall timeout: a slow model, not a stuck decoder
        return await fast(request)

    pub = RecordingPublisher()
    camera = {"id": "file", "url": url, "realtime": False, "stall_timeout_s": 0.2, "max_inflight": 1}
    final = asyncio.run(CameraPipeline(camera, slow_infer, MODEL_INFO, pub).run())
    assert final["watchdog_restarts"] == 0
    assert final["state"] == "ended"
    assert pub.frames == list(range(12))
    assert final["decoded"] == final["published"] == 12
    assert pictures == synthetic_pictures(url, 12), "the pictures analysed are not the source's frames in order"


@pytest.mark.timeout(60)
def test_watchdog_replaces_a_stuck_decoder_and_a_file_resumes_where_it_stopped(monkeypatch):
    """The watchdog fires on a decoder stuck inside read(); the new capture of a file skips what was already
    analysed (no replay, nothing lost), and the abandoned thread, once it wakes, neither delivers frames nor
    speaks."""
    url = "synthetic://street?seed=9&frames=30&size=160x96"
    release = threading.Event()
    opened: list[SyntheticSource] = []
    original_open, original_read = SyntheticSource.open, SyntheticSource.read

    def tracking_open(self):
        opened.append(self)
        original_open(self)

    def stuck_read(self):
        if self is opened[0] and self._index == 10:
            release.wait(30)  # a decoder hung inside FFmpeg, say
        return original_read(self)

    monkeypatch.setattr(SyntheticSource, "open", tracking_open)
    monkeypatch.setattr(SyntheticSource, "read", stuck_read)
    pictures: list[int] = []
    pub = RecordingPublisher()
    camera = {"id": "file", "url": url, "realtime": False, "stall_timeout_s": 0.5}
    try:
        final = asyncio.run(CameraPipeline(camera, no_detections(pictures), MODEL_INFO, pub).run())
        events_at_end = list(pub.event_types())
        release.set()
        # The abandoned thread now reads frame 10 and tries to hand it over: refused, and silent.
        wait_for(lambda: opened[0]._index > 10, 10, "the abandoned decoder to wake up")
        time.sleep(0.2)
    finally:
        release.set()
    assert final["watchdog_restarts"] == 1 and final["state"] == "ended"
    assert pub.frames == list(range(30))
    assert pictures == synthetic_pictures(url, 30), "frames were replayed or skipped across the restart"
    assert final["decoded"] == final["published"] == 30
    assert pub.event_types() == events_at_end, "the abandoned decoder still published events"
    assert "no progress" in final["last_error"]


@pytest.mark.timeout(60)
def test_a_frame_the_decoder_finishes_after_a_stop_is_neither_handed_over_nor_counted(monkeypatch):
    """A stop asks the decoder at once to hand nothing more over: the frame it was reading when the camera
    stopped (here: a read held until after the stop) is not counted as decoded and then dropped, so a drained
    stop of a camera that kept up ends with nothing dropped. (It showed as '1 (shutdown 1)' in the demo.)"""
    reading, release = threading.Event(), threading.Event()

    class HeldCamera(ScriptedCamera):
        def read(self) -> SourceFrame | None:
            if self._index == 5:
                reading.set()
                release.wait(10)
            return super().read()

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: HeldCamera(url))
    pub = RecordingPublisher()
    fast = no_detections()

    async def infer(request):  # the last frame before the stop is still in inference when the read returns
        if request.frame == 4:
            await asyncio.sleep(0.6)
        return await fast(request)

    async def main() -> dict:
        pipe = CameraPipeline({"id": "cam", "url": "rtsp://held"}, infer, MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        while not reading.is_set():
            assert not task.done()
            await asyncio.sleep(0.01)
        pipe.stop(drain=True)
        threading.Timer(0.2, release.set).start()  # the read returns its frame after the stop
        return await task

    try:
        final = asyncio.run(main())
    finally:
        release.set()
    assert final["decoded"] == final["published"] == 5 and pub.frames == list(range(5)), final
    assert sum(final["dropped"].values()) == 0, final["dropped"]
