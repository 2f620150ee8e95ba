"""The dashboard with thousands of cameras (audit 10): the poll's reads of changed pictures, the chart points in a
hello, and the page's tick, whose work must grow with the cameras, not with their square. Figures:
benchmarks/bench_dashboard.py --scale (benchmarks/README.md)."""

from __future__ import annotations

import json
import time

import redis

from pipeline.dashboard import DashboardServer
from pipeline.dashboard_data import make_tile
from pipeline.dashboard_hub import Hub
import test_dashboard_browser
from workers.publish import keys

K = keys("hv")
NOWHERE = "redis://127.0.0.1:1/0"  # no Redis: the page gets its hello and no tick that would redraw its tiles
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)


def _status() -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0})


def _write_pictures(client: redis.Redis, cameras: list[str], frame: int) -> None:
    pipe = client.pipeline(transaction=False)
    for cam in cameras:
        pipe.hset(K.snapshot(cam), mapping={"jpeg": b"\xff\xd8" + cam.encode() + b"-%d\xff\xd9" % frame,
                                            "frame": frame, "ts": 1000.0 + frame})
    pipe.execute()


def test_a_poll_reads_the_changed_pictures_in_a_few_round_trips(redis_server, monkeypatch):
    """Before: each changed picture was read in a round trip of its own: with 2000 cameras a poll took 0.7-1.5 s
    against its 1 s interval. Now in pipelines of SNAPSHOT_READS_PER_TRIP; a snapshot that is a plain string or
    another type reads as before (the string by its own GET, the other as no picture)."""
    client = redis_server.client()
    cameras = [f"cam-{i:03d}" for i in range(250)]
    client.hset(K.cameras, mapping={c: _status() for c in cameras + ["plain", "listed"]})
    client.set(K.snapshot("plain"), b"\xff\xd8plain\xff\xd9")
    client.rpush(K.snapshot("listed"), b"not a picture")
    _write_pictures(client, cameras, 1)
    hub, reader = Hub(redis_server.url), redis_server.client()
    hub.poll(reader)
    _write_pictures(client, cameras, 2)  # every picture new

    trips = []
    send = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda conn, *a, **k: trips.append(1) or send(conn, *a, **k))
    tiles = {t["camera"]: t for t in hub.poll(reader)}
    # statuses, the per-camera pipeline, the pictures in 3 pipelines, and the plain string's GET (before: 250 more)
    assert len(trips) <= 8, f"{len(trips)} round trips for one poll"
    assert all(tiles[c]["snapshot"]["v"] == "f2" and hub.snapshot(c)[1].endswith(b"-2\xff\xd9") for c in cameras)
    assert tiles["plain"]["snapshot"]["v"].startswith("c") and hub.snapshot("plain")[1] == b"\xff\xd8plain\xff\xd9"
    assert tiles["listed"]["snapshot"] is None and tiles["listed"]["state"] != "unreadable"


def test_a_hello_sends_at_most_a_chart_width_of_points_per_camera():
    """Before: a page opening got every chart point kept, 5 minutes at every poll: 600,000 points for 2000 cameras,
    0.7 of the hello's 1 s on the server's event loop. Now at most HELLO_CHART_POINTS per camera, evenly spaced,
    the newest kept; a camera with fewer gets them all."""
    hub = Hub(NOWHERE)
    tile = lambda c: make_tile({"camera": c, "state": "running", "fps": 5.0}, None, None, None)  # noqa: E731
    for t in range(1000, 1300):
        hub.board.update([tile("busy")] + ([tile("new")] if t >= 1290 else []), now=float(t), clock=float(t))
    history = json.loads(hub.hello_text())["history"]
    times = [p[0] for p in history["busy"]]
    assert len(times) <= 100, len(times)  # HELLO_CHART_POINTS: what a chart ~260 px wide draws
    assert times[-1] == 1299.0 and times[0] <= 1004.0, times[:3]
    assert len({b - a for a, b in zip(times, times[1:])}) == 1, "not evenly spaced"
    assert [p[0] for p in history["new"]] == [float(t) for t in range(1290, 1300)]


