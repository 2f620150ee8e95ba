"""Track lifecycle at the edges of a camera's life, a tenth look (workers/stream.py, workers/tracking.py): a change
of frame size without a URL change ends the old geometry's tracks, and a camera restarted after a crash ends the
tracks its crashed run had open. CameraPipeline without Ray (an in-memory publisher) and CameraHost on a real
Redis, with fake sources and replicas."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import supervision as sv

import workers.capture
from mot import read_stream
from test_camera_update import until
from test_capture_recovery import RecordingPublisher
from test_stream_edges import _Remote
from workers.publish import keys, validate
from workers.settings import CameraConfig, RedisConfig, TrackerConfig
from workers.sources import Source, SourceFrame
from workers.stream import CameraHost, CameraPipeline
from workers.tracking import CameraTracker

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}


def person(heads) -> dict:
    """One large person at the same place of the model input (large: its boxes before and after a change of
    size overlap, IoU 0.18)."""
    return {h: {"boxes": np.array([[20, 10, 140, 86]], np.float32), "scores": np.array([0.9], np.float32),
                "class_ids": np.zeros(1, np.int64)} for h in heads}


async def one_person(request):
    return person(request.heads)


class PersonReplica:
    """A fake InferenceActor that finds one person on every frame."""

    def __init__(self) -> None:
        async def ping() -> int:
            return 1

        async def infer_image(image, heads, *args):
            return person(heads)

        async def infer_images(images, heads, *args):
            return [person(heads) for _ in images]

        self.ping, self.infer_image, self.infer_images = _Remote(ping), _Remote(infer_image), _Remote(infer_images)


class MessagesPublisher(RecordingPublisher):
    """RecordingPublisher that also keeps the detection messages."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict] = []

    def publish_detections(self, message: dict) -> None:
        super().publish_detections(message)
        self.messages.append(message)


