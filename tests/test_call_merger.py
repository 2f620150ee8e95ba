"""Cameras of one process share their calls to a replica (workers/inference.py, CallMerger): the frames that
several cameras send at about the same moment travel in one call, each camera gets its own results in order,
a camera that stopped waiting or a call that failed touches no one else; the replica serves such a call
like the cameras' separate calls (InferenceService.infer_groups)."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import ray

from mot import read_stream
from workers.frames import FrameRequest
from workers.inference import CallMerger, InferenceExpired, InferenceService
from models.letterbox import Letterbox
from workers.publish import keys
from workers.stream import StreamActor

MODEL_INFO = {"input_size": [192, 320], "heads": {"people": ["person"], "vehicles": ["car", "bicycle"]}}


def request(camera: str, frame: int, heads=None, max_wait_s=None, size=(64, 96)) -> FrameRequest:
    lb = Letterbox.fit((size[0], size[1]), size)
    image = np.full((3, *size), frame % 255, np.uint8)
    return FrameRequest(camera, frame, frame / 10, 0.0, size, lb, image, heads, max_wait_s=max_wait_s)


class Remote:
    """``method.remote(...)`` as on an actor handle: a coroutine the caller awaits."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeReplica:
    """Answers each frame with its camera and first pixel, recording every call; ``fail`` makes calls raise."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, list]] = []
        self.delay, self.fail = delay, None
        self.infer_image = Remote(self._image)
        self.infer_images = Remote(self._images)
        self.infer_groups = Remote(self._groups)

    async def _answer(self, kind, what, result):
        self.calls.append((kind, what))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        return result

    async def _image(self, image, heads, camera, timeout_s, max_wait_s):
        return await self._answer("image", [camera], (camera, int(image[0, 0, 0])))

    async def _images(self, images, heads, camera, timeout_s, max_wait_s):
        return await self._answer("images", [camera], [(camera, int(i[0, 0, 0])) for i in images])

    async def _groups(self, groups):
        return await self._answer("groups", [g[2] for g in groups],
                                  [[(camera, int(i[0, 0, 0])) for i in images] for images, _, camera, _, _ in groups])


def merger_of(replica, cameras, window_s=5.0) -> CallMerger:
    merger = CallMerger(replica, window_s)
    merger.cameras.update(cameras)
    return merger


def test_frames_of_every_camera_go_in_one_call_as_soon_as_all_have_sent():
    async def main():
        replica = FakeReplica()
        merger = merger_of(replica, {"a", "b", "c"})  # a long window: only "everyone has sent" can flush
        a = merger.call([request("a", 1), request("a", 2)])
        b = merger.call([request("b", 7)])
        await asyncio.sleep(0.05)
        assert replica.calls == []  # c has not sent: the call waits for it
        c = merger.call([request("c", 9)])
        return replica, await asyncio.wait_for(asyncio.gather(a, b, c), 2), merger

    replica, (a, b, c), merger = asyncio.run(main())
    assert replica.calls == [("groups", ["a", "b", "c"])]
    assert a == [("a", 1), ("a", 2)] and b == [("b", 7)] and c == [("c", 9)]
    assert (merger.calls, merger.frames) == (1, 4)


def test_a_lone_camera_waits_the_window_at_most_and_goes_in_a_call_of_its_own():
    async def main():
        replica = FakeReplica()
        merger = merger_of(replica, {"a", "b"}, window_s=0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        one = await asyncio.wait_for(merger.call([request("a", 3)]), 2)
        waited = loop.time() - t0
        many = await asyncio.wait_for(merger.call([request("a", 4), request("a", 5)]), 2)
        return replica, one, many, waited

    replica, one, many, waited = asyncio.run(main())
    assert 0.04 <= waited < 1.0
    assert one == [("a", 3)] and many == [("a", 4), ("a", 5)]
    assert replica.calls == [("image", ["a"]), ("images", ["a"])]  # the calls of before, no list of groups


def test_a_frame_that_may_not_wait_goes_at_once_with_what_waits():
    async def main():
        replica = FakeReplica()
        merger = merger_of(replica, {"a", "b", "c"})
        a = merger.call([request("a", 1)])
        b = merger.call([request("b", 2, max_wait_s=0)])  # b is over its frame-age budget
        return replica, await asyncio.wait_for(asyncio.gather(a, b), 2)

    replica, (a, b) = asyncio.run(main())
    assert replica.calls == [("groups", ["a", "b"])]
    assert a == [("a", 1)] and b == [("b", 2)]


def test_a_camera_that_stopped_waiting_or_left_does_not_hold_up_the_others():
    async def main():
        replica = FakeReplica(delay=0.1)
        merger = merger_of(replica, {"a", "b", "c"})
        merger.cameras.discard("c")  # c stopped: a call no longer waits for it
        a = asyncio.ensure_future(asyncio.wait_for(merger.call([request("a", 1)]), 0.02))  # a gives up first
        b = merger.call([request("b", 2)])
        results = await asyncio.gather(a, b, return_exceptions=True)
        return replica, results

    replica, (a, b) = asyncio.run(main())
    assert replica.calls == [("groups", ["a", "b"])]
    assert isinstance(a, asyncio.TimeoutError) and b == [("b", 2)]


def test_a_failed_call_reaches_every_camera_in_it():
    async def main():
        replica = FakeReplica()
        replica.fail = RuntimeError("replica died")
        merger = merger_of(replica, {"a", "b"})
        return await asyncio.gather(merger.call([request("a", 1)]), merger.call([request("b", 2)]),
                                    return_exceptions=True)

    a, b = asyncio.run(main())
    assert isinstance(a, RuntimeError) and isinstance(b, RuntimeError) and "replica died" in str(a)


def test_the_replica_serves_groups_like_separate_calls(tiny_checkpoint):
    """Each group keeps its heads and camera; a frame that expires fails alone, as in infer_images."""
    async def main():
        service = InferenceService(tiny_checkpoint, device="cpu", max_batch=8, max_wait_ms=2)
        size = tuple(service.info()["input_size"])
        a = [request("a", i, ["people"], size=size).image for i in range(2)]
        b = [request("b", 9, None, size=size).image]
        grouped = await service.infer_groups([(a, ["people"], "a", None, None), (b, None, "b", None, None),
                                              (b, None, "late", -1.0, None)])
        alone = [await service.infer_images(a, ["people"], "a"), await service.infer_images(b, None, "b")]
        return grouped, alone, service.stats()

    grouped, alone, stats = asyncio.run(main())
    assert [len(g) for g in grouped] == [2, 1, 1]
    for got, want in zip(grouped[:2], alone):
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for head in g:
                for k in g[head]:
                    np.testing.assert_allclose(g[head][k], w[head][k], atol=1e-5)
    assert set(grouped[0][0]) == {"people"} and set(grouped[1][0]) == {"people", "vehicles"}
    assert isinstance(grouped[2][0], InferenceExpired)
    assert stats["calls"] == 3


class CountingInference:
    """Stands in for an InferenceActor: empty results after a short while, counting the cameras per call."""

    def __init__(self):
        self.groups: list[list[str]] = []

    def _result(self, heads):
        return {h: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                    "class_ids": np.zeros(0, np.int64)} for h in heads or MODEL_INFO["heads"]}

    async def ping(self) -> int:
        return 0

    async def infer_image(self, image, heads, camera="", timeout_s=None, max_wait_s=None):
        self.groups.append([camera])
        await asyncio.sleep(0.02)
        return self._result(heads)

    async def infer_images(self, images, heads, camera="", timeout_s=None, max_wait_s=None):
        self.groups.append([camera])
        await asyncio.sleep(0.02)
        return [self._result(heads) for _ in images]

    async def infer_groups(self, groups):
        self.groups.append([g[2] for g in groups])
        await asyncio.sleep(0.02)
        return [[self._result(heads) for _ in images] for images, heads, _, _, _ in groups]

    def merged(self) -> int:
        return sum(len(g) > 1 for g in self.groups)


@pytest.mark.timeout(120)
def test_cameras_of_one_stream_actor_share_calls_and_publish_everything(ray_local, redis_server):
    """Two unpaced cameras in one process, one replica: calls carry both cameras' frames; every frame is
    published once, in order, for each camera. With merge_window_s 0 no call carries two cameras."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cams = [{"id": f"m{i}", "url": f"synthetic://street?seed={i}&frames=40&size=320x192", "realtime": False}
            for i in range(2)]
    merged = {}
    for window in (0.05, 0.0):
        inference = ray.remote(num_cpus=0)(CountingInference).remote()
        actor = StreamActor.remote([(c, [inference]) for c in cams], MODEL_INFO, {"url": redis_server.url},
                                   merge_window_s=window)
        try:
            ray.get([actor.start.remote(c["id"]) for c in cams], timeout=60)
            finals = ray.get([actor.wait.remote(c["id"]) for c in cams], timeout=90)
            merged[window] = ray.get(inference.merged.remote(), timeout=60)
        finally:
            ray.kill(actor, no_restart=True)
            ray.kill(inference, no_restart=True)
        for c, final in zip(cams, finals):
            assert final["published"] == final["decoded"] == 40, final
            frames = [m["frame"] for m in read_stream(redis_server.client(), keys("hv").detections(c["id"]))]
            assert frames == list(range(40))
        redis_server.client().flushall()
    assert merged[0.05] > 0 and merged[0.0] == 0, merged
