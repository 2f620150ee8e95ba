"""The dashboard's server side at its edges: a Redis outage of half an hour, entries nested too deep to encode,
camera ids holding a '/', and what an open or stalled page costs the server's memory."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import tracemalloc

import redis

from pipeline.control import control_key
from pipeline.dashboard import DashboardServer, create_app
from pipeline.dashboard_hub import CLIENT_QUEUE, Hub
from pipeline.testbed_dashboard import FakeController, write_snapshot
from workers.publish import encode, event_message, keys

K = keys("hv")
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


class _Retries(threading.Event):
    """A stop event whose waits take no time and which is set after ``n`` of them: a reader's ``n`` retries at once."""

    def __init__(self, n: int):
        super().__init__()
        self.left, self.waits = n, []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.left -= 1
        if self.left <= 0:
            self.set()
        return self.is_set()


def test_a_redis_outage_of_half_an_hour_does_not_end_the_readers(monkeypatch):
    """Before: the back-off was min(2, 0.25 * 2 ** failures); at the 1024th failure in a row (~35 minutes of
    outage at 2 s each) 2 ** 1024 is no float: OverflowError ended the poller and the events reader, and the page
    stayed on 'Redis unreachable' with its last values after Redis came back, until the dashboard was restarted."""
    hub = Hub(NOWHERE)

    def down(*args) -> None:
        raise redis.ConnectionError("Connection refused")
    monkeypatch.setattr(hub, "poll", down)
    monkeypatch.setattr(hub, "_backlog", down)
    for loop in (hub._poll_loop, hub._events_loop):
        hub._stop = _Retries(1100)
        loop()  # returns once the (fake) stop is set, instead of raising
        assert len(hub._stop.waits) == 1100 and max(hub._stop.waits) <= 2.0, loop.__name__


def test_entries_nested_too_deep_fail_their_own_tile_or_event(redis_server):
    """Arrays nested a few hundred deep are JSON that json.loads takes (a few thousand it refuses with a
    RecursionError). Before: such a detection message failed every poll (no tile of any camera updated); one in
    a status or a detection's size went onto the board and every page's hello failed (/api/stream and
    /api/state 500); an event in the backlog kept the events reader retrying it for good, and one arriving later
    ended the events thread."""
    from starlette.testclient import TestClient

    client = redis_server.client()
    client.hset(K.cameras, "good", _status())
    client.hset(K.cameras, "deep-message", _status())
    client.xadd(K.detections("deep-message"), {"data": _nested(3000)})
    client.hset(K.cameras, "deep-size", _status())
    client.xadd(K.detections("deep-size"), {"data": '{"heads":[],"detections":[],"size":' + _nested(600) + "}"})
    client.hset(K.cameras, "deep-state", '{"state":' + _nested(600) + ',"heartbeat_ts":1e12}')
    client.xadd(K.events, {"data": '{"type":"stream_up","camera":"a","x":' + _nested(600) + "}"})
    client.xadd(K.events, {"data": encode(event_message("stream_up", "before"))})

    hub = Hub(redis_server.url, interval_s=0.2)
    tiles = {t["camera"]: t for t in hub.poll(client)}
    assert set(tiles) == {"good", "deep-message", "deep-size", "deep-state"}
    assert tiles["good"]["state"] == "up" and tiles["deep-message"]["state"] == "up"
    assert tiles["deep-size"]["detail"] == "unreadable" and "nested" in tiles["deep-size"]["error"]
    assert tiles["deep-state"]["detail"] == "unreadable"
    json.loads(hub.hello_text())

    with TestClient(create_app(hub)) as http:  # its lifespan starts the Hub's threads
        for data in ('{"type":"stream_up","camera":"b","x":' + _nested(600) + "}", _nested(3000),
                     encode(event_message("stream_up", "after"))):
            client.xadd(K.events, {"data": data})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.get("camera") == "after" for e in list(hub.events)):
            time.sleep(0.05)
        assert [e.get("camera") for e in hub.events] == ["before", "after"], "the events reader stopped"
        assert hub._threads[1].is_alive()
        resp = http.get("/api/state")
        assert resp.status_code == 200 and len(resp.json()["cameras"]) == 4


def test_a_camera_id_with_a_slash_has_its_picture_and_can_be_removed(redis_server):
    """Camera ids are any string, and the page sends one in a URL as encodeURIComponent writes it ('a/b' as
    'a%2Fb'), which the server decodes before routing. Before: '/api/cameras/site/lobby/snapshot.jpg' matched
    no route, so such a camera's picture was a broken image after the first, and Remove camera answered 404
    Not Found without ever reaching the controller."""
    from starlette.testclient import TestClient

    client = redis_server.client()
    for camera, jpeg in (("site/lobby", b"\xff\xd8site-lobby\xff\xd9"), ("lobby", b"\xff\xd8lobby\xff\xd9")):
        client.hset(K.cameras, camera, _status())
        write_snapshot(client, "hv", camera, jpeg, frame=7, ts=time.time())
    hub = Hub(redis_server.url, interval_s=0.2, allow_control=True)
    hub.poll(client)
    with FakeController(redis_server.url), TestClient(create_app(hub)) as http:
        resp = http.get("/api/cameras/site%2Flobby/snapshot.jpg?v=f7")
        assert resp.status_code == 200 and resp.content == b"\xff\xd8site-lobby\xff\xd9"
        assert http.get("/api/cameras/lobby/snapshot.jpg?v=f7").content == b"\xff\xd8lobby\xff\xd9"
        resp = http.delete("/api/cameras/site%2Flobby")  # the controller's answer: it runs no such camera
        assert resp.status_code == 404 and resp.json()["reason"] == "id: no camera 'site/lobby'", resp.text


