"""Two services on one Redis with one prefix and the same cameras: the second started, and both wrote the same
keys (one camera's frames of two runs interleaved in its stream, its status switching between them every second,
track ids colliding). The second is refused now, unless the first was killed a moment ago (its fresh heartbeats
no longer move). Against a real redis-server; no Ray."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import redis

from pipeline.app import App
from pipeline.config import parse_config
from pipeline.errors import UserError

CAMERAS = [{"id": "street-1", "url": "synthetic://street"}, {"id": "street-2", "url": "synthetic://street"}]


def status(state: str = "running", instance: str = "other0000001") -> dict:
    return {"state": state, "heartbeat_ts": round(time.time(), 3), "instance": instance}


def test_a_second_service_on_the_cameras_another_runs_is_refused_naming_them(redis_server, monkeypatch):
    monkeypatch.setattr("pipeline.app.TWIN_SETTLE_S", 0.5)  # the start's own watch, shorter
    client = redis_server.client()
    stop = threading.Event()

    def other_service() -> None:  # refreshes its cameras' status, as a running one does (every second; here 0.2 s,
        # so that a loaded machine's stall of a second or two cannot pass for a run that stopped beating)
        while not stop.is_set():
            with contextlib.suppress(redis.RedisError):  # a slow reply under load: the next beat goes on
                client.hset("hv:cameras", mapping={"street-1": json.dumps(status()), "street-9": json.dumps(status())})
            stop.wait(0.2)

    beating = threading.Thread(target=other_service, daemon=True)
    beating.start()
    deadline = time.monotonic() + 30
    while client.hget("hv:cameras", "street-1") is None and time.monotonic() < deadline:  # its first beat is in: a
        time.sleep(0.05)  # check before it read no camera to watch, so no twin (failed once on a loaded machine)
    try:
        app = App(parse_config({"cameras": CAMERAS}), redis_url=redis_server.url, say=lambda text: None)
        with pytest.raises(UserError, match=r"redis.prefix 'hv': camera\(s\) street-1 run in another"):
            app.resolve_redis()  # where the start looks, before it starts anything of its own but the reaper
        other = App(parse_config({"cameras": CAMERAS, "redis": {"prefix": "hv2"}}), say=lambda text: None)
        other.refuse_a_twin(redis_server.url, watch_s=1.5)  # another prefix: other keys, no twin
    finally:
        stop.set()
        beating.join(5)


def test_a_service_killed_a_moment_ago_does_not_refuse_its_restart(redis_server):
    """kill -9: its entries keep their last, fresh heartbeat for STALE_AFTER_S; they do not move any more."""
    client = redis_server.client()
    client.hset("hv:cameras", mapping={"street-1": json.dumps(status()), "street-2": json.dumps(status("stopped"))})
    app = App(parse_config({"cameras": CAMERAS}), say=lambda text: None)
    t0 = time.monotonic()
    app.refuse_a_twin(redis_server.url, watch_s=1.0)
    assert time.monotonic() - t0 >= 1.0  # it watched the fresh one


def test_nothing_to_watch_costs_no_wait(redis_server):
    client = redis_server.client()
    client.hset("hv:cameras", mapping={"street-1": json.dumps(status("stopped")), "street-9": json.dumps(status())})
    app = App(parse_config({"cameras": CAMERAS}), say=lambda text: None)
    t0 = time.monotonic()
    app.refuse_a_twin(redis_server.url, watch_s=5.0)
    assert time.monotonic() - t0 < 2.0


def test_a_run_killed_a_moment_ago_whose_processes_beat_on_a_while_does_not_refuse_its_restart(redis_server):
    """kill -9 of the controller: its camera processes beat on for ~2 s until its reaper ends them, and a restart
    right after the kill (a supervisor's) was refused as "run in another hydravision service"."""
    client = redis_server.client()
    gone = threading.Event()  # the killed run's processes ended: set once the start said it waits for that

    def dying_run() -> None:  # beats every 0.3 s until its processes are gone
        while not gone.is_set():
            client.hset("hv:cameras", mapping={"street-1": json.dumps(status())})
            gone.wait(0.3)

    beating = threading.Thread(target=dying_run, daemon=True)
    beating.start()
    deadline = time.monotonic() + 30
    while client.hget("hv:cameras", "street-1") is None and time.monotonic() < deadline:  # its first beat is in
        time.sleep(0.05)
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        gone.set()

    try:
        app = App(parse_config({"cameras": CAMERAS}), say=say)
        app.refuse_a_twin(redis_server.url, watch_s=1.5, settle_s=1.0)  # not refused
    finally:
        gone.set()
        beating.join(5)
    assert any("still beat in Redis: waiting" in line for line in said), said
