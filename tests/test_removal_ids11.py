"""Defects found by running the real service under faults (chaos11)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import ray

from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig, RedisConfig
from workers.stream import publisher_for


def test_a_removal_while_redis_is_out_of_memory_keeps_the_cameras_next_track_ids(redis_server, monkeypatch):
    """A camera removed while Redis refused writes (out of memory, or down) lost its next track ids: they were not
    kept, and the status holding them was deleted once Redis took writes again; the same id added again reused
    track ids consumers had seen (seen live: syn-2's people 66..73 started twice). The status stays now, and the
    control loop's retry keeps the ids and then deletes it."""
    app = App(parse_config({}), say=lambda text: None)
    settings = RedisConfig(url=redis_server.url)
    app.redis_settings = settings
    app.events = publisher_for(settings, name="chaos11-controller").start()
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    app._let_go = lambda handle, stop=False: False
    client = redis_server.client()
    # what the camera's run left in Redis: its status (ids up to 73 handed out), an earlier removal's ids
    client.hset("hv:cameras", "cam", json.dumps({"state": "running", "track_ids_next": {"people": 74}}))
    client.hset("hv:track_ids", "cam", json.dumps({"people": 66}))
    stop = SimpleNamespace(remote=lambda camera_id, drain=True: {"state": "stopped", "published": 10,
                                                                "track_ids_next": {"people": 74}})
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"),
                                      SimpleNamespace(stop=stop), "hv-camera-cam", done="done-cam")
    client.config_set("maxmemory", "1")  # noeviction (the default): every write that may grow memory is refused
    try:
        assert app.remove_camera("cam", by="test")["final"]["state"] == "stopped"
    finally:
        client.config_set("maxmemory", "0")  # Redis takes writes again
    try:
        assert app.events.flush(10.0)
        status = client.hget("hv:cameras", "cam")
        kept = [json.loads(client.hget("hv:track_ids", "cam") or b"{}").get("people", 0)]
        if status is not None:
            kept.append(json.loads(status).get("track_ids_next", {}).get("people", 0))
        # a camera added again under this id reads its next ids from these two places: 74 or more, not 66
        assert max(kept) >= 74, f"next people id kept: {max(kept)}"
        app.retire_pending()  # the control loop's next tick, Redis taking writes: the ids kept, the status gone
        assert app.events.flush(10.0)
        assert json.loads(client.hget("hv:track_ids", "cam")) == {"people": 74}
        assert client.hget("hv:cameras", "cam") is None and not app._unretired
    finally:
        app.events.close(2.0)



def test_a_removal_says_the_messages_its_publisher_could_not_deliver(redis_server, monkeypatch):
    """Removed while Redis refused writes, a camera's buffered messages (268 in the operator's run) went with it:
    the answer and camera_removed said only what it had published, a worker log line without the camera's id the
    rest. Both say what was lost now."""
    app = App(parse_config({}), say=lambda text: None)
    settings = RedisConfig(url=redis_server.url)
    app.redis_settings = settings
    app.events = publisher_for(settings, name="removal-controller").start()
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    app._let_go = lambda handle, stop=False: False
    stop = SimpleNamespace(remote=lambda camera_id, drain=True: {"state": "stopped", "published": 247,
                                                                "publisher": {"queued": 268}})
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"),
                                      SimpleNamespace(stop=stop), "hv-camera-cam", done="done-cam")
    try:
        answer = app.remove_camera("cam", by="test")
        assert answer["final"]["published"] == 247 and answer["final"]["undelivered"] == 268
        assert app.events.flush(10.0)
        removed = [json.loads(f[b"data"]) for _, f in redis_server.client().xrange("hv:events")]
        assert [(e["type"], e.get("undelivered")) for e in removed] == [("camera_removed", 268)]
    finally:
        app.events.close(2.0)


def test_the_retry_costs_a_frozen_redis_one_timeout_and_then_backs_off():
    """Against a Redis that takes connections and never answers (frozen, SIGSTOP) each pending removal cost a 2 s
    timeout at every tick of the control loop: 15 of them held it past /healthz's 30 s."""
    import contextlib
    import socket
    import threading
    import time

    server, held = socket.create_server(("127.0.0.1", 0)), []

    def accept() -> None:  # takes every connection, answers none
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=f"redis://127.0.0.1:{server.getsockname()[1]}/0")
    app.events = SimpleNamespace(remove_status=lambda camera_id: None)
    app._unretired.update({f"cam{i}": {"people": 10} for i in range(5)})
    try:
        t0 = time.monotonic()
        app.retire_pending()
        first = time.monotonic() - t0
        t0 = time.monotonic()
        app.retire_pending()  # the next tick, within the back-off
        assert first < 5.0 and time.monotonic() - t0 < 0.5, first  # one timeout (~2 s), not five
        assert len(app._unretired) == 5
    finally:
        server.close()


def test_the_retry_leaves_a_camera_being_added_again_alone(redis_server):
    """An add of the id still in progress (in ``_busy``) is already publishing: the retry deleted its fresh status,
    snapshot and counts."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    removed = []
    app.events = SimpleNamespace(remove_status=removed.append)
    app._unretired["cam"] = {"people": 74}
    app._busy.add("cam")
    redis_server.client().hset("hv:cam:cam:counts", "x", 1)
    app.retire_pending()
    assert removed == [] and "cam" in app._unretired and redis_server.client().exists("hv:cam:cam:counts")
    app._busy.discard("cam")
    app.cameras["cam"] = object()  # added: it goes on from its status itself, and is retired at its own removal
    app.retire_pending()
    assert removed == [] and not app._unretired and redis_server.client().exists("hv:cam:cam:counts")


def test_an_answer_after_redis_came_back_a_moment_behind_takes_the_command_with_it(redis_server):
    """Redis restarted from persistence a moment behind holds the command, not read yet: the first application's
    answer, retried, wrote the answer alone and left the command, which the reader read again and answered a
    second time (the operator's suite, busy, saw two answers to one remove). The command goes with its answer."""
    from pipeline.control import ControlConsumer

    client = redis_server.client()
    entry = client.xadd("hv:control", {"data": json.dumps({"op": "remove", "id": "lobby"})}).decode()
    client.xgroup_create("hv:control", "hydravision", id="0")  # not read: as in the snapshot Redis came back with
    consumer = ControlConsumer(SimpleNamespace(), redis_server.url, "hv")
    assert consumer._answer(entry, {"v": 1, "command": entry, "status": "accepted"}, check_first=True)
    assert client.xlen("hv:control") == 0  # nothing left to read again
    assert len(client.xrange("hv:control:results")) == 1
