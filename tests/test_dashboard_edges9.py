"""The dashboard left open for days (audit 9), in Debian's chromium through Playwright as
tests/test_dashboard_browser.py: an operator's focus and text selection in a tile across ticks, a slow link
with pictures newer than it can load, a refusal that is not JSON (a proxy's), and a page open across an upgrade.
"""

from __future__ import annotations

import json
import shutil
import time

from pipeline import dashboard, dashboard_data as data
from pipeline.dashboard import DashboardServer
from pipeline.testbed_dashboard import FakeController
import test_dashboard_browser
from running import wait_for
from workers.publish import detection_message, encode, keys

K = keys("hv")
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64 + b"\xff\xd9"  # served as is; the page never needs to decode it here


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _loaded(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression


def test_focus_and_a_selection_in_a_tile_survive_the_ticks(redis_server, browser):
    """Before: every tick appended every tile again (moving it: a focused link lost its focus) and rewrote all
    its text: a keyboard user was thrown back to the top each second, and an error could not be selected to copy."""
    client = redis_server.client()
    error = "SourceError: rtsp://***@10.0.0.4/live: Connection refused"
    client.hset(K.cameras, mapping={"a": _status(), "b": _status(state="reconnecting", last_error=error)})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, server.url)
            page.focus('.tile[data-camera="b"] a.name')
            page.evaluate("""() => { const e = document.querySelector('.tile[data-camera="b"] .error');
                                    getSelection().selectAllChildren(e); }""")
            for fps in (7.0, 9.0):  # two ticks the page drew
                client.hset(K.cameras, "a", _status(fps=fps))
                wait_for(lambda: page.inner_text('.tile[data-camera="a"] dd.fps').startswith(f"{fps:.1f}"), 20,
                         f"fps {fps} on the tile")
            assert page.evaluate("() => document.activeElement.closest('.tile')?.dataset.camera") == "b"
            assert page.evaluate("() => getSelection().toString()") == error
            assert not page.errors, page.errors
        finally:
            page.close()


def test_a_slow_link_loads_one_picture_per_tile_at_a_time(redis_server, browser):
    """Before: each tick naming a newer picture started one more request while the last still loaded: on a link
    slower than the pictures (100 cameras over a VPN) requests for pictures long replaced piled up without end."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    client.hset(K.snapshot("cam"), mapping={"jpeg": JPEG, "frame": 0, "ts": time.time()})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        held = []  # the link: nothing arrives until the test lets it (routes are called inside page calls only)
        try:
            page.route("**/snapshot.jpg*", lambda route: held.append(route))
            _loaded(page, server.url)
            for frame in range(1, 4):
                client.hset(K.snapshot("cam"), mapping={"frame": frame, "ts": time.time()})
                wait_for(lambda: server.hub.snapshot("cam")[0] == f"f{frame}", 20, f"frame {frame} read")
                wait_for(lambda: page.wait_for_timeout(50) or held, 20, "the page's request for a newer picture")
            page.wait_for_timeout(400)  # more ticks (routes are called inside page calls only)
            assert len(held) == 1, [r.request.url for r in held]
            held.pop().fulfill(status=200, content_type="image/jpeg", body=JPEG)  # it arrives: the newest next
            wait_for(lambda: page.wait_for_timeout(50) or held, 20, "a request for the newest picture")
            assert held[0].request.url.endswith("v=f3"), held[0].request.url
        finally:
            page.close()  # with the requests still held


def test_a_hidden_page_loads_no_picture_until_shown(redis_server, browser):
    """Before: a tab in the background drew every tick and loaded every new picture, 100 cameras' each second for
    days, that nobody saw."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    client.hset(K.snapshot("cam"), mapping={"jpeg": JPEG, "frame": 0, "ts": time.time()})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        held = []
        try:
            page.route("**/snapshot.jpg*", lambda route: held.append(route))
            _loaded(page, server.url)
            page.evaluate("""() => { Object.defineProperty(document, "hidden", {configurable: true, get: () => true});
                                    document.dispatchEvent(new Event("visibilitychange")); }""")
            for frame in range(1, 4):
                client.hset(K.snapshot("cam"), mapping={"frame": frame, "ts": time.time()})
                wait_for(lambda: server.hub.snapshot("cam")[0] == f"f{frame}", 20, f"frame {frame} read")
            page.wait_for_timeout(500)  # ticks naming frame 3 (routes are called inside page calls only)
            assert not held, [r.request.url for r in held]
            page.evaluate("""() => { delete document.hidden;
                                    document.dispatchEvent(new Event("visibilitychange")); }""")
            wait_for(lambda: page.wait_for_timeout(50) or held, 20, "a request for the newest picture once shown")
            assert held[0].request.url.endswith("v=f3"), held[0].request.url
        finally:
            page.close()  # with the requests still held


