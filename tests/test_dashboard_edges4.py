"""The dashboard at more edges: removals and vanished cameras timed across a step of the wall clock (NTP), the
chart across a step back, and what the page's Content-Security-Policy and its add form let through."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from pathlib import Path

import pytest

from pipeline import dashboard_hub
from pipeline.dashboard import DashboardServer, create_app
from pipeline.dashboard_data import Board, make_tile
from pipeline.dashboard_hub import Hub
from servers import skip_or_fail
from workers.publish import keys

K = keys("hv")
CHROMIUM = os.environ.get("HV_CHROMIUM", "/usr/bin/chromium")


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


class SteppedClock:
    """Stands in for the Hub's ``time`` module: a wall clock that a test steps, and a monotonic one that only
    goes forward."""

    def __init__(self, wall: float = 1_000_000.0, mono: float = 500.0):
        self.wall, self.mono = wall, mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def tick(self, seconds: float, wall_step: float = 0.0) -> None:
        """``seconds`` pass; the wall clock also jumps by ``wall_step`` (NTP)."""
        self.mono += seconds
        self.wall += seconds + wall_step


@pytest.fixture
def clock(monkeypatch) -> SteppedClock:
    c = SteppedClock()
    monkeypatch.setattr(dashboard_hub, "time", c)
    return c


def _removed(camera: str, n: int) -> dict:
    return {"v": 1, "type": "camera_removed", "camera": camera, "ts": 0.0, "id": f"{n}-0", "group": "stream"}


def _shown(tiles: list[dict]) -> list[str]:
    return [t["camera"] for t in tiles]


def test_a_camera_added_again_after_the_clock_stepped_back_shows(redis_server, clock):
    """Before: the removal was timed on time.time(); a clock stepped back 60 s after a camera_removed kept the
    camera hidden for 60 s of polls after it was added again with the same id."""
    client = redis_server.client()
    client.hset(K.cameras, mapping={"a": _status(), "b": _status()})
    hub = Hub(redis_server.url)
    assert _shown(hub.poll(client)) == ["a", "b"]
    clock.tick(0.5)
    hub._take_events([_removed("b", 1)])
    assert _shown(hub.board.all()) == ["a"]
    clock.tick(0.5, wall_step=-60)  # NTP; then b is added again (its status never left Redis here)
    assert _shown(hub.poll(client)) == ["a", "b"]


def test_a_poll_that_read_a_camera_before_its_removal_hides_it_across_a_clock_step_back(redis_server, clock,
                                                                                        monkeypatch):
    """A poll reads the statuses, the camera_removed lands, then the poll commits what it read: before, with the
    wall clock stepped back in between, the removal looked older than the poll and the camera came back."""
    client = redis_server.client()
    client.hset(K.cameras, mapping={"a": _status(), "b": _status()})
    hub = Hub(redis_server.url, allow_control=True)
    assert _shown(hub.poll(client)) == ["a", "b"]

    def removal_lands_mid_poll(*args) -> bool:  # called after the reads, before the board takes them
        clock.tick(0.2, wall_step=-30)
        hub._take_events([_removed("b", 1)])
        return False
    monkeypatch.setattr(dashboard_hub, "control_reachable", removal_lands_mid_poll)
    clock.tick(1.0)
    assert _shown(hub.poll(client)) == ["a"]


def test_a_vanished_camera_keeps_its_tile_the_grace_whatever_the_wall_clock_does(redis_server, clock):
    """Before: the 10 s a camera whose status vanished keeps its tile were wall-clock seconds: a step forward
    (NTP) dropped it at once, a step back of an hour kept it 'no status' for an hour."""
    client = redis_server.client()
    client.hset(K.cameras, mapping={"a": _status(), "b": _status(), "c": _status()})
    hub = Hub(redis_server.url)
    hub.poll(client)
    client.hdel(K.cameras, "b")
    clock.tick(1.0)
    hub.poll(client)  # b missing from here
    clock.tick(1.0, wall_step=3600)
    assert _shown(hub.poll(client)) == ["a", "b", "c"] and hub.board.tiles["b"]["missing"]

    client.hdel(K.cameras, "c")
    clock.tick(1.0)
    hub.poll(client)  # c missing from here
    clock.tick(11.0, wall_step=-3600)
    assert _shown(hub.poll(client)) == ["a"]


def test_the_chart_starts_afresh_when_the_wall_clock_steps_back():
    """Before: after a step back the points stamped before it stayed (newer than the clock, so never pruned) and
    the new ones came after them: every page's chart drew back in time, for as long as the step."""
    board = Board(history_s=60)
    tile = make_tile({"camera": "a", "state": "running", "fps": 5.0}, None, None, None)
    for now in range(1000, 1006):
        board.update([tile], now=now)
    board.update([tile], now=700)  # the wall clock went back 306 s
    board.update([tile], now=701)
    assert [p[0] for p in board.histories()["a"]] == [700, 701]


def test_the_page_policy_names_every_directive_default_src_does_not_cover(redis_server):
    from starlette.testclient import TestClient

    with TestClient(create_app(Hub(redis_server.url))) as http:
        policy = http.get("/").headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
    assert directives["form-action"] == ["'none'"], policy
    assert directives["frame-ancestors"] == ["'none'"] and directives["base-uri"] == ["'none'"], policy


class _Sink(http.server.BaseHTTPRequestHandler):
    got: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.got.append(self.path)
        self.send_response(204)
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


def test_in_chromium_a_form_put_into_the_page_posts_nowhere_and_any_fps_is_taken(redis_server):
    """Before: no form-action in the policy (default-src does not cover it), so a form injected into the page
    posted wherever it named; and the fps field (step 0.1) refused 7.25 or 0.15 ("enter a valid value"), which
    the config takes."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("Playwright for Python is not installed (never `playwright install`: Debian's chromium is used)")
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} not found; on Debian: sudo apt-get install chromium")
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{sink.server_address[1]}/steal"
    try:
        with DashboardServer(redis_server.url, interval_s=0.2) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page()
                page.goto(server.url)
                valid = page.evaluate("""(values) => values.map((v) => {
                    const f = document.querySelector('#add-camera input[name="fps"]');
                    f.value = v;
                    return f.checkValidity();
                })""", ["7.25", "0.15", "5"])
                assert valid == [True, True, True], valid
                # the sink answers 204: a post that went out leaves the page where it is, with no violation
                violated = page.evaluate("""(target) => new Promise((resolve) => {
                    document.addEventListener("securitypolicyviolation", (e) => resolve(e.violatedDirective));
                    setTimeout(() => resolve(null), 5000);
                    const f = document.createElement("form");
                    f.method = "post";
                    f.action = target;
                    document.body.append(f);
                    f.submit();
                })""", target)
                assert (violated, _Sink.got) == ("form-action", [])
                assert page.url == server.url
            finally:
                browser.close()
    finally:
        sink.shutdown()
        sink.server_close()
