"""Two defects operators found in a camera's capture across an outage (workers/capture.py, workers/stream.py).

1. A decoder that makes no progress where no timeout reaches (here: an open that blocks; a network source can
   block so in a system call PyAV's timeout cannot interrupt) was restarted by the watchdog every stall period:
   each restart said one more ``stream_down`` (the final table read ``reconnects 11`` for a camera that never
   opened), and each left its abandoned thread, and its fd, blocked for the life of the process, without bound.
   Now one outage is said and counted once however many restarts it takes until a frame comes, and the watchdog
   abandons no second thread while the one it abandoned before is still blocked: it says so and waits for it.
2. After a reconnect a live camera's stream time went on one frame after the last, as if the outage never
   happened (an MJPEG camera away 50 s: pts 29.698 -> 29.857 while ts jumped 50 s; a car standing in a zone the
   whole 98 s left it with dwell_s 47.9). Now a live source's stream time follows the wall clock across an
   outage; a file's goes on where it was.

CameraPipeline without Ray, with a stand-in camera whose opens and reads block or fail on cue.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import workers.capture
from test_camera_update import until
from test_capture_recovery import MODEL_INFO, RecordingPublisher, no_detections
from workers.source_base import Source, SourceError, SourceFrame
from workers.stream import CameraPipeline

CAMERA = "cam15b"  # its decoder threads are "capture cam15b: ...", told from other tests' in this process


class Camera(Source):
    """A live camera (an rtsp:// URL) that times its frames as they come, as FFmpeg does an MJPEG camera's: its
    stream time runs with the wall clock within a connection, from 0 at each. Opens and reads are numbered over the
    run; ``block_opens`` / ``block_reads`` hold those numbers until ``gate(kind, n)`` is set, ``fail_reads`` raise
    (the camera drops)."""

    live = True
    opens = reads = 0
    block_opens: set[int] = set()
    block_reads: set[int] = set()
    fail_reads: set[int] = set()
    gates: dict[tuple[str, int], threading.Event] = {}
    lock = threading.Lock()

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.nominal_fps = url, 50.0
        self._index, self._start = 0, 0.0

    @classmethod
    def gate(cls, kind: str, n: int) -> threading.Event:
        with cls.lock:
            return cls.gates.setdefault((kind, n), threading.Event())

    @classmethod
    def count(cls, kind: str) -> int:
        with cls.lock:
            n = getattr(Camera, kind)
            setattr(Camera, kind, n + 1)
            return n

    def open(self) -> None:
        n = self.count("opens")
        if n in self.block_opens:
            self.gate("open", n).wait(60)
        self._index, self._start = 0, time.monotonic()

    def read(self) -> SourceFrame | None:
        n = self.count("reads")
        if n in self.block_reads:
            self.gate("read", n).wait(60)
        if n in self.fail_reads:
            raise SourceError("ended", "rtsp://cam/x: end of stream")
        time.sleep(0.02)
        frame = SourceFrame(self._index, self.stream_time(), time.time(), (72, 128),
                            np.full((72, 128, 3), n % 255, np.uint8))
        self._index += 1
        return frame

    def stream_time(self) -> float:
        return time.monotonic() - self._start

    def close(self) -> None:
        pass


class FileCamera(Camera):
    """The same frames from a file: not live, 25 frames a second of stream time whenever they are read."""

    live = False

    def stream_time(self) -> float:
        return self._index / 25


@pytest.fixture
def camera(monkeypatch):
    Camera.opens = Camera.reads = 0
    Camera.block_opens, Camera.block_reads, Camera.fail_reads, Camera.gates = set(), set(), set(), {}
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Camera(url))
    yield Camera
    for gate in list(Camera.gates.values()):  # no decoder thread of this test stays blocked after it
        gate.set()


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"capture {CAMERA}:") and t.is_alive()]


def pipeline(pub: RecordingPublisher, infer=None, **camera) -> CameraPipeline:
    return CameraPipeline({"id": CAMERA, "url": "rtsp://cam/x", **camera}, infer or no_detections(), MODEL_INFO, pub)


STALLING = {"stall_timeout_s": 0.3, "open_timeout_s": 0.3, "read_timeout_s": 0.3}  # stalled 0.6 s into an open


def downs(pub: RecordingPublisher) -> list[str]:
    return [e["reason"] for e in pub.events if e["type"] == "stream_down"]


# -- 1. a decoder that makes no progress -------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_one_outage_is_said_and_counted_once_however_many_watchdog_restarts_it_takes(camera):
    """The camera's first three opens block (each returns once the watchdog has abandoned it, so the next restart
    may go ahead): three restarts, one outage. Before: three stream_down and reconnects 3. A stall after frames
    came is a new outage."""
    camera.block_opens = {0, 1, 2}
    camera.block_reads = {30}  # the 31st read blocks: the camera stalls again once it delivers
    pub = RecordingPublisher()
    pipe = pipeline(pub, **STALLING)

    async def main() -> dict:
        task = asyncio.ensure_future(pipe.run())
        try:
            for k in range(3):
                await until(lambda: pipe.watchdog_restarts > k, 30, f"watchdog restart {k + 1}")
                camera.gate("open", k).set()  # the abandoned thread returns from its open, and exits
            await until(lambda: len(pub.frames) >= 5, 30, "frames once an open went through")
            first = dict(pipe.stats())
            await until(lambda: pipe.watchdog_restarts >= 4, 30, "the watchdog on the stalled read")
            camera.gate("read", 30).set()
            await until(lambda: len(pub.frames) >= 40, 30, "frames after the second outage")
        finally:
            pipe.stop()
            final = await task
        return first, final

    first, final = asyncio.run(main())
    kinds = [t for t in pub.event_types() if t.startswith("stream_")]
    assert first["watchdog_restarts"] == 3 and first["reconnects"] == 1, first
    assert kinds[:2] == ["stream_down", "stream_up"], kinds  # the restarts in between said no more
    assert len(downs(pub)) == 2 and all("restarted by the watchdog" in d for d in downs(pub)), downs(pub)
    assert final["watchdog_restarts"] == 4 and final["reconnects"] == 2, final


@pytest.mark.timeout(90)
def test_no_second_decoder_thread_is_abandoned_while_the_first_is_still_blocked(camera):
    """Opens 0 and 1 block until released: the watchdog abandons the first, starts a second that blocks too, and
    then keeps it (saying why) instead of abandoning it and piling up a thread and an fd per stall period. Once
    the first returns, the second is restarted and the camera comes up. Before: the second was abandoned too, 0.6 s
    after it began."""
    camera.block_opens = {0, 1}
    pub = RecordingPublisher()
    pipe = pipeline(pub, **STALLING)

    async def main() -> tuple[dict, int, dict]:
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: "still blocked" in (pipe.last_error or "") or pipe.watchdog_restarts >= 2, 30,
                        "the watchdog holding the second decoder, or restarting it")
            held = dict(pipe.stats())
            threads = len(decoder_threads())
            assert held["watchdog_restarts"] == 1 and threads == 2, (held, threads)
            # a few more stall periods: it stays held (the stalled decoder silent for over 3 of them)
            await until(lambda: pipe._capture.silent_for() > 4 * STALLING["stall_timeout_s"], 30, "stall periods")
            assert pipe.watchdog_restarts == held["watchdog_restarts"]
            camera.gate("open", 0).set()  # the first abandoned thread returns: the watchdog may restart the second
            await until(lambda: len(pub.frames) >= 5, 30, "frames after the first thread returned")
            camera.gate("open", 1).set()
            await until(lambda: len(decoder_threads()) == 1, 30, "the abandoned threads to exit")
        finally:
            pipe.stop()
            final = await task
        return held, threads, final

    held, threads, final = asyncio.run(main())
    assert "not restarted while the decoder thread abandoned" in held["last_error"], held["last_error"]
    assert final["watchdog_restarts"] == 2 and camera.opens == 3, (final, camera.opens)
    assert len(downs(pub)) == 1 and final["reconnects"] == 1, (downs(pub), final)
    assert pub.event_types().count("stream_up") == 1


# -- 2. stream time across an outage -----------------------------------------------------------------------------

def recording(pub: RecordingPublisher) -> list[dict]:
    messages: list[dict] = []
    pub.publish_detections = messages.append  # type: ignore[method-assign]
    return messages


def largest_gap(messages: list[dict]) -> tuple[dict, dict]:
    """The two published frames either side of the outage: the largest gap in ts."""
    i = int(np.argmax(np.diff([m["ts"] for m in messages])))
    return messages[i], messages[i + 1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["reconnect", "watchdog"])
def test_a_live_cameras_stream_time_goes_on_by_the_wall_clock_across_an_outage(camera, monkeypatch, how):
    """The camera drops at its 40th read (the decoder reconnects after a back-off of 0.5-1 s), or hangs there (the
    watchdog restarts the decoder after 0.6 s): the first frame after the outage is as far after the last one before
    it in stream time as in wall time. Before: one frame period (0.02 s). The rate gate (fps 5) lets no burst
    through after the jump."""
    if how == "reconnect":
        camera.fail_reads = {40}
        monkeypatch.setattr(workers.capture.Capture, "BACKOFF_INITIAL_S", 1.0)
        settings = {}
    else:
        camera.block_reads = {40}
        settings = {"stall_timeout_s": 0.6, "read_timeout_s": 0.3}
    pub = RecordingPublisher()
    messages = recording(pub)
    pipe = pipeline(pub, fps=5, **settings)
    asyncio.run(until_then_stop(pipe, lambda: camera.reads > 40 and len(messages) >= 15, "frames after the outage"))
    before, after = largest_gap(messages)
    wall = after["ts"] - before["ts"]
    assert wall > 0.45, (before, after)  # an outage there was
    assert after["pts"] - before["pts"] == pytest.approx(wall, abs=0.05), (before, after)
    pts = [m["pts"] for m in messages]
    assert pts == sorted(set(pts))
    following = [p for p in pts if after["pts"] <= p < after["pts"] + 1.0]
    assert len(following) <= 7, following  # 5 fps, give or take the gate's credit: no burst of what was missed
    if how == "watchdog":
        assert pipe.watchdog_restarts == 1


async def until_then_stop(pipe: CameraPipeline, predicate, what: str) -> dict:
    task = asyncio.ensure_future(pipe.run())
    try:
        await until(predicate, 30, what)
    finally:
        pipe.stop()
        final = await task
    return final


def one_box_while(present: threading.Event):
    """Inference that finds one person in the middle of the picture while ``present`` is set, nobody after."""
    async def infer(request):
        n = 1 if present.is_set() else 0
        box = np.array([[50, 30, 100, 70]] * n, np.float32).reshape(n, 4)
        return {h: {"boxes": box, "scores": np.full(n, 0.9, np.float32), "class_ids": np.zeros(n, np.int64)}
                for h in request.heads}
    return infer


@pytest.mark.timeout(90)
def test_a_person_standing_in_a_zone_through_an_outage_dwells_for_the_whole_of_it(camera, monkeypatch):
    """The operators' car: in the zone before, during and after the camera's outage; its dwell is the wall time
    from its first frame inside to its last, outage included. Before: short by the outage."""
    camera.fail_reads = {40}
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_INITIAL_S", 1.0)
    present = threading.Event()
    present.set()
    pub = RecordingPublisher()
    messages = recording(pub)
    zone = {"name": "bay", "polygon": [[0.1, 0.1], [0.9, 0.1], [0.9, 0.95], [0.1, 0.95]], "lost_s": 0.3}
    pipe = pipeline(pub, one_box_while(present), fps=10, zones=[zone])

    def left() -> list[dict]:
        return [e for e in pub.events if e["type"] == "zone_left"]

    def gone_after_outage() -> bool:
        if camera.reads > 60 and present.is_set():
            present.clear()  # the person walks off once frames came after the outage
        return bool(left())

    asyncio.run(until_then_stop(pipe, gone_after_outage, "zone_left after the outage"))
    event = left()[0]
    def ts(pts: float) -> float:  # the event's pts to the ms, the message's to the us
        return min(messages, key=lambda m: abs(m["pts"] - pts))["ts"]

    entered, last = ts(event["entered_pts"]), ts(event["left_pts"])
    before, after = largest_gap(messages)
    assert entered < before["ts"] < after["ts"] <= last and after["ts"] - before["ts"] > 0.45, (event, before, after)
    assert event["dwell_s"] == pytest.approx(last - entered, abs=0.05), (event, entered, last)


@pytest.mark.timeout(90)
def test_normal_path_guard_a_files_stream_time_goes_on_where_it_was_across_a_watchdog_restart(camera, monkeypatch):
    """A file is not live: the watchdog's new decoder resumes it after the last frame handed over, its pts one
    frame period on (the stall's wall time is no part of the file)."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: FileCamera(url))
    camera.block_reads = {20}
    pub = RecordingPublisher()
    messages = recording(pub)
    camera_config = {"id": CAMERA, "url": "/media/cam15b.mp4", "realtime": False, "stall_timeout_s": 0.6,
                     "read_timeout_s": 0.3}
    pipe = CameraPipeline(camera_config, no_detections(), MODEL_INFO, pub)
    asyncio.run(until_then_stop(pipe, lambda: pipe.watchdog_restarts >= 1 and len(messages) >= 40,
                                "frames after the watchdog restart"))
    pts = [m["pts"] for m in messages]
    frames = [m["frame"] for m in messages]
    assert frames == list(range(len(frames)))  # none lost, none twice
    assert np.allclose(np.diff(pts), 0.04, atol=1e-3), pts


@pytest.mark.timeout(90)
def test_a_decoder_held_stalled_after_it_was_up_is_an_outage_said_and_not_running(camera):
    """The first open blocks (abandoned, left blocked); the second decoder comes up, then stalls in a read: the
    watchdog holds it (the first still blocked) and said nothing but a log line, the camera "running" and ready,
    reconnects unchanged (review). Now a stream_down, counted, state reconnecting; its next frame says stream_up."""
    camera.block_opens, camera.block_reads = {0}, {20, 40}
    pub = RecordingPublisher()
    pipe = pipeline(pub, **STALLING)

    async def main() -> tuple[dict, dict]:
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: "still blocked" in (pipe.last_error or ""), 30, "the watchdog holding the decoder")
            held = dict(pipe.stats())
            camera.gate("read", 20).set()  # the held decoder's read returns: frames again
            await until(lambda: pub.event_types().count("stream_up") == 2, 30, "frames after the stall")
            # ... and it stalls again (read 40), the first abandoned thread still blocked: said again (review)
            await until(lambda: pub.event_types().count("stream_down") == 3, 30, "the second stall said")
            again = dict(pipe.stats())
            camera.gate("read", 40).set()
            await until(lambda: pub.event_types().count("stream_up") == 3, 30, "frames after the second stall")
        finally:
            pipe.stop()
            await task
            camera.gate("open", 0).set()
        return held, again

    held, again = asyncio.run(main())
    kinds = [t for t in pub.event_types() if t.startswith("stream_")]
    assert held["state"] == "reconnecting" and held["reconnects"] == 2, held
    assert again["state"] == "reconnecting" and again["reconnects"] == 3, again
    assert kinds == ["stream_down", "stream_up"] * 3, kinds
    assert "still blocked" in downs(pub)[-1], downs(pub)
