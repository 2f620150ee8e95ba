"""Edges of a camera's run (workers/stream.py): a cancelled inference call, a live update of the watchdog's
timeouts, a stop while a start still waits, an update while the run finishes, skipped frames behind a stalled
call. CameraPipeline without Ray (messages into an in-memory publisher) or CameraHost on a real Redis, with
fake replicas."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

import workers.capture
from mot import read_stream
from test_camera_update import until
from test_capture_recovery import RecordingPublisher, ScriptedCamera
from workers.inference import CallMerger
from workers.motion import MotionGate
from workers.publish import keys
from workers.settings import CameraConfig, RedisConfig
from workers.sources import SourceFrame
from workers.stream import CameraHost, CameraPipeline, capture_thread_name

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}


def empty_result(heads) -> dict:
    return {h: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "class_ids": np.zeros(0, np.int64)} for h in heads}


class _Remote:
    """``actor.method.remote(...)`` of a fake replica: the coroutine function's awaitable."""

    def __init__(self, fn) -> None:
        self.remote = fn


class Replica:
    """A fake InferenceActor: ``ping`` waits for ``ready``, inference for ``answer`` (both set unless told)."""

    def __init__(self, ready: bool = True, answer: bool = True) -> None:
        self.ready, self.answer, self.pinged = asyncio.Event(), asyncio.Event(), False
        if ready:
            self.ready.set()
        if answer:
            self.answer.set()

        async def ping() -> int:
            self.pinged = True
            await self.ready.wait()
            return 1

        async def infer_image(image, heads, *args):
            await self.answer.wait()
            return empty_result(heads)

        async def infer_images(images, heads, *args):
            await self.answer.wait()
            return [empty_result(heads) for _ in images]

        self.ping, self.infer_image, self.infer_images = _Remote(ping), _Remote(infer_image), _Remote(infer_images)


