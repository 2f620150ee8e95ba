"""A camera whose process Ray re-created while Redis could not be read waits for Redis before it numbers a frame:
numbered from 0, it published its run's frames a second time (Redis paused while a camera process crashed: frames
0..246, then 0..147 again)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from workers.publish import keys
from workers.settings import CameraConfig, RedisConfig
from workers.stream import CameraHost

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"]}}
K = keys("hv")


def _redis_back_with_the_runs_state(redis_server, after_s: float) -> threading.Thread:
    """Redis starts again ``after_s`` from now (empty: no persistence), and the run's state is written to it, as the
    buffers of the cameras that kept running write it once it is back."""
    def back():
        time.sleep(after_s)
        redis_server.start()
        client = redis_server.client()
        client.hset(K.cameras, "cam", json.dumps({"state": "running", "instance": "run-1", "stream_mark": "0-0",
                                                  "track_ids_next": {"people": 40}}))
        client.xadd(K.detections("cam"), {"data": json.dumps({"frame": 246, "pts": 9.84})})
    t = threading.Thread(target=back, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(60)
def test_a_camera_restarted_by_ray_waits_for_redis_to_number_on(redis_server) -> None:
    redis_server.kill()
    host = CameraHost(CameraConfig(id="cam", url="synthetic://street", heads=["people"]), [], MODEL_INFO,
                      RedisConfig(url=redis_server.url), instance="run-1")
    host.restarted = True  # as StreamActor.start(..., restart=True), the controller's restart after a crash
    # back between two attempts (at 3.0 and 5.0 s): one at the moment Redis listens would find it still empty
    back = _redis_back_with_the_runs_state(redis_server, after_s=4.0)
    ids, resume = host._previous_state(attempts=3)  # 1.5 s of attempts: it gave up and numbered from 0 before
    back.join(10)
    assert resume.first_index == 247 and resume.first_pts == pytest.approx(9.84)
    assert ids == {"people": 40}


@pytest.mark.timeout(60)
def test_a_first_start_without_redis_still_numbers_from_the_clock(redis_server) -> None:
    """The normal path kept: a camera starting for the first time does not wait (its ids from the clock)."""
    redis_server.kill()
    host = CameraHost(CameraConfig(id="cam", url="synthetic://street", heads=["people"]), [], MODEL_INFO,
                      RedisConfig(url=redis_server.url), instance="run-1")
    before = int(time.time() * 1000)
    ids, resume = host._previous_state(attempts=1)
    assert resume.first_index == 0 and ids["people"] >= before
    redis_server.start()


@pytest.mark.timeout(60)
def test_a_restarted_camera_stopped_while_it_waits_for_redis_gives_up(redis_server) -> None:
    redis_server.kill()
    host = CameraHost(CameraConfig(id="cam", url="synthetic://street", heads=["people"]), [], MODEL_INFO,
                      RedisConfig(url=redis_server.url), instance="run-1")
    host.restarted = True
    threading.Timer(4.0, lambda: setattr(host, "_stop_asked", True)).start()  # as stop() sets it
    t0 = time.monotonic()
    host._previous_state(attempts=3)
    assert time.monotonic() - t0 < 20
    redis_server.start()


@pytest.mark.timeout(60)
def test_only_the_restart_after_a_crash_waits(redis_server) -> None:
    """A start that is not the controller's restart (an add, an update's new source: its process numbers on by
    itself) gives up on an unreachable Redis after its attempts, as before."""
    from types import SimpleNamespace

    redis_server.kill()
    host = CameraHost(CameraConfig(id="cam", url="synthetic://street", heads=["people"]), [], MODEL_INFO,
                      RedisConfig(url=redis_server.url), instance="run-1")
    host.pipeline = SimpleNamespace(tracker=None, track_id_base={"people": 7})  # an update's restart
    host.restarted = True
    t0 = time.monotonic()
    host._previous_state(attempts=3)
    assert time.monotonic() - t0 < 10
    redis_server.start()
