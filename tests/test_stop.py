"""Stopping a camera without draining: what was decoded and not yet published is abandoned, counted as
dropped.shutdown, and the counters still add up (docs/architecture.md, "Counting frames"); with draining,
everything decoded before the stop is published."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import numpy as np
import pytest
import ray

from mot import read_stream
from running import wait_for
from workers.publish import Publisher, keys
from workers.settings import CameraConfig, RedisConfig
from workers.stream import CameraHost, CameraPipeline, StreamActor, capture_thread_name

MODEL_INFO = {"input_size": [192, 320], "heads": {"people": ["person"], "vehicles": ["car", "bicycle"]}}
INFER_S = 0.3  # a slow model: a 20 fps camera has frames waiting in every place when it is stopped
CAMERA = {"id": "cam", "url": "synthetic://street?seed=1&fps=20&size=320x192", "max_inflight": 2}


def empty_result(heads) -> dict:
    return {h: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "class_ids": np.zeros(0, np.int64)} for h in heads}


async def slow_infer(request):
    await asyncio.sleep(INFER_S)
    return empty_result(request.heads)


def assert_adds_up(s: dict) -> None:
    assert s["decoded"] == s["published"] + sum(s["dropped"].values()) + s["in_slot"] + s["in_flight"], s


def busy(s: dict) -> bool:
    """Frames in inference up to the camera's limit, and one more waiting for a free place."""
    return s["published"] >= 3 and s["in_flight"] == CAMERA["max_inflight"] and s["in_slot"] >= 1


async def stop_when_busy(pipe: CameraPipeline, drain: bool, waiting: int = 1) -> tuple[dict, dict, float]:
    """Runs the camera until it is busy (and ``waiting`` frames wait for inference: the one the camera holds,
    then those in the slot), stops it; the stats at the stop, the final ones, seconds the stop took."""
    task = asyncio.create_task(pipe.run())
    deadline = time.monotonic() + 30
    while not (busy(pipe.stats()) and pipe.stats()["in_slot"] >= waiting):
        assert time.monotonic() < deadline and not task.done(), f"never busy: {pipe.stats()}"
        await asyncio.sleep(0.02)
    at_stop = pipe.stats()
    pipe.stop(drain=drain)  # no await between the snapshot and the stop: nothing moves in between
    t0 = time.monotonic()
    final = await asyncio.wait_for(task, 30)
    return at_stop, final, time.monotonic() - t0


@pytest.mark.timeout(60)
def test_stop_without_drain_publishes_nothing_more_and_counts_what_it_abandoned(redis_server) -> None:
    async def main():
        with Publisher(redis_server.url) as pub:
            result = await stop_when_busy(CameraPipeline(CAMERA, slow_infer, MODEL_INFO, pub), drain=False)
            assert pub.flush(5)
            return result

    at_stop, final, took = asyncio.run(main())
    print(f"at the stop: {at_stop['in_flight']} in flight, {at_stop['in_slot']} in the slot; "
          f"final dropped {final['dropped']}; the stop took {took:.2f} s")
    assert_adds_up(at_stop)
    assert_adds_up(final)
    assert final["state"] == "stopped"
    assert final["in_flight"] == 0 and final["in_slot"] == 0
    assert final["published"] == at_stop["published"]  # nothing published after the stop
    assert final["dropped"]["shutdown"] >= at_stop["in_flight"] + 1  # the frames in inference, the one held
    assert final["dropped"]["error"] == 0
    assert took < 5 * INFER_S + 2  # it waits for no more than the inference already running
    messages = read_stream(redis_server.client(), keys("hv").detections("cam"))
    assert len(messages) == final["published"]


@pytest.mark.timeout(60)
def test_stop_with_drain_publishes_the_frames_decoded_before_it(redis_server) -> None:
    async def main():
        with Publisher(redis_server.url) as pub:
            return await stop_when_busy(CameraPipeline(CAMERA, slow_infer, MODEL_INFO, pub), drain=True, waiting=2)

    at_stop, final, _ = asyncio.run(main())
    assert_adds_up(final)
    assert final["in_flight"] == 0 and final["in_slot"] == 0
    # the frames in inference and those waiting in the slot are all published; only frames the decoder
    # finished after the stop are abandoned
    assert final["submitted"] == final["published"] + final["dropped"]["error"]
    assert final["published"] >= at_stop["published"] + at_stop["in_flight"] + at_stop["in_slot"], (at_stop, final)
    assert final["dropped"]["shutdown"] <= final["decoded"] - at_stop["decoded"], (at_stop, final)


@pytest.mark.timeout(60)
def test_frames_left_in_the_slot_by_a_stop_without_drain_count_as_shutdown(redis_server) -> None:
    async def main():
        with Publisher(redis_server.url) as pub:
            return await stop_when_busy(CameraPipeline(CAMERA, slow_infer, MODEL_INFO, pub), drain=False)

    at_stop, final, _ = asyncio.run(main())
    # overload means "replaced by a newer frame": once stopped, no frame is replaced any more
    assert final["dropped"]["overload"] == at_stop["dropped"]["overload"], (at_stop, final)
    after = final["decoded"] - at_stop["decoded"]
    assert final["dropped"]["shutdown"] == at_stop["in_flight"] + at_stop["in_slot"] + after, (at_stop, final)