def decoder_threads(camera_id: str) -> int:
    mine = capture_thread_name(camera_id, "")
    return sum(t.name.startswith(mine) for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_a_merged_call_cancelled_under_the_camera_drops_its_frames_and_the_camera_goes_on():
    """A CallMerger hands every camera of a call that ended cancelled a CancelledError (workers/inference.py,
    _deliver). The camera's result loop ended on it: nothing was published any more, the camera stayed
    'running' with fresh heartbeats, and its decoder was never stopped."""
    calls = 0

    async def first_cancelled(image, heads, *args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError()
        return empty_result(heads)

    async def many(images, heads, *args):
        return [await first_cancelled(image, heads) for image in images]

    replica = Replica()
    replica.infer_image, replica.infer_images = _Remote(first_cancelled), _Remote(many)
    pub = RecordingPublisher()
    camera = {"id": "cam", "url": "synthetic://street?seed=1&frames=12&size=160x96", "realtime": False,
              "heads": ["people"]}

    async def main() -> dict:
        merger = CallMerger(replica, 0.0)
        merger.cameras.add("cam")
        pipe = CameraPipeline(camera, None, MODEL_INFO, pub, infer_many=merger.call)
        task = asyncio.ensure_future(pipe.run())
        done, _ = await asyncio.wait([task], timeout=20)
        if not done:  # frozen: end it, so that the test reports instead of hanging
            pipe.stop(drain=False)
            task.cancel()
            await asyncio.wait([task], timeout=10)
            raise AssertionError(f"the camera froze after a cancelled call: {pipe.stats()}")
        return task.result()

    final = asyncio.run(main())
    assert final["state"] == "ended", final
    assert final["dropped"]["error"] >= 1 and final["published"] + final["dropped"]["error"] == 12, final
    assert "CancelledError" in final["last_error"]
    assert pub.frames == sorted(pub.frames) and len(pub.frames) == final["published"]


@pytest.mark.timeout(60)
def test_a_live_update_of_the_stall_timeout_applies_to_the_watchdog(monkeypatch):
    """The watchdog read stall_timeout_s once, at the camera's start: a live update of it (or of the read and
    open timeouts it defaults from) replaced the decoder but the watchdog went on with the old limit, so a
    decoder stuck under the new, shorter limit was left alone (and a longer one was cut short)."""
    release = threading.Event()

    class StuckCamera(ScriptedCamera):
        """A live camera that gives 3 frames after each open, then hangs inside read()."""

        def read(self) -> SourceFrame | None:
            if self._index >= 3:
                release.wait(30)
                return None
            return super().read()

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: StuckCamera(url))
    pub = RecordingPublisher()
    camera = CameraConfig(id="cam", url="rtsp://stuck", heads=["people"], stall_timeout_s=30)

    async def infer(request):
        return empty_result(request.heads)

    async def main() -> int:
        pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: len(pub.frames) >= 3, 20, "the first frames")
            assert pipe.update(camera.model_copy(update={"stall_timeout_s": 0.3})) == ["stall_timeout_s"]
            await until(lambda: pipe.watchdog_restarts >= 1, 10, "the watchdog under the new stall timeout")
            return pipe.watchdog_restarts
        finally:
            release.set()
            pipe.stop(drain=False)
            await asyncio.wait_for(task, 20)

    try:
        assert asyncio.run(main()) >= 1
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_a_stop_while_the_start_waits_for_its_replica_leaves_nothing_running(redis_server):
    """The controller gives up on a start that waits too long (a replica still loading its model) and stops
    the camera, then its process forgets it: the stop found no run and returned, and the start, once the
    replica answered, ran the camera anyway, unseen (decoding, inference, publishing) until the process died."""
    replica = Replica(ready=False)
    camera = CameraConfig(id="late", url="synthetic://street?seed=1&fps=20&size=160x96", heads=["people"])

    async def main() -> tuple[bool, int]:
        host = CameraHost(camera, [replica], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        starting = asyncio.ensure_future(host.start())
        await until(lambda: replica.pinged, 10, "the start to wait for its replica")
        assert await host.stop(drain=False) == {}
        replica.ready.set()
        await asyncio.wait_for(starting, 20)
        ran = host.task is not None
        if ran:  # clean up what the defect left running, after noting it
            await asyncio.sleep(0.5)
            await host.stop(drain=False)
        return ran, decoder_threads("late")

    ran, threads = asyncio.run(main())
    assert not ran, "the camera ran after it was stopped"
    assert threads == 0
    assert read_stream(redis_server.client(), keys("hv").detections("late")) == []


@pytest.mark.timeout(60)
def test_an_update_while_the_run_of_an_ended_file_finishes_restarts_it(redis_server):
    """A file that has just ended (its last frames still in inference) is updated with a new URL: the update
    went to the finishing run, whose new decoder found the slot closed and stopped at once. The answer said
    'not restarted', the camera ended 'stopped' and the new file was never played."""
    replica = Replica(answer=False)  # the last frames stay in inference until the test lets them go
    camera = CameraConfig(id="file", url="synthetic://street?seed=1&frames=2&size=160x96", realtime=False,
                          heads=["people"], max_inflight=1)
    second = camera.model_copy(update={"url": "synthetic://street?seed=2&frames=4&size=160x96"})

    async def main() -> tuple[dict, dict]:
        host = CameraHost(camera, [replica], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        try:
            await until(lambda: host.pipeline._capture is not None and host.pipeline._capture.state == "ended",
                        20, "the file to end")
            updating = asyncio.ensure_future(host.update(second))
            await asyncio.sleep(0.3)  # the update meets the run while it finishes
            replica.answer.set()
            result = await asyncio.wait_for(updating, 20)
            final = await asyncio.wait_for(host.wait(), 20)
            return result, final
        finally:
            replica.answer.set()
            await host.stop()

    result, final = asyncio.run(main())
    assert result == {"changed": ["url"], "restarted": True}, result
    assert final["state"] == "ended" and final["published"] == 4, final


@pytest.mark.timeout(60)
def test_frames_the_motion_gate_skips_behind_a_stalled_call_do_not_keep_their_images(monkeypatch):
    """Skipped frames wait behind the frames in flight to keep frame order. Each waited with its model input,
    which nothing reads any more: a stalled call (a replica restarting) held every image the camera decoded
    meanwhile, hundreds of MB per camera at 25 fps."""
    class StillCamera(ScriptedCamera):
        """A live camera showing the same picture: nothing moves, the gate skips every frame after the first."""

        def read(self) -> SourceFrame | None:
            time.sleep(0.005)
            self._index += 1
            return SourceFrame(self._index - 1, self._index / 25, time.time(), (72, 128),
                               np.full((72, 128, 3), 100, np.uint8))

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: StillCamera(url))
    skipped_images: list[weakref.ref] = []
    wants = MotionGate.wants

    def recording_wants(self, image, pts):
        wanted = wants(self, image, pts)
        if not wanted:
            skipped_images.append(weakref.ref(image))
        return wanted

    monkeypatch.setattr(MotionGate, "wants", recording_wants)
    release = asyncio.Event()

    async def stalled(request):
        await release.wait()
        return empty_result(request.heads)

    camera = {"id": "still", "url": "rtsp://still", "heads": ["people"], "motion": {"enabled": True}}

    async def main() -> int:
        pipe = CameraPipeline(camera, stalled, MODEL_INFO, RecordingPublisher())
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: pipe.skipped >= 40, 20, "frames skipped behind the stalled call")
            gc.collect()
            return sum(ref() is not None for ref in skipped_images)
        finally:
            release.set()
            pipe.stop(drain=False)
            await asyncio.wait_for(task, 20)

    alive = asyncio.run(main())
    assert alive <= 2, f"{alive} images of skipped frames still held"  # the decoder may hold its last one


