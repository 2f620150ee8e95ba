"""The dashboard's server side at more edges (audit 10): command paths written with a trailing slash, an empty
camera id, the hello of very many cameras, a page that stopped reading, camera ids that hold a secret, an events key
the dashboard cannot read, and a picture deleted from Redis."""

from __future__ import annotations

import json
import logging
import threading
import time

from pipeline import dashboard_data as data
from pipeline.dashboard import create_app
from pipeline.dashboard_data import make_tile
from pipeline.dashboard_hub import Hub
from pipeline.testbed_dashboard import write_snapshot
from workers.publish import keys

K = keys("hv")
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: a command that is sent fails fast with 503
JPEG = b"\xff\xd8" + b"\0" * (100 * 1024) + b"\xff\xd9"  # a 100 kB picture, served as is


def _tile(camera: str, **status) -> dict:
    return make_tile({"camera": camera, "state": "running", "fps": 5.0, **status}, None, None, ("f1", 1, 1.0))


def test_a_command_path_with_a_trailing_slash_or_an_empty_id_is_refused_by_the_dashboard():
    """Before: POST /api/cameras/ answered 405 Method Not Allowed (the remove route took it, an empty id), and
    DELETE /api/cameras/ or ?camera= sent the controller a remove of camera "" (refused there, or a 30 s wait for
    an answer). As the control API (pipeline/api.py slash_hint): a 404 naming the path without the slash."""
    from starlette.testclient import TestClient

    with TestClient(create_app(Hub(NOWHERE, interval_s=5, allow_control=True))) as http:
        for method, path, right in (("POST", "/api/cameras/", "POST /api/cameras"),
                                    ("DELETE", "/api/cameras/", "DELETE /api/cameras"),
                                    ("DELETE", "/api/cameras/lobby/", "DELETE /api/cameras/lobby")):
            resp = http.request(method, path, json={"id": "a", "url": "synthetic://street"})
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
            assert resp.json()["reason"].endswith(f"without the trailing slash: {right}"), resp.text
        resp = http.delete("/api/cameras?camera=")
        assert resp.status_code == 400 and resp.json()["field"] == "camera", resp.text
        assert http.delete("/api/cameras/lobby%2F").status_code == 503  # the id "lobby/" (as the page sends it)
        assert http.put("/api/cameras/lobby").status_code == 405  # no hint where none helps


def test_the_hello_of_many_cameras_inlines_a_bounded_share_of_their_pictures():
    """Before: every picture went inline in every page's hello, built on the server's event loop: 2000 cameras of
    50 kB made a 150 MB hello per page opened (9 s, every other page's stream waiting). The first cameras come
    inline; the page fetches the others' pictures from their URLs, as when a tick names a new one."""
    hub = Hub(NOWHERE)
    cameras = [f"cam-{i:03d}" for i in range(200)]  # 20 MB of pictures
    hub.board.update([_tile(c) for c in cameras], now=100.0)
    hub.snapshots = {c: ("f1", JPEG) for c in cameras}
    text = hub.hello_text()
    hello = json.loads(text)
    assert len(text) < 16 * 2**20, f"a hello of {len(text) / 2**20:.0f} MB"
    inline = sorted(hello["pictures"])
    assert inline and inline == cameras[:len(inline)], inline[:3]  # the first tiles' pictures
    assert len(hello["cameras"]) == 200 and hub.snapshot(cameras[-1]) == ("f1", JPEG)  # the rest: by URL


def test_chart_points_are_numbers_and_are_not_scrubbed_at_every_hello(monkeypatch):
    """A chart point is (t, fps, age p50, age p95) from a status that may hold anything. Before: they were kept as
    read (a string stayed a string in the chart) and scrubbed string by string with the rest of every hello: 2000
    cameras' five minutes of points took 5 s of the server's event loop per page opened. Now numbers or null."""
    hub = Hub(NOWHERE)
    odd = {"nan": float("nan"), "inf": float("inf"), "huge": 10**400, "text": "fast", "bool": True, "list": [1]}
    for t in range(100, 103):
        hub.board.update([_tile(name, fps=v) for name, v in odd.items()] + [_tile("fine", fps=7)], now=float(t))
    scrubbed = []
    scrub = data.scrub
    monkeypatch.setattr(data, "scrub", lambda value, urls: scrubbed.append(value) or scrub(value, urls))
    history = json.loads(hub.hello_text())["history"]
    assert {c: [p[1] for p in points] for c, points in history.items()} == {**{c: [None] * 3 for c in odd},
                                                                            "fine": [7.0] * 3}
    assert not any(isinstance(v, dict) and "history" in v for v in scrubbed), "the chart points were scrubbed"


