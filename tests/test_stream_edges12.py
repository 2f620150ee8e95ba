"""Edges of one camera's run (workers/stream.py): the counts' ``since`` when zones come back after a spell
without them; the tracker's rate after a live update, for a source that says none; the stop of a camera whose
start failed. CameraPipeline without Ray (its analytics driven frame by
frame into an in-memory publisher), and CameraHost on a real Redis with a fake replica."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

import workers.capture
from test_camera_update import until
from test_capture_recovery import RecordingPublisher, no_detections
from test_stream_edges import Replica, _Remote
from workers.publish import WriterThread
from workers.settings import CameraConfig, RedisConfig
from workers.sources import Source, SourceFrame
from workers.stream import CameraHost, CameraPipeline

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}
ZONE = {"name": "middle", "polygon": [[0.3, 0.45], [0.7, 0.45], [0.7, 0.95], [0.3, 0.95]]}


class Hashes(RecordingPublisher):
    """Also keeps the hashes set (an empty one deletes the key, as in Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.hashes: dict[str, dict] = {}

    def set_hash(self, key: str, fields: dict) -> None:
        if fields:
            self.hashes[key] = fields
        else:
            self.hashes.pop(key, None)


def changed(pipe: CameraPipeline, **fields) -> CameraConfig:
    """The camera's config with ``fields`` changed, validated as a live update's."""
    return CameraConfig.model_validate({**pipe.camera.model_dump(), **fields})


def analysed(pipe: CameraPipeline, index: int) -> None:
    """The analytics' part of publishing frame ``index`` (160x96)."""
    item = SimpleNamespace(index=index, pts=index / 10, wall=time.time(), size=(96, 160), picture=None)
    pipe._after_analytics(item, pipe._current_analytics(item))


def test_counts_of_zones_that_come_back_after_none_say_they_count_from_then():
    """A camera whose zones were removed live and later set again counts from 0 again, but its counts hash kept
    the ``since`` of the camera's start: a consumer read the zone's few entries as counted over the whole day."""
    pub = Hashes()
    counts_key = pub.keys.counts("cam")
    pipe = CameraPipeline({"id": "cam", "url": "synthetic://street", "zones": [ZONE]}, None, MODEL_INFO, pub)
    analysed(pipe, 0)
    first = float(pub.hashes[counts_key]["since"])

    pipe.update(changed(pipe, zones=[]))
    analysed(pipe, 1)
    assert counts_key not in pub.hashes  # no zones: deleted

    time.sleep(0.01)
    back = time.time()
    pipe.update(changed(pipe, zones=[ZONE]))
    analysed(pipe, 2)
    since = float(pub.hashes[counts_key]["since"])
    assert since >= round(back, 3) - 0.001 > first, (first, since, back)


def test_zones_first_set_on_a_camera_that_ran_without_them_count_from_then():
    """The same for zones first set live on a camera that started without any."""
    pub = Hashes()
    pipe = CameraPipeline({"id": "cam", "url": "synthetic://street"}, None, MODEL_INFO, pub)
    analysed(pipe, 0)
    time.sleep(0.01)
    back = time.time()
    pipe.update(changed(pipe, zones=[ZONE]))
    analysed(pipe, 1)
    assert float(pub.hashes[pub.keys.counts("cam")]["since"]) >= round(back, 3) - 0.001



@pytest.mark.timeout(60)
def test_the_stop_of_a_camera_whose_start_failed_lets_its_publisher_go(redis_server):
    """A camera added to a running process whose start fails (its replica refused to start, or is not there) is
    stopped and forgotten by the controller (App._undo). The stop found no run and returned: the Publisher the start
    had made stayed attached to the writer the process's cameras share, one more for every add that failed."""
    async def refused() -> int:
        raise RuntimeError("inference replica could not start: no such checkpoint")

    replica = Replica()
    replica.ping = _Remote(refused)
    writer = WriterThread(redis_server.url, name="cameras")
    camera = CameraConfig(id="cam", url="synthetic://street?seed=1&fps=20&size=160x96", heads=["people"])

    async def main() -> int:
        host = CameraHost(camera, [replica], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1",
                          writer=lambda: writer)
        with pytest.raises(RuntimeError, match="could not start"):
            await host.start()
        assert await host.stop(drain=False) == {}
        return len(writer._publishers)

    try:
        assert asyncio.run(main()) == 0, "the failed camera's Publisher is still attached to the process's writer"
    finally:
        writer.close()


class Unrated(Source):
    """A live camera at about 10 frames/s that says no rate (an MJPEG camera over http): the camera measures it."""

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, None
        self._index = 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame:
        time.sleep(0.1)
        frame = SourceFrame(self._index, self._index / 10, time.time(), (72, 128), np.full((72, 128, 3), 90, np.uint8))
        self._index += 1
        return frame

    def close(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_a_live_update_leaves_the_tracker_at_the_measured_rate_of_a_source_that_says_none(monkeypatch):
    """A live change of fps or max_frame_age_ms starts the frame-age budget afresh, which also forgot the rate
    measured of a source that says none, and retimed the tracker to the 25 fps fallback for good: nothing told it
    the rate once measured again, and a lost track of this 10 fps camera lived 2.5 times too long from then on."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Unrated(url))
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/x"}, no_detections(), MODEL_INFO, RecordingPublisher())

    async def main() -> float:
        task = asyncio.ensure_future(pipe.run())
        try:
            await until(lambda: pipe.tracker is not None and pipe.tracker.frame_rate < 16, 30, "the rate measured")
            pipe.update(changed(pipe, max_frame_age_ms=60_000))
            decoded = pipe.stats()["decoded"]
            await until(lambda: pipe.stats()["decoded"] >= decoded + 25, 30, "frames after the update")
            return pipe.tracker.frame_rate
        finally:
            pipe.stop()
            await task

    rate = asyncio.run(main())
    assert rate < 16, f"the tracker counts frames at {rate} fps; the camera delivers about 10"
