"""A camera's decoder comes back from whatever stopped it, without replaying or losing frames (issue 12, defects 1, 2).

CameraPipeline without Ray, with sources that fail on cue (a reconnecting camera, a decoder that crashes on a
bug, one stuck inside a read) and a slow model; messages go to an in-memory publisher.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import zlib

import numpy as np
import pytest

import workers.capture
from test_camera_update import until
from workers.publish import Keys
from workers.sources import Source, SourceError, SourceFrame
from workers.stream import CameraPipeline, Resume, resume_point
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


def slowed(infer, seconds: float):
    async def slow(request):
        await asyncio.sleep(seconds)
        return await infer(request)
    return slow


@pytest.mark.timeout(60)
def test_a_replaced_decoder_resumes_a_new_url_at_that_files_own_position():
    """The frame numbering goes on across a new URL while the new file starts at its frame 0: a later
    replacement of the decoder (here a live update of read_timeout_s; the watchdog and a crashed decoder take
    the same path) resumed the file at the camera's frame number and skipped ~45 of its 60 frames."""
    first = "synthetic://street?seed=1&frames=1000&size=160x96"
    second = "synthetic://street?seed=2&frames=60&size=160x96"
    pictures: list[int] = []
    pub = RecordingPublisher()

    async def main() -> tuple[dict, int]:
        camera = {"id": "file", "url": first, "realtime": False, "max_inflight": 1}
        pipe = CameraPipeline(camera, slowed(no_detections(pictures), 0.02), MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        await until(lambda: len(pub.frames) >= 40, 30, "40 frames of the first file")
        pipe.update(pipe.camera.model_copy(update={"url": second}))
        mark = len(pictures)
        await until(lambda: len(pictures) >= mark + 12, 30, "frames of the second file")
        pipe.update(pipe.camera.model_copy(update={"read_timeout_s": 9.0}))
        return await asyncio.wait_for(task, 30), mark

    final, mark = asyncio.run(main())
    expected = synthetic_pictures(second, 60)
    assert final["state"] == "ended"
    assert [p for p in pictures[mark:] if p in set(expected)] == expected  # each once, in order, none skipped
    assert pub.frames == sorted(set(pub.frames))


@pytest.mark.timeout(60)
def test_a_restarted_actor_resumes_a_new_url_at_that_files_own_position():
    """The same across a restart of the actor (a crash, a lost node), which only has Redis to go by: the
    status keeps where the file's playback began, so the restarted camera goes on at the file's position with
    its pts continued. It took the frame number (56 here) as the position: the last 4 frames of the 60-frame
    file were analysed, 44 never were, and the pts jumped."""
    first = "synthetic://street?seed=1&frames=1000&size=160x96"
    second = "synthetic://street?seed=2&frames=60&size=160x96"
    before, after = [], []
    pub = RecordingPublisher()
    messages: list[dict] = []
    pub.publish_detections = messages.append

    async def crash(pictures: list[int]) -> None:  # runs until 12 frames of the second file, then stops
        camera = {"id": "file", "url": first, "realtime": False, "max_inflight": 1}
        pipe = CameraPipeline(camera, slowed(no_detections(pictures), 0.02), MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        await until(lambda: len(messages) >= 40, 30, "40 frames of the first file")
        pipe.update(pipe.camera.model_copy(update={"url": second}))
        mark = len(pictures)
        await until(lambda: len(pictures) >= mark + 12, 30, "frames of the second file")
        pipe.publish_status()
        pipe.stop()
        await asyncio.wait_for(task, 30)
        del pictures[:mark]

    async def restart(resume: Resume) -> dict:
        camera = {"id": "file", "url": second, "realtime": False, "max_inflight": 1}
        return await CameraPipeline(camera, no_detections(after), MODEL_INFO, pub, resume=resume).run()

    asyncio.run(crash(before))
    status = pub.statuses[-1] | {"instance": "run", "stream_mark": "0-0"}
    last = [(b"9-0", {b"data": json.dumps(messages[-1]).encode()})]
    resumed_from = len(messages)
    final = asyncio.run(restart(resume_point("run", status, last)))
    assert final["state"] == "ended"
    expected = synthetic_pictures(second, 60)
    assert [p for p in before if p in set(expected)] + after == expected  # each once, in order, none skipped
    frames = [m["frame"] for m in messages]
    assert frames == sorted(set(frames)) and frames[resumed_from] == frames[resumed_from - 1] + 1
    pts = [m["pts"] for m in messages]
    step = pts[resumed_from - 1] - pts[resumed_from - 2]
    assert pts[resumed_from] - pts[resumed_from - 1] == pytest.approx(step, abs=1e-3), "pts did not go on"


@pytest.mark.timeout(60)
def test_the_frame_a_replaced_decoder_was_handing_over_is_read_again_not_lost():
    """An unpaced file's decoder waits in the slot for a slow model; replacing it (a live update of a decoder
    setting) refuses that frame: its number counts as dropped (overload), and the next decoder starts at that
    frame of the file, so every picture of the file is still analysed, once, in order."""
    url = "synthetic://street?seed=4&frames=60&size=160x96"
    pictures: list[int] = []
    pub = RecordingPublisher()

    async def main() -> dict:
        camera = {"id": "file", "url": url, "realtime": False, "max_inflight": 1}
        pipe = CameraPipeline(camera, slowed(no_detections(pictures), 0.03), MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        await until(lambda: len(pub.frames) >= 10 and pipe._capture._in_put, 30, "the decoder waiting in put")
        pipe.update(pipe.camera.model_copy(update={"read_timeout_s": 9.0}))
        return await asyncio.wait_for(task, 30)

    final = asyncio.run(main())
    assert pictures == synthetic_pictures(url, 60), "a picture of the file was lost or analysed twice"
    d = final["dropped"]
    assert final["decoded"] == final["published"] + sum(d.values()) + final["in_slot"] + final["in_flight"]
    assert final["published"] == 60 and d["overload"] <= 1, final


@pytest.mark.timeout(60)
def test_a_paced_file_resumed_far_in_skips_to_its_frame_at_once(tmp_path):
    """A restarted camera on a realtime (paced) file resumes at frame 100: the frames before it were read
    through the pacer, 4 s of no output at 25 fps (half an hour after a crash 30 minutes in)."""
    from synthetic.clips import encode_mp4

    path = encode_mp4(tmp_path / "clip.mp4", (np.full((64, 64, 3), i % 256, np.uint8) for i in range(150)), 25)
    pub = RecordingPublisher()

    async def main() -> float:
        camera = {"id": "file", "url": str(path), "realtime": True}
        pipe = CameraPipeline(camera, no_detections(), MODEL_INFO, pub, resume=Resume(100, 3.96, "0-0"))
        task = asyncio.ensure_future(pipe.run())
        started = time.monotonic()
        await until(lambda: pub.frames, 30, "the first frame")
        took = time.monotonic() - started
        pipe.stop()
        await task
        return took

    took = asyncio.run(main())
    assert pub.frames[0] == 100
    assert took < 2.0, f"the first frame after {took:.1f} s"


@pytest.mark.timeout(60)
def test_a_camera_that_hangs_up_right_after_opening_still_backs_off(monkeypatch):
    """A relay whose publisher left opens and ends at once: counting each open as a recovery restarted the
    backoff every time, so it retried every 0.25-0.5 s forever with three events each time."""
    class HangsUp(ScriptedCamera):
        def read(self) -> SourceFrame | None:
            return None

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: HangsUp(url))
    pub = RecordingPublisher()

    def delays() -> list[float]:
        with pub.lock:
            return [e["delay_s"] for e in pub.events if e["type"] == "stream_reconnecting"]

    async def main() -> None:
        pipe = CameraPipeline({"id": "cam", "url": "rtsp://relay/cam"}, no_detections(), MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        await until(lambda: len(delays()) >= 3, 20, "three reconnects")
        pipe.stop()
        await task

    asyncio.run(main())
    first, second, third = delays()[:3]
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0 and 1.0 <= third <= 2.0, delays()


@pytest.mark.timeout(60)
def test_stopping_a_camera_whose_decoder_is_stuck_does_not_hold_up_the_others(monkeypatch):
    """Cameras of one process share its event loop. Stopping one whose decoder sits in a blocking open (an
    RTSP camera that does not answer) joined the thread on the loop, for up to 5 s: no camera moved."""
    release = threading.Event()
    real_open = workers.capture.open_source

    class SlowOpen(ScriptedCamera):
        def open(self) -> None:
            release.wait(10)  # FFmpeg waiting on a host that does not answer
            raise SourceError("timeout", "no answer")

    monkeypatch.setattr(workers.capture, "open_source",
                        lambda url, **kw: SlowOpen(url) if url.startswith("rtsp://") else real_open(url, **kw))
    moving, stuck = RecordingPublisher(), RecordingPublisher()

    async def main() -> float:
        a = CameraPipeline({"id": "a", "url": "synthetic://street?seed=1&fps=25&size=160x96"}, no_detections(),
                           MODEL_INFO, moving)
        b = CameraPipeline({"id": "b", "url": "rtsp://10.255.255.1/x"}, no_detections(), MODEL_INFO, stuck)
        ta, tb = asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())
        await until(lambda: len(moving.frames) >= 5, 30, "frames of the camera that works")
        stalls, done = [], False

        async def ticker() -> None:
            while not done:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                stalls.append(time.monotonic() - t)

        tick = asyncio.ensure_future(ticker())
        threading.Timer(1.5, release.set).start()  # the open gives up after a while, as FFmpeg's would
        b.stop()
        await asyncio.wait_for(tb, 15)
        done = True
        await tick
        a.stop()
        await ta
        return max(stalls)

    try:
        longest = asyncio.run(main())
    finally:
        release.set()
    assert longest < 1.0, f"the event loop stood still for {longest:.1f} s"
