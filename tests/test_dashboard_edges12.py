"""The dashboard, audit 12: a camera's final status read as live rates, the page on a phone's screen, and the
detail view taking an operator's selection away at every tick. Browser checks in Debian's chromium through
Playwright, as tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import time

from pipeline import dashboard_data as data
from pipeline.dashboard import DashboardServer
from pipeline.status import mark_stale
from pipeline.testbed_dashboard import FakeController
import test_dashboard_browser
from running import wait_for
from workers.publish import keys

K = keys("hv")
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _loaded(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression


def test_a_camera_that_finished_shows_no_rate_or_age_of_its_last_seconds():
    """A camera's final status (stopped, ended, failed) is written once and never refreshed, so it is never stale.
    Before: its rates of the last 5 s before the end stayed on its tile ('down · ended', '25.0 analysed'), and its
    chart drew that rate at every poll, for as long as the entry stayed in Redis; a running camera keeps its own."""
    now = time.time()
    last = {"fps": 25.0, "decode_fps": 25.0, "latency_ms_p50": 40.0, "latency_ms_p95": 80.0, "heartbeat_ts": now - 3600}
    board = data.Board()
    for state in ("ended", "stopped", "failed"):
        status = {**mark_stale({"state": state, **last}, now), "camera": state}
        tile = data.make_tile(status, None, None, None)
        assert (tile["fps"], tile["decode_fps"], tile["age_p50"], tile["age_p95"]) == (0.0, 0.0, None, None), state
        board.update([tile], now, now)
        assert board.histories()[state][-1][1:] == (0.0, None, None), state
    running = data.make_tile({**mark_stale({"state": "running", **last, "heartbeat_ts": now}, now), "camera": "r"},
                             None, None, None)
    assert (running["fps"], running["decode_fps"], running["age_p50"]) == (25.0, 25.0, 40.0)


def test_the_page_fits_a_phones_screen(redis_server, browser):
    """Before, 360 px wide: the top bar (title, summary, source, Add camera) did not wrap and the add form's url
    field (44 characters) did not shrink, both wider than the screen (the page scrolled sideways, the field cut);
    the detail view kept its two columns and drew the camera's picture 100 px wide beside the stats."""
    client = redis_server.client()
    client.hset(K.cameras, mapping={"cam-01": _status(), "cam-02": _status(state="reconnecting")})
    with FakeController(redis_server.url), \
            DashboardServer(redis_server.url, interval_s=0.2, allow_control=True) as server:
        page = browser.new_page(viewport={"width": 360, "height": 740})
        try:
            _loaded(page, server.url)
            page.wait_for_selector("#add-open:not([hidden])")  # the controller is seen: Add camera is offered
            width = "() => [document.documentElement.scrollWidth, window.innerWidth]"
            scroll, inner = page.evaluate(width)
            assert scroll <= inner, f"the grid is {scroll} px wide on a {inner} px screen"
            page.click("#add-open")
            scroll, inner = page.evaluate(width)
            assert scroll <= inner, f"with the add form open the page is {scroll} px wide on a {inner} px screen"
            url_field = page.locator('#add-camera input[name="url"]').bounding_box()
            assert url_field["x"] >= 0 and url_field["x"] + url_field["width"] <= inner, url_field
            page.click("#add-cancel")
            page.goto(f"{server.url}#/camera/cam-01")
            page.wait_for_selector('#detail[data-camera="cam-01"] dd.fps:not(:empty)')
            scroll, inner = page.evaluate(width)
            assert scroll <= inner, f"the detail view is {scroll} px wide on a {inner} px screen"
            picture = page.locator("#detail .pic").bounding_box()["width"]
            assert picture >= inner * 0.75, f"the picture is {picture:.0f} px wide on a {inner} px screen"
        finally:
            page.close()


def test_a_selection_in_the_detail_view_survives_the_ticks(redis_server, browser):
    """Before: the detail view rebuilt its heads and zones tables and its recent events at every tick, changed or
    not: a selection in them was gone within a second, so an event's error could not be selected to be copied
    (the grid's tiles keep theirs: tests/test_dashboard_edges9.py)."""
    client = redis_server.client()
    reason = "SourceError: rtsp://***@10.0.0.4/live: Connection refused"
    client.hset(K.cameras, "cam", _status(heads=["people"]))
    client.hset(K.counts("cam"), mapping={"zone:door:people:person": 2})
    client.xadd(K.events, {"data": json.dumps({"v": 1, "type": "stream_down", "camera": "cam", "ts": time.time(),
                                               "reason": reason})})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, f"{server.url}#/camera/cam")
            page.wait_for_selector("#detail .recent li")
            for where, text in (("#detail .recent li", reason), ("#detail table.heads td", "people"),
                                ("#detail table.zones td", "door")):
                page.evaluate("""(where) => { window.selected = document.querySelector(where);
                                              getSelection().selectAllChildren(window.selected); }""", where)
                for fps in (7.0, 9.0):  # two ticks the detail view drew
                    client.hset(K.cameras, "cam", _status(heads=["people"], fps=fps))
                    wait_for(lambda: page.inner_text("#detail dd.fps").startswith(f"{fps:.1f}"), 20,
                             f"fps {fps} in the detail view")
                assert page.evaluate("() => window.selected.isConnected"), f"{where} was replaced"
                assert text in page.evaluate("() => getSelection().toString()"), where
            assert not page.errors, page.errors
        finally:
            page.close()


def test_the_tiles_are_greyed_while_the_dashboard_is_away(redis_server, browser):
    """Before: with the dashboard server gone (restarting, an upgrade) the page said so in the notice at its top,
    but its tiles went on reading as live (greyed only while Redis is away): with many cameras the notice is out of
    view. Greyed until the page is back on a stream."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    server = DashboardServer(redis_server.url, interval_s=0.2).start()
    port, page = server.port, test_dashboard_browser.new_page(browser)
    frozen = "() => document.body.classList.contains('frozen')"
    try:
        _loaded(page, server.url)
        assert not page.evaluate(frozen)
        server.stop()
        page.wait_for_function("() => document.querySelector('#notice').dataset.state === 'offline'")
        assert page.evaluate(frozen), "the tiles of a page that lost its dashboard are not greyed"
        server = DashboardServer(redis_server.url, interval_s=0.2, port=port).start()
        page.wait_for_function("() => !document.body.classList.contains('frozen')")
        assert page.evaluate("() => document.querySelector('#notice').hidden"), page.inner_text("#notice")
        assert not page.errors, page.errors
    finally:
        page.close()
        server.stop()
