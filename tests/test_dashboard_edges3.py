"""The dashboard at more edges: camera ids "." and ".." (a browser resolves such a path segment away), pictures
that did not change since the last poll, and the removals a long-running dashboard remembers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.dashboard import DashboardServer, create_app
from pipeline.dashboard_data import Board, make_tile
from pipeline.dashboard_hub import Hub
from pipeline.testbed_dashboard import FakeController, write_snapshot
from servers import skip_or_fail
from workers.publish import keys

K = keys("hv")
CHROMIUM = os.environ.get("HV_CHROMIUM", "/usr/bin/chromium")


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _jpeg(tag: str, size: int = 0) -> bytes:
    return b"\xff\xd8" + tag.encode() + os.urandom(size) + b"\xff\xd9"


def _picture(shade: int) -> bytes:
    """A real JPEG (8x8, grey ``shade``): the browser must decode it."""
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", np.full((8, 8, 3), shade, np.uint8))[1].tobytes()


def test_the_server_takes_the_ids_dot_and_dotdot_as_a_query_parameter(redis_server):
    """The config refuses such ids (workers/settings.py CAMERA_ID: a letter or digit first), but the dashboard shows
    what any program wrote under the prefix. A browser resolves 'api/cameras/../snapshot.jpg' to 'api/snapshot.jpg'
    (and '%2E%2E' too), so the page sends them as ?camera=; before, no route took that: 404."""
    from starlette.testclient import TestClient

    client = redis_server.client()
    for camera in (".", ".."):
        client.hset(K.cameras, camera, _status())
        write_snapshot(client, "hv", camera, _jpeg(camera), frame=7, ts=time.time())
    hub = Hub(redis_server.url, interval_s=0.2, allow_control=True)
    hub.poll(client)
    with FakeController(redis_server.url), TestClient(create_app(hub)) as http:
        for camera in (".", ".."):
            resp = http.get("/api/snapshot.jpg", params={"camera": camera, "v": "f7"})
            assert resp.status_code == 200 and resp.content == _jpeg(camera), (camera, resp.status_code)
            resp = http.delete("/api/cameras", params={"camera": camera})  # the controller runs no such camera
            assert resp.status_code == 404 and resp.json()["reason"] == f"id: no camera {camera!r}", resp.text
        assert http.delete("/api/cameras").status_code == 400  # no camera named at all: never sent
        assert http.get("/api/snapshot.jpg").status_code == 404


def test_the_page_shows_new_pictures_of_and_removes_cameras_dot_and_dotdot(redis_server):
    """In Chromium: the picture inlined in the hello showed, every newer one was a broken request (to
    api/snapshot.jpg or api/cameras/snapshot.jpg), and Remove camera sent DELETE api/ (404 Not Found, then
    'failed: SyntaxError' on the page) without reaching the controller."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("Playwright for Python is not installed (never `playwright install`: Debian's chromium is used)")
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} not found; on Debian: sudo apt-get install chromium")
    client = redis_server.client()
    for camera in (".", ".."):
        client.hset(K.cameras, camera, _status())
        write_snapshot(client, "hv", camera, _picture(40), frame=1, ts=time.time())
    frame_of = """(cam) => {
        const i = document.querySelector(`.tile[data-camera="${CSS.escape(cam)}"] img.snap`);
        return i && !i.hidden && i.complete && i.naturalWidth > 0 ? i.dataset.frame : null;
    }"""
    with FakeController(redis_server.url), \
            DashboardServer(redis_server.url, interval_s=0.2, allow_control=True) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.goto(server.url)
            for camera in (".", ".."):  # inline in the hello (or fetched, if a poll came first)
                page.wait_for_function(f"(cam) => ({frame_of})(cam) !== null", arg=camera, timeout=20_000)
            for camera in (".", ".."):
                write_snapshot(client, "hv", camera, _picture(200), frame=2, ts=time.time())
            for camera in (".", ".."):  # fetched by URL, as the page does for every picture after its hello
                page.wait_for_function(f"(cam) => ({frame_of})(cam) === '2'", arg=camera, timeout=20_000)
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(server.url + "#/camera/..")
            page.wait_for_selector("#detail button.remove:not([hidden])", timeout=20_000)
            page.click("#detail button.remove")
            page.wait_for_selector('#detail .result[data-status="rejected"]', timeout=20_000)
            assert page.inner_text("#detail .result") == "rejected: id: no camera '..'"
        finally:
            browser.close()


def test_an_unchanged_snapshot_is_not_read_again(redis_server):
    """Before: every poll read every camera's JPEG whole, changed or not: with 32 cameras of 100 kB, 3.1 MB
    from Redis at each poll (measured: 3135 KiB and ~17 ms a poll; now ~4 KiB and ~3.5 ms while none changed).
    A changed picture, a plain-string snapshot and a hash without a frame are still read."""
    client = redis_server.client()
    cams = [f"cam-{i:02d}" for i in range(32)]
    for cam in cams:
        client.hset(K.cameras, cam, _status())
        write_snapshot(client, "hv", cam, _jpeg(cam, 100_000), frame=1, ts=1000.0)
    client.hset(K.cameras, "plain", _status())
    client.set(K.snapshot("plain"), _jpeg("plain-1"))
    client.hset(K.cameras, "frameless", _status())
    client.hset(K.snapshot("frameless"), mapping={"jpeg": _jpeg("frameless-1")})
    hub = Hub(redis_server.url)
    reader = hub._client()
    hub.poll(reader)
    sent = lambda: client.info("stats")["total_net_output_bytes"]  # noqa: E731
    before = sent()
    hub.poll(reader)
    took = sent() - before
    assert took < 100_000, f"{took} bytes read from Redis in a poll where no picture changed"

    write_snapshot(client, "hv", "cam-05", _jpeg("cam-05-new"), frame=2, ts=1001.0)
    client.set(K.snapshot("plain"), _jpeg("plain-2"))
    client.hset(K.snapshot("frameless"), "jpeg", _jpeg("frameless-2"))
    tiles = {t["camera"]: t for t in hub.poll(reader)}
    assert tiles["cam-05"]["snapshot"]["v"] == "f2" and hub.snapshot("cam-05") == ("f2", _jpeg("cam-05-new"))
    assert tiles["cam-06"]["snapshot"] == {"v": "f1", "frame": 1, "ts": 1000.0}
    assert hub.snapshot("cam-06")[1].startswith(b"\xff\xd8cam-06")
    assert hub.snapshot("plain")[1] == _jpeg("plain-2") and hub.snapshot("frameless")[1] == _jpeg("frameless-2")


def test_a_dashboard_does_not_remember_every_camera_ever_removed():
    """Before: Board.removed_at kept one entry per camera_removed for ever (cameras that come and go for weeks);
    an entry only matters to a poll that began before the removal."""
    board = Board(history_s=60, gone_after_s=10)
    tile = lambda cam: make_tile({"camera": cam, "state": "running", "fps": 5.0}, None, None, None)  # noqa: E731
    for i in range(1000):
        now = 100.0 + i
        board.update([tile("a"), tile(f"gone-{i}")], now=now)
        board.remove(f"gone-{i}", at=now + 0.5)  # its camera_removed, during the next poll
    assert len(board.removed_at) <= 1, len(board.removed_at)
    assert [t["camera"] for t in board.update([tile("a"), tile("gone-999")], now=1099.2)] == ["a"]  # still held
    assert [t["camera"] for t in board.update([tile("a"), tile("gone-999")], now=1100.0)] == ["a", "gone-999"]