def _open(browser, server):
    page = test_dashboard_browser.new_page(browser)
    page.goto(server.url)
    page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression
    return page


# the page's own state and renderTiles (a classic script's globals), fed tiles as a tick would
RENDER = """(tiles) => { state.cameras = new Map(tiles.map((t) => [t.camera, t])); renderTiles(); }"""


def _tiles(cameras: list[str], fps: float = 5.0) -> list[dict]:
    return [make_tile({"camera": c, "state": "running", "fps": fps}, None, None, None) for c in cameras]


def test_a_tick_finds_each_tile_without_searching_the_grid(browser):
    """Before: renderTiles looked each camera's tile up with a selector over the whole grid, at every tick: work
    growing with the square of the cameras (2000 took 0.25 s more a tick than now, see the README). Now a
    camera -> tile map: the searches of the grid or the document in a tick do not grow with the cameras."""
    with DashboardServer(NOWHERE, interval_s=60) as server:
        page = _open(browser, server)
        try:
            page.evaluate("""() => {  // counts the searches started at the grid or the document
                window.hvSearches = 0;
                for (const proto of [Element.prototype, Document.prototype]) {
                    for (const name of ["querySelector", "querySelectorAll"]) {
                        const search = proto[name];
                        proto[name] = function (...args) {
                            if (this === document || this.id === "grid") window.hvSearches++;
                            return search.apply(this, args);
                        };
                    }
                }
            }""")
            searches = {}
            for n in (40, 400):
                cameras = [f"cam-{i:03d}" for i in range(n)]
                page.evaluate(RENDER, _tiles(cameras))  # the tiles made
                page.evaluate("() => { window.hvSearches = 0; }")
                page.evaluate(RENDER, _tiles(cameras, fps=6.0))  # a tick on them
                searches[n] = page.evaluate("() => window.hvSearches")
                assert page.evaluate("() => document.querySelectorAll('#grid .tile').length") == n
            assert searches[400] - searches[40] < 10, searches
            assert not page.errors, page.errors
        finally:
            page.close()


def test_tiles_follow_cameras_that_come_and_go_whatever_their_ids(browser):
    """The camera -> tile map follows the cameras: a tile removed with its camera, a new one when it comes back
    (nothing of the old one's picture), the others kept in place (an operator's focus stays), ids that CSS
    selectors dislike as well as plain ones, the grid in the page's order."""
    odd = ['a"b', "c\\d]", "e f", "ŝ", "x'y", "new\nline", "#1", ".", "..", "[x]", "plain"]
    with DashboardServer(NOWHERE, interval_s=60) as server:
        page = _open(browser, server)
        try:
            shown = lambda: page.evaluate(  # noqa: E731
                "() => [...document.querySelectorAll('#grid .tile')].map((t) => t.dataset.camera)")
            page.evaluate(RENDER, _tiles(odd))
            order = page.evaluate("(ids) => [...ids].sort((a, b) => a.localeCompare(b))", odd)
            assert shown() == order
            page.evaluate("() => { window.hvKept = [...document.querySelectorAll('#grid .tile')]; }")
            page.evaluate(RENDER, _tiles([c for c in odd if c not in ('a"b', "e f")]))
            assert shown() == [c for c in order if c not in ('a"b', "e f")]
            assert page.evaluate("""() => window.hvKept.filter((t) => t.isConnected).length""") == len(odd) - 2
            page.evaluate(RENDER, _tiles(odd, fps=8.0))  # both back
            assert shown() == order
            assert page.evaluate("""() => window.hvKept.filter((t) => t.isConnected).length""") == len(odd) - 2
            fps = page.evaluate("""() => [...document.querySelectorAll('#grid .tile dd.fps')]
                                         .map((d) => d.textContent.split(' ')[0])""")
            assert fps == ["8.0"] * len(odd)
            page.evaluate(RENDER, [])
            assert shown() == [] and page.is_visible("#empty")
            assert not page.errors, page.errors
        finally:
            page.close()