def _open_page(server: DashboardServer) -> socket.socket:
    page = socket.create_connection((server.host, server.port), timeout=20)
    page.sendall(f"GET /api/stream HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n\r\n".encode())
    return page


def _read_until(page: socket.socket, marker: bytes) -> None:
    """Reads (and throws away) until ``marker``: a client that keeps nothing of what it read."""
    tail, deadline = b"", time.monotonic() + 30
    while time.monotonic() < deadline:
        chunk = page.recv(1 << 16)
        assert chunk, "the server closed the stream"
        if marker in tail + chunk:
            return
        tail = (tail + chunk)[-len(marker):]
    raise AssertionError(f"no {marker!r} within 30 s")


def test_an_open_page_does_not_keep_its_hello_in_the_server(redis_server):
    """A hello holds every camera's picture inline (data: URLs). Before: the stream's generator kept it in its
    closure for as long as the page stayed open: with 32 cameras of ~100 kB pictures, ~4 MB of server memory
    per open page, for hours. Counted here: blocks larger than the picture, alive after 4 pages got theirs."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    jpeg = b"\xff\xd8" + os.urandom(1 << 20) + b"\xff\xd9"
    write_snapshot(client, "hv", "cam", jpeg, frame=1, ts=time.time())
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        deadline = time.monotonic() + 10
        while server.hub.snapshot("cam") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        tracemalloc.start()
        try:
            pages = [_open_page(server) for _ in range(4)]
            for page in pages:
                _read_until(page, b"event: hello")
            for page in pages:  # a tick after the hello: the server has moved on from sending it
                _read_until(page, b"event: tick")
            large = [t for t in tracemalloc.take_snapshot().traces if t.size > 1.25 * len(jpeg)]
        finally:
            tracemalloc.stop()
            for page in pages:
                page.close()
    assert len(large) <= 1, f"{len(large)} blocks over {1.25 * len(jpeg) / 2**20:.2f} MB held with 4 pages open"


def test_a_page_dropped_for_falling_behind_holds_only_its_end():
    """A page whose queue fills is disconnected and reconnects to a fresh hello. Before: its queue kept the 255
    messages it had not read (ticks of every tile) beside the end marker, for as long as its connection
    stalled, a page on a stuck link for hours; a page that keeps up still gets every message."""
    hub = Hub(NOWHERE)
    stalled, _ = hub.subscribe()
    reading, _ = hub.subscribe()
    for i in range(CLIENT_QUEUE + 10):
        hub._fanout(f"event: tick\ndata: {i}\n\n")
        if i < CLIENT_QUEUE + 5:
            reading.get_nowait()
    assert stalled.qsize() == 1 and stalled.get_nowait() is None
    assert reading in hub._queues and reading.qsize() == 5
    assert [reading.get_nowait() for _ in range(5)][-1] == f"event: tick\ndata: {CLIENT_QUEUE + 9}\n\n"


def test_stopping_does_not_wait_out_a_control_request_nobody_answers(redis_server):
    """Before: a control request waiting for the controller's answer (30 s) held the dashboard's shutdown: its
    thread waited out the answer's timeout in the executor that uvicorn joins, so DashboardServer.stop gave up
    after its 5 s with the server still running (the controller's own shutdown 5 s longer), and Ctrl-C on
    `hydravision dashboard` took 30 s. No controller reads the control stream here."""
    import httpx

    client = redis_server.client()
    server = DashboardServer(redis_server.url, interval_s=0.2, allow_control=True).start()

    def add() -> None:
        try:
            httpx.post(server.url + "api/cameras", json={"id": "x", "url": "synthetic://street"}, timeout=60)
        except httpx.HTTPError:  # the server went away under it: what it answers is not the point here
            pass
    request = threading.Thread(target=add)
    try:
        request.start()
        deadline = time.monotonic() + 10
        while not client.exists(control_key("hv")) and time.monotonic() < deadline:  # sent: it awaits the answer
            time.sleep(0.05)
        assert client.exists(control_key("hv"))
    finally:
        began = time.monotonic()
        server.stop(timeout=20)
        took = time.monotonic() - began
        request.join(30)
    assert not server._thread.is_alive() and took < 15, f"stopped after {took:.1f} s"


def test_the_pages_script_is_revalidated_at_every_load():
    """index.html is sent with no-cache; its script and style were sent with no Cache-Control at all, which lets
    a browser reuse them unasked (heuristic freshness: a tenth of their age): for days after an upgrade the new
    page and server ran with the old app.js. Revalidating costs a 304 while the file is unchanged."""
    from starlette.testclient import TestClient

    with TestClient(create_app(Hub(NOWHERE, interval_s=5))) as http:
        for path in ("/static/app.js", "/static/style.css"):
            resp = http.get(path)
            assert resp.status_code == 200 and resp.headers.get("cache-control") == "no-cache", path
            again = http.get(path, headers={"if-none-match": resp.headers["etag"]})
            assert again.status_code == 304 and again.headers.get("cache-control") == "no-cache", path


def test_a_dashboard_interval_too_long_to_wait_is_refused(capsys, monkeypatch):
    """Before: `--interval 1e20` passed (finite, > 0), and the poller's first wait raised OverflowError
    (longer than any wait a thread can do): a traceback, and a page whose tiles never updated."""
    from pipeline import dashboard
    from pipeline.cli import main

    monkeypatch.setattr(dashboard, "serve", lambda *a, **k: 0)  # not reached when refused; served, returns 0
    assert main(["dashboard", "--interval", "1e20", "--redis-url", NOWHERE]) == 2
    assert "--interval must be at most 3600 seconds, got 1e+20" in capsys.readouterr().err
    assert main(["dashboard", "--interval", "3600", "--redis-url", NOWHERE]) == 0
