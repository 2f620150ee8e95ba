"""Camera heartbeats against clock skew: readers (`hydravision status`, the dashboard, `tail`'s note) judge a
status stale by the Redis server's clock, so the camera must write its heartbeat on that clock too, not on
its own host's (workers/stream.py RedisClock). CameraHost on a real Redis with a fake replica."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from pipeline.status import STALE_AFTER_S, mark_stale, read_camera_statuses, redis_now
from test_camera_update import until
from test_stream_edges import MODEL_INFO, Replica
from workers.settings import CameraConfig, RedisConfig
from workers.stream import CameraHost


def asking() -> bool:
    return any(t.name == "hv-redis-clock" for t in threading.enumerate())


def _status(client) -> dict | None:
    return next((s for s in read_camera_statuses(client, "hv") if s["camera"] == "skewed"), None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("skew_s", [-30.0, 30.0])
def test_a_camera_hosts_clock_off_by_30_s_neither_shows_it_stale_nor_hides_its_death(redis_server, monkeypatch,
                                                                                      skew_s):
    """The heartbeat was the camera host's time.time(): 30 s behind, its live camera read stale for ever; 30 s
    ahead, its entry read live for 30 s more after the process died."""
    client = redis_server.client()
    camera = CameraConfig(id="skewed", url="synthetic://street?seed=1&fps=10&size=160x96", heads=["people"])
    real_time = time.time
    beats: set[float] = set()

    def settled() -> bool:
        """A heartbeat on Redis's clock, or four heartbeats written (the clock had its time to answer)."""
        s = _status(client)
        if s is None or s.get("reported_state", s["state"]) != "running":
            return False
        beats.add(s["heartbeat_ts"])
        return abs(s["heartbeat_ts"] - redis_now(client)) < 8 or len(beats) >= 4

    async def main() -> tuple[dict, dict]:
        monkeypatch.setattr(time, "time", lambda: real_time() + skew_s)  # the whole camera host's clock
        host = CameraHost(camera, [Replica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        try:
            await until(settled, 30, "the camera's heartbeats")
            raw = client.hget("hv:cameras", "skewed")
            return _status(client), raw
        finally:
            await host.stop(drain=False)

    live, raw = asyncio.run(main())
    entry = json.loads(raw)
    assert live["state"] == "running" and not live["stale"], live
    # Its process dies now: as long after as the readers wait, by Redis's clock, the entry reads stale.
    dead = mark_stale(entry, redis_now(client) + STALE_AFTER_S + 1)
    assert dead["stale"] and dead["state"] == "stale", dead
    assert abs(entry["heartbeat_ts"] - redis_now(client)) < 8, (entry["heartbeat_ts"], redis_now(client))


@pytest.mark.timeout(30)
def test_a_redis_that_refuses_time_leaves_the_heartbeat_on_the_hosts_clock(redis_server):
    """An ACL that refuses TIME (as pipeline/status.py's readers allow for): the camera writes its status as
    before, on its own clock, instead of failing."""
    from workers.stream import RedisClock

    redis_server.client().acl_setuser("camera", enabled=True, passwords=["+pw"], keys=["*"],
                                      commands=["+@all", "-time"])
    url = redis_server.url.replace("redis://", "redis://camera:pw@")
    clock = RedisClock(url)
    deadline = time.monotonic() + 20
    while asking() and time.monotonic() < deadline:  # its one question, answered with a refusal
        time.sleep(0.02)
    assert not asking() and clock.offset is None
    assert abs(clock.now() - time.time()) < 1
