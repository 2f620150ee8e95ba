"""The dashboard server with odd Redis entries: one fails its own tile or event, never the whole board, the events
feed or the stream; control requests name the bad field and say 503 when the dashboard's Redis fails."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from pipeline.dashboard import create_app
from pipeline.dashboard_hub import Hub
from workers.publish import encode, event_message, keys

K = keys("hv")


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


@pytest.mark.parametrize("what, write", [
    ("a status with 1e999 (inf)", lambda c: c.hset(K.cameras, "odd", _status()[:-1] + ',"decode_fps":1e999}')),
    ("a status whose dropped is a list", lambda c: c.hset(K.cameras, "odd", _status(dropped=[1]))),
    ("a status whose heads is a number", lambda c: c.hset(K.cameras, "odd", _status(heads=5))),
    ("a detection with NaN", lambda c: (c.hset(K.cameras, "odd", _status()), c.xadd(
        K.detections("odd"), {"data": '{"size":[NaN,1],"heads":["p"],"detections":[]}'}))),
    ("a detection that is no object", lambda c: (c.hset(K.cameras, "odd", _status()), c.xadd(
        K.detections("odd"), {"data": '{"heads":["p"],"detections":[1]}'}))),
    ("a tracked detection without head", lambda c: (c.hset(K.cameras, "odd", _status()), c.xadd(
        K.detections("odd"), {"data": '{"heads":["p"],"detections":[{"track_id":1}]}'}))),
    ("a snapshot with ts nan", lambda c: (c.hset(K.cameras, "odd", _status()), c.hset(
        K.snapshot("odd"), mapping={"jpeg": b"\xff\xd8x\xff\xd9", "frame": 3, "ts": "nan"}))),
    ("a snapshot key that is a set", lambda c: (c.hset(K.cameras, "odd", _status()), c.sadd(K.snapshot("odd"), "x"))),
])
def test_one_odd_camera_entry_does_not_break_the_board_or_the_stream(redis_server, what, write):
    """Before: the poll raised (every camera's tick lost, a WRONGTYPE shown as 'Redis unreachable'), or the
    NaN/inf went into the board and every hello failed to encode: /api/state and /api/stream answered 500
    for every page until the entry went away."""
    from starlette.testclient import TestClient

    client = redis_server.client()
    client.hset(K.cameras, "good", _status())
    write(client)
    hub = Hub(redis_server.url)
    tiles = {t["camera"]: t for t in hub.poll(client)}
    assert set(tiles) == {"good", "odd"} and tiles["good"]["state"] == "up", what
    json.loads(hub.hello_text())
    with TestClient(create_app(hub)) as http:  # its own poller starts too: the state is served
        resp = http.get("/api/state")
        assert resp.status_code == 200, what
        assert {t["camera"] for t in resp.json()["cameras"]} == {"good", "odd"}


def test_an_odd_event_does_not_end_the_events_feed(redis_server):
    """Before: a camera_removed without a camera (KeyError) or an event holding NaN (its encoding failed)
    ended the events thread for good, and the NaN one, kept in the backlog, failed every later hello."""
    client = redis_server.client()
    hub = Hub(redis_server.url, interval_s=0.2)
    loop = asyncio.new_event_loop()
    hub.start(loop)
    try:
        time.sleep(0.5)
        client.xadd(K.events, {"data": '{"type":"camera_removed"}'})
        client.xadd(K.events, {"data": '{"type":"camera_removed","camera":["a"]}'})
        client.xadd(K.events, {"data": '{"type":"stream_up","camera":"a","v":NaN}'})
        time.sleep(0.5)
        client.xadd(K.events, {"data": encode(event_message("camera_added", "after"))})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.get("camera") == "after" for e in list(hub.events)):
            time.sleep(0.05)
        assert any(e.get("camera") == "after" for e in list(hub.events)), "the events reader stopped"
        assert hub._threads[1].is_alive()
        json.loads(hub.hello_text())
    finally:
        hub.stop()
        loop.close()


def test_control_says_503_when_redis_fails_and_names_the_bad_field():
    """Before: the dashboard's own Redis failing answered 400 (a user's mistake), and a camera with a bad id or
    url, or a body that is no JSON, all got 'expected a JSON object with id and url'."""
    from starlette.testclient import TestClient

    hub = Hub("redis://127.0.0.1:1/0", interval_s=5, allow_control=True)  # nothing listens on port 1
    with TestClient(create_app(hub)) as http:
        resp = http.post("/api/cameras", json={"id": "x", "url": "synthetic://street"})
        assert resp.status_code == 503 and resp.json()["reason"].startswith("Redis: ")
        assert http.delete("/api/cameras/x").status_code == 503
        resp = http.post("/api/cameras", json={"id": 5, "url": "synthetic://street"})
        assert resp.status_code == 400 and resp.json()["reason"].startswith("camera id:")
        resp = http.post("/api/cameras", json={"id": "x"})
        assert resp.status_code == 400 and resp.json()["reason"] == "camera url: expected a non-empty string, missing"
        resp = http.post("/api/cameras", content=b"{bad", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "not JSON" in resp.json()["reason"]


def test_an_added_camera_body_is_strict_json_and_bounded():
    """The page's form sends one small JSON object. Before: a key given twice reached the controller with its
    last value, NaN went on as a number, and a body of any size without a length was read whole."""
    from starlette.testclient import TestClient

    hub = Hub("redis://127.0.0.1:1/0", interval_s=5, allow_control=True)
    json_type = {"content-type": "application/json"}
    with TestClient(create_app(hub)) as http:
        resp = http.post("/api/cameras", content=b'{"id": "x", "url": "a", "url": "synthetic://street"}',
                         headers=json_type)
        assert resp.status_code == 400 and "key 'url' given twice" in resp.json()["reason"], resp.text
        resp = http.post("/api/cameras", content=b'{"id": "x", "url": "synthetic://street", "fps": NaN}',
                         headers=json_type)
        assert resp.status_code == 400 and "NaN is not JSON" in resp.json()["reason"], resp.text
        resp = http.post("/api/cameras", content=b"{" + b" " * (2 << 20) + b"}", headers=json_type)
        assert resp.status_code == 413, resp.text
        resp = http.post("/api/cameras", content=iter([b'{"id": "x", ', b'"url": "synthetic://street"}']),
                         headers=json_type)  # chunked: no length said
        assert resp.status_code == 411, resp.text