def test_a_camera_not_running_shows_no_tracks_of_its_last_frame():
    """Before: a camera reconnecting for an hour, or added again and still starting, showed its last detection
    message's tracks as the tracks now (its tile's 'tracks', its detail view's 'tracks now')."""
    detection = {"heads": ["people"], "detections": [{"head": "people", "track_id": 3}]}
    tracks = {state: data.make_tile({"camera": "c", "state": state, "heads": ["people"]}, detection, None, None)
              ["tracks"] for state in ("running", "reconnecting", "starting", "failed")}
    assert tracks == {"running": {"people": 1}, "reconnecting": {}, "starting": {}, "failed": {}}


def test_the_last_picture_of_a_running_camera_whose_pictures_stopped_is_dated(redis_server, browser):
    """Before: snapshots switched off on a running camera leave its last picture in Redis, and the page showed
    it as live for as long as the camera ran (only a camera not up had its picture dated)."""
    client = redis_server.client()
    now = time.time()
    client.hset(K.cameras, mapping={"stopped-pictures": _status(), "live": _status()})
    for cam, taken in (("stopped-pictures", now - 600), ("live", now - 1)):
        client.hset(K.snapshot(cam), mapping={"jpeg": JPEG, "frame": 7, "ts": taken})
        client.xadd(K.detections(cam), {"data": encode(detection_message(cam, 9000, 900.0, now, 40.0, (640, 360),
                                                                          [], ["people"]))})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, server.url)
            when = '.tile[data-camera="{}"] .pic .when'
            assert page.is_visible(when.format("stopped-pictures")), page.inner_html("#grid")
            assert "last picture" in page.inner_text(when.format("stopped-pictures"))
            assert page.is_hidden(when.format("live"))
        finally:
            page.close()


def test_a_refusal_that_is_not_json_shows_its_http_status(redis_server, browser):
    """Before: a proxy's 502 page in answer to Remove showed 'failed: SyntaxError: Unexpected token <...'."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    with FakeController(redis_server.url), \
            DashboardServer(redis_server.url, interval_s=0.2, allow_control=True) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            page.route("**/api/cameras/cam", lambda route: route.fulfill(
                status=502, content_type="text/html", body="<html><body>Bad Gateway</body></html>"))
            page.on("dialog", lambda dialog: dialog.accept())
            _loaded(page, server.url + "#/camera/cam")
            page.click("#detail button.remove", timeout=20_000)  # shown once the controller is seen
            page.wait_for_selector('#detail .result[data-status="rejected"]', timeout=20_000)
            shown = page.inner_text("#detail .result")
            assert "502" in shown and "SyntaxError" not in shown, shown
        finally:
            page.close()


def test_a_page_open_across_an_upgrade_loads_the_new_script(redis_server, browser, tmp_path, monkeypatch):
    """Before: a page left open went on running the old app.js against the upgraded server (its stream
    reconnects by itself) until someone reloaded it, maybe days later."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    server = DashboardServer(redis_server.url, interval_s=0.2).start()
    port, page = server.port, test_dashboard_browser.new_page(browser)
    try:
        _loaded(page, server.url + "#/camera/cam")
        page.evaluate("() => { window.hvOld = true; }")
        server.stop()
        upgraded = tmp_path / "static"
        shutil.copytree(dashboard.STATIC, upgraded)
        with open(upgraded / "style.css", "a") as f:
            f.write("\n.upgraded { color: red; }\n")
        monkeypatch.setattr(dashboard, "STATIC", upgraded)
        server = DashboardServer(redis_server.url, interval_s=0.2, port=port).start()
        from playwright.sync_api import Error as PageError

        def loaded_anew() -> bool:
            try:
                return page.evaluate("() => !window.hvOld && !!window.hvLoaded")
            except PageError:  # "Execution context was destroyed": the reload is under way
                return False

        wait_for(loaded_anew, 30, "the page loaded anew")
        assert page.url.endswith("#/camera/cam")  # where the operator was
        page.evaluate("() => { window.hvNew = true; }")
        time.sleep(0.5)
        assert page.evaluate("() => window.hvNew")  # once: the new page does not load again
        assert not page.errors, page.errors
    finally:
        page.close()
        server.stop()