class SlowInference:
    """Stands in for the InferenceActor: what a StreamActor calls, answering slowly with no detections."""

    async def infer_image(self, image, heads, camera="", timeout_s=None, max_wait_s=None):
        await asyncio.sleep(INFER_S)
        return empty_result(heads or list(MODEL_INFO["heads"]))

    async def infer_images(self, images, heads, camera="", timeout_s=None, max_wait_s=None):
        return await asyncio.gather(*(self.infer_image(image, heads) for image in images))


@pytest.mark.timeout(120)
def test_stream_actor_stop_without_drain(ray_local, redis_server) -> None:
    # Ray's workers cannot import this test module (tests/ is not a package on their path): send it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inference = ray.remote(num_cpus=0)(SlowInference).remote()
    actor = StreamActor.remote([(CAMERA, [inference])], MODEL_INFO, {"url": redis_server.url})
    cid = CAMERA["id"]
    try:
        ray.get(actor.start.remote(cid), timeout=60)
        wait_for(lambda: busy(ray.get(actor.stats.remote(cid), timeout=10)), 30, "the camera to be busy")
        final = ray.get(actor.stop.remote(cid, drain=False), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)
        ray.kill(inference, no_restart=True)
    assert_adds_up(final)
    assert final["state"] == "stopped" and final["in_flight"] == 0 and final["in_slot"] == 0
    assert final["dropped"]["shutdown"] >= CAMERA["max_inflight"]
    assert final["publisher"]["dropped"] == 0
    # the stop flushed the publisher: everything counted as published is in Redis
    messages = read_stream(redis_server.client(), keys("hv").detections("cam"))
    assert len(messages) == final["published"] >= 3


class _Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


@pytest.mark.timeout(60)
def test_a_start_retried_while_the_first_still_waits_runs_the_camera_once(redis_server) -> None:
    """The controller starts a camera again when its first start outlived the call's timeout (a replica still
    loading its model says nothing until it is ready): both starts got past the wait and ran the camera twice,
    every frame published twice, one pipeline never stopped."""
    class LoadingReplica:
        def __init__(self) -> None:
            self.ready = asyncio.Event()

            async def ping() -> int:
                await self.ready.wait()
                return 1

            async def infer_image(image, heads, *args):
                return empty_result(heads)

            self.ping, self.infer_image = _Remote(ping), _Remote(infer_image)

    async def main() -> tuple[int, dict]:
        replica = LoadingReplica()
        camera = CameraConfig(id="twice", url="synthetic://street?seed=1&fps=20&size=160x96", heads=["people"])
        host = CameraHost(camera, [replica], {"input_size": [96, 160], "heads": {"people": ["person"]}},
                          RedisConfig(url=redis_server.url), instance="run-1")
        first = asyncio.ensure_future(host.start())
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(host.start())  # the retry
        await asyncio.sleep(0.2)
        replica.ready.set()
        await asyncio.gather(first, second)
        await asyncio.sleep(1.0)
        mine = capture_thread_name("twice", "")
        threads = sum(t.name.startswith(mine) for t in threading.enumerate())
        return threads, await host.stop()

    threads, stats = asyncio.run(main())
    frames = [m["frame"] for m in read_stream(redis_server.client(), keys("hv").detections("twice"))]
    assert threads == 1 and stats["decoder_threads"] == 0
    assert frames and len(frames) == len(set(frames)), frames


@pytest.mark.timeout(60)
def test_a_stop_that_outlasts_its_drain_drops_what_is_left_and_never_says_running(redis_server) -> None:
    """Inference that does not answer (a replica restarting, busy) held a drained stop past its timeout: the
    final stats and the final status in Redis said 'running', and the process was killed next."""
    class NeverAnswers:
        def __init__(self) -> None:
            async def ping() -> int:
                return 1

            def hang(*args, **kwargs) -> asyncio.Future:
                return asyncio.get_running_loop().create_future()

            self.ping, self.infer_image, self.infer_images = _Remote(ping), _Remote(hang), _Remote(hang)

    async def main() -> tuple[dict, float]:
        camera = CameraConfig(id="held", url="synthetic://street?seed=1&fps=10&size=160x96", heads=["people"])
        host = CameraHost(camera, [NeverAnswers()], {"input_size": [96, 160], "heads": {"people": ["person"]}},
                          RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        await asyncio.sleep(1.0)
        started = time.monotonic()
        final = await host.stop(drain=True, timeout=1.0)
        return final, time.monotonic() - started

    final, took = asyncio.run(main())
    status = json.loads(redis_server.client().hget("hv:cameras", "held"))
    assert final["state"] == status["state"] == "stopped" and final["in_flight"] == 0, final
    assert final["dropped"]["shutdown"] >= 1 and took < 4.0, (final["dropped"], took)
    assert_adds_up(final)


def test_without_redis_at_start_every_head_numbers_above_ids_a_previous_run_used() -> None:
    """When the last status cannot be read, ids start from the clock so none is reused: only for the heads the
    camera ran then, so a head added later by a live update numbered from 0 again."""
    camera = CameraConfig(id="cam", url="synthetic://street", heads=["people"])
    host = CameraHost(camera, [], MODEL_INFO, RedisConfig(url="redis://127.0.0.1:1/0"))
    before = int(time.time() * 1000)
    ids, _ = host._previous_state(attempts=1)
    assert set(ids) == {"people", "vehicles"} and min(ids.values()) >= before, ids