@pytest.mark.parametrize("ids", ['{"people": null}', '{"people": Infinity}'])
def test_a_status_entry_holding_what_no_version_writes_does_not_keep_the_camera_from_starting(redis_server, ids):
    """Readers show such an entry as unreadable (pipeline/status.py); the camera's own start read it too and
    raised (int(None): TypeError, int(inf): OverflowError) instead of numbering from the clock as when Redis
    cannot be read: the camera, and every restart of it, failed to start."""
    redis_server.client().hset("hv:cameras", "odd", '{"state": "stopped", "track_ids_next": %s}' % ids)
    camera = CameraConfig(id="odd", url="synthetic://street", heads=["people"])
    host = CameraHost(camera, [], MODEL_INFO, RedisConfig(url=redis_server.url))
    before = int(time.time() * 1000)
    ids_next, resume = host._previous_state(attempts=1)
    assert set(ids_next) == {"people"} and ids_next["people"] >= before, ids_next
    assert resume.first_index == 0


def test_a_status_that_fails_to_publish_once_does_not_end_the_heartbeat(monkeypatch):
    """One exception from publish_status() (a bug in stats()) ended the status loop for good: the camera ran on
    and read as stale in `hydravision status` and the dashboard."""
    calls: list[int] = []

    class Pipeline:
        def publish_status(self) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("a bug in stats()")
            if len(calls) == 3:
                raise asyncio.CancelledError  # how the loop really ends: its task cancelled

    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda seconds: real_sleep(0))
    host = SimpleNamespace(pipeline=Pipeline(), camera=SimpleNamespace(id="cam"))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(CameraHost._status_loop(host))
    assert len(calls) == 3


@pytest.mark.timeout(60)
def test_the_next_track_ids_are_persisted_once_a_frame_before_its_message():
    """Each track that began wrote (and JSON-encoded) the camera's whole status, once per track: a crowded frame
    paid it as many times as tracks began. Once a frame does the same job: before the frame's message."""
    boxes = np.array([[10, 10, 30, 60], [60, 10, 80, 60], [110, 10, 130, 60]], np.float32)

    async def three(request):
        return {h: {"boxes": boxes.copy(), "scores": np.full(3, 0.9, np.float32),
                    "class_ids": np.zeros(3, np.int64)} for h in request.heads}

    order: list[str] = []

    class Recording(RecordingPublisher):
        def publish_detections(self, message: dict) -> None:
            order.append("message")
            super().publish_detections(message)

        def set_status(self, camera: str, status: dict) -> None:
            order.append("status")
            super().set_status(camera, status)

    pub = Recording()
    camera = {"id": "cam", "url": "synthetic://street?seed=1&frames=8&size=160x96", "realtime": False,
              "heads": ["people"]}

    async def main() -> None:
        pipe = CameraPipeline(camera, three, MODEL_INFO, pub)
        await asyncio.wait_for(pipe.run(), 30)

    asyncio.run(main())
    assert pub.event_types().count("track_started") == 3
    # the three tracks began on the second frame: one status for them, just before that frame's message
    between = " ".join(order).split("message")[1]
    assert between.split() == ["status"], " ".join(order)


@pytest.mark.timeout(60)
def test_the_tracker_is_retimed_once_the_rate_of_a_source_that_says_none_is_measured(monkeypatch):
    """No rate from the source (an RTSP camera whose stream has no timing) and none configured: the tracker was
    built for 25 fps and never told otherwise without a frame-age budget, so at 5 fps a lost track lived 5 times
    too long. Here an 8 fps paced scene that says no rate: the tracker ends near 8, not at 25."""
    import workers.synthetic_source as synthetic_source

    source = synthetic_source.SyntheticSource
    real_init, real_read = source.__init__, source.read

    def says_no_rate(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.rate, self.nominal_fps = self.nominal_fps, None

    def read(self):  # its own pts still need the rate
        self.nominal_fps = self.rate
        try:
            return real_read(self)
        finally:
            self.nominal_fps = None

    monkeypatch.setattr(source, "__init__", says_no_rate)
    monkeypatch.setattr(source, "read", read)

    async def nothing(request):
        return empty_result(request.heads)

    camera = {"id": "cam", "url": "synthetic://street?seed=1&frames=30&size=160x96&fps=8", "heads": ["people"]}

    async def main() -> CameraPipeline:
        pipe = CameraPipeline(camera, nothing, MODEL_INFO, RecordingPublisher())
        await asyncio.wait_for(pipe.run(), 30)
        return pipe

    pipe = asyncio.run(main())
    assert pipe.tracker is not None and 4 <= pipe.tracker.frame_rate <= 16, pipe.tracker.frame_rate