def test_a_page_that_stopped_reading_is_dropped_before_it_holds_32_mb():
    """A page whose queue fills is disconnected and reconnects to a fresh hello. Before: full meant 256 messages,
    whatever their size: with 2000 cameras a tick is 1.2 MB, and a page that stopped reading (a laptop asleep)
    held 300 MB of them for minutes. A page that keeps up still gets every message."""
    hub = Hub(NOWHERE)
    stalled, _ = hub.subscribe()
    reading, _ = hub.subscribe()
    tick = "event: tick\ndata: " + "x" * 2**20 + "\n\n"  # one object in every queue: the test holds 1 MB
    for _ in range(48):
        hub._fanout(tick)
        assert reading.get_nowait() == tick
    assert stalled not in hub._queues and stalled.qsize() == 1 and stalled.get_nowait() is None
    assert reading in hub._queues


def test_a_camera_id_holding_the_redis_password_is_masked_in_the_pictures_too():
    """Everything a page is sent is scrubbed of the Redis URL's secrets, the tiles' camera ids too. Before: the
    hello's inline pictures were keyed by the ids as read, so such an id reached the page in clear there (and its
    picture matched no tile)."""
    hub = Hub("redis://:s3cret-pw@127.0.0.1:1/0")
    hub.board.update([_tile("cam-s3cret-pw")], now=100.0)
    hub.snapshots = {"cam-s3cret-pw": ("f1", b"\xff\xd8\xff\xd9")}
    text = hub.hello_text()
    hello = json.loads(text)
    assert "s3cret-pw" not in text
    assert list(hello["pictures"]) == [hello["cameras"][0]["camera"]] == list(hello["history"])


class _Retries(threading.Event):
    """A stop event whose waits take no time and which is set after ``n`` of them: a reader's ``n`` retries at once."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    def wait(self, timeout: float | None = None) -> bool:
        self.left -= 1
        if self.left <= 0:
            self.set()
        return self.is_set()


def test_an_events_key_the_dashboard_cannot_read_is_said_once(redis_server, caplog):
    """Before: the events reader retried any Redis error in silence, the poller saying Redis was fine: with the
    events key of another type (or one this Redis user may not read) the feed stayed empty with nothing in the
    log to say why. Said once per run of failures, not at every retry."""
    redis_server.client().set(K.events, "not a stream")
    hub = Hub(redis_server.url)
    hub._stop = _Retries(5)
    with caplog.at_level(logging.WARNING, logger="pipeline.dashboard_hub"):
        hub._events_loop()  # returns once the (fake) stop is set
    said = [r.getMessage() for r in caplog.records if K.events in r.getMessage()]
    assert len(said) == 1 and "WRONGTYPE" in said[0], said


def test_a_picture_deleted_from_redis_is_no_longer_served(redis_server):
    """A camera whose snapshots are switched off deletes its last one (the tile then shows none). Before: the
    Hub kept and served that picture for as long as the camera ran, and put it inline in every page's hello.
    A camera whose status is missing for a moment (a Redis restart) keeps its picture with its tile."""
    client = redis_server.client()
    for camera in ("off", "restarting"):
        client.hset(K.cameras, camera, json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600}))
        write_snapshot(client, "hv", camera, b"\xff\xd8" + camera.encode() + b"\xff\xd9", frame=3, ts=time.time())
    hub = Hub(redis_server.url)
    hub.poll(client)
    assert hub.snapshot("off") and hub.snapshot("restarting")
    client.delete(K.snapshot("off"))
    client.hdel(K.cameras, "restarting")
    tiles = {t["camera"]: t for t in hub.poll(client)}
    assert tiles["off"]["snapshot"] is None and hub.snapshot("off") is None
    assert "off" not in json.loads(hub.hello_text())["pictures"]
    assert tiles["restarting"]["missing"] and hub.snapshot("restarting") == ("f3", b"\xff\xd8restarting\xff\xd9")