class Resizing(Source):
    """An unpaced file (every frame analysed) whose frames are 128x72 up to ``AT``, then 256x144 (same aspect: the
    person's box is at the same place of the model input), ``FRAMES`` in all."""

    AT, FRAMES = 20, 40

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps, self._index = url, False, 10.0, 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame | None:
        if self._index >= self.FRAMES:
            return None
        h, w = (72, 128) if self._index < self.AT else (144, 256)
        frame = SourceFrame(self._index, self._index / 10, time.time(), (h, w), np.full((h, w, 3), 80, np.uint8))
        self._index += 1
        return frame

    def close(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_a_change_of_frame_size_ends_the_old_tracks_and_tracks_afresh(monkeypatch):
    """A camera switching resolution (an RTSP stream renegotiating) on the same URL kept its tracker: the person's
    track went on across the change with its boxes in the new coordinates (ByteTrack matched them by IoU), while
    zones and lines were rebuilt for the new size. Now its track ends at the change and a new one, numbered on,
    starts on the new size, as after a new URL."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Resizing(url))
    publisher = MessagesPublisher()
    camera = CameraConfig(id="resizing", url="/clips/resizing.mp4", realtime=False, heads=["people"])
    pipe = CameraPipeline(camera, one_person, MODEL_INFO, publisher)
    final = asyncio.run(asyncio.wait_for(pipe.run(), 30))
    assert final["published"] == Resizing.FRAMES, final  # guard: every frame analysed
    ended = [e for e in publisher.events if e["type"] == "track_ended"]
    started = [e for e in publisher.events if e["type"] == "track_started"]
    assert [e["last_frame"] for e in ended] == [Resizing.AT - 1, Resizing.FRAMES - 1], publisher.events
    assert len(started) == 2 and started[1]["frame"] >= Resizing.AT and started[1]["track_id"] > started[0]["track_id"]
    sizes: dict[int, set] = {}  # each published track id's frame sizes
    for m in publisher.messages:
        for d in m["detections"]:
            if d["track_id"] is not None:
                sizes.setdefault(d["track_id"], set()).add(tuple(m["size"]))
    assert len(sizes) == 2 and all(len(s) == 1 for s in sizes.values()), sizes


@pytest.mark.timeout(60)
def test_a_camera_restarted_after_a_crash_ends_the_tracks_its_crashed_run_had_open(redis_server):
    """Ray restarts a crashed camera process and the camera continues its frame and track numbering from its status
    in Redis; but the tracks the crashed run had open never got their track_ended, and ids are never reused: a
    subscriber keeping open tracks (occupancy, a dashboard's list) kept them for ever. Now the restarted camera ends
    them (``reason: restart``) before its own tracks start."""
    camera = CameraConfig(id="crashy", url="synthetic://street?seed=1&fps=10&size=160x96", heads=["people"])
    client = redis_server.client()
    names = keys("hv")

    def tracked_ids() -> set[int]:
        return {d["track_id"] for m in read_stream(client, names.detections("crashy")) for d in m["detections"]
                if d["track_id"] is not None}

    async def main() -> set[int]:
        host = CameraHost(camera, [PersonReplica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        # A tracked frame in Redis: the status written with the frame its track started on is there too.
        await until(tracked_ids, 20, "a tracked frame of the first run")
        crashed = host.publisher  # the process dies: nothing it does from now on reaches Redis
        for method in ("publish_event", "publish_detections", "set_status", "set_hash"):
            setattr(crashed, method, lambda *args, **kwargs: None)
        await host.stop(drain=False)
        old = tracked_ids()
        again = CameraHost(camera, [PersonReplica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await again.start()
        try:
            await until(lambda: tracked_ids() - old, 20, "a tracked frame of the restarted run")
        finally:
            await again.stop()
        return old

    old = asyncio.run(main())
    events = [e for e in read_stream(client, names.events) if e["type"] in ("track_started", "track_ended")]
    for e in events:
        validate(e, "event")
    restarted = [e for e in events if e["type"] == "track_ended" and e.get("reason") == "restart"]
    assert sorted(e["track_id"] for e in restarted) == sorted(old), events
    new = [i for i, e in enumerate(events) if e["type"] == "track_started" and e["track_id"] not in old]
    assert new and max(events.index(e) for e in restarted) < new[0], events  # ended before the new tracks start
    assert all(e["frames"] >= 1 and e["last_frame"] >= e["first_frame"] for e in restarted), restarted


def test_open_tracks_go_through_the_status_and_what_does_not_parse_is_left_out():
    """The rows the status carries give back each open track's track_ended fields; a row of another version (or
    garbage) is skipped, never an error that stops the camera's start."""
    tracker = CameraTracker(["people"], TrackerConfig(), 10.0, {"people": 40})
    for f in range(5):
        det = sv.Detections(xyxy=np.array([[10.0, 10, 50, 90], [80, 10, 120, 90]]), confidence=np.array([0.9, 0.9]),
                            class_id=np.array([0, 0]), data={"class_name": np.array(["person", "person"])})
        tracker.update("people", det, 7 + f, 0.7 + f / 10)
    rows = json.loads(json.dumps(tracker.open_rows()))  # as the status holds them
    assert len(rows["people"]) == 2, rows
    ended = [{k: v for k, v in e.items() if k != "type"} for e in tracker.finish()]
    assert CameraTracker.ended_from_rows(rows) == ended and ended[0]["track_id"] >= 40, ended
    rows["people"] += [[1, "person"], [-3, "person", 1, 2, 3, 0.1], ["x", "person", 1, 2, 3, 0.1], None,
                       [5, "person", 1, 2, 3, float("inf")]]
    assert CameraTracker.ended_from_rows(rows) == ended
    assert CameraTracker.ended_from_rows({"people": "nonsense"}) == CameraTracker.ended_from_rows(None) == []


class InOrder(MessagesPublisher):
    """Events and statuses in the order the pipeline hands them over (one Redis round trip keeps that order)."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple] = []

    def publish_event(self, message: dict) -> None:
        super().publish_event(message)
        self.order.append(("event", message["type"], message.get("track_id")))

    def set_status(self, camera: str, status: dict) -> None:
        super().set_status(camera, status)
        self.order.append(("status", status.get("tracks_open")))


@pytest.mark.timeout(60)
def test_a_track_that_ends_leaves_the_open_tracks_of_the_status_with_its_frame(monkeypatch):
    """The status (its tracks_open) went out when a track started and once a second, not when one ended: a crash
    before the next status made the restart end it a second time (reason restart). It goes out with the frame
    whose tracks ended now, as with one whose tracks began."""
    class Leaving(Resizing):
        AT, FRAMES = 10_000, 60  # one size throughout

    async def present_early(request):
        return person(request.heads) if request.frame < 10 else {
            h: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "class_ids": np.zeros(0, np.int64)} for h in request.heads}

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Leaving(url))
    publisher = InOrder()
    camera = CameraConfig(id="leaving", url="/clips/leaving.mp4", realtime=False, heads=["people"])
    asyncio.run(asyncio.wait_for(CameraPipeline(camera, present_early, MODEL_INFO, publisher).run(), 30))
    ended = next(i for i, row in enumerate(publisher.order) if row[:2] == ("event", "track_ended"))
    assert publisher.order[ended + 1] == ("status", {}), publisher.order  # before anything else goes out
