"""The dashboard with hostile or odd text in Redis: anything another program (a hostile RTSP server's error
message, a camera id, a zone name, an event field, a status edited by hand) wrote there must show literally,
never run, never break the page's layout, and never grow the page without bound. Python-side checks of
pipeline/dashboard_data.py first, then Debian's chromium driven by Playwright (as tests/test_dashboard_browser.py).
"""

from __future__ import annotations

import json
import time

import pytest

from pipeline import dashboard_data as data
from pipeline.dashboard import DashboardServer
from pipeline.dashboard_hub import Hub
import test_dashboard_browser
from workers.publish import keys

K = keys("hv")
# would set window.__pwned if any of it were ever parsed as HTML or a URL
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><a href="javascript:window.__pwned=3">'
ZONE = '<img src=x onerror="window.__pwned=4">&amp;'  # no ':', the separator of a counts field


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


# --- dashboard_data ---------------------------------------------------------------------------------------------

def test_scrub_cuts_a_huge_string_after_hiding_its_credentials():
    """Before: a megabyte last_error or event field went whole to every page at every tick (and into the 500
    events a page keeps); cut before redaction, a URL's password could lose the '@' that marks it as one."""
    secret = "rtsp://admin:Pw-7Kq@10.0.0.1/live"
    out = data.scrub({"last_error": "x" * 990 + secret + "y" * 10**6, "ok": "short"}, [])
    assert len(out["last_error"]) <= 2000
    assert "Pw-7Kq" not in out["last_error"] and "Pw-7" not in out["last_error"]
    assert out["ok"] == "short"


@pytest.mark.parametrize("what, status, counts", [
    ("a zone named '' beside another zone", {}, {"zone::people:person": 1, "zone:door:people:person": 2}),
    ("a status whose state is a list", {"state": ["running"]}, {"zone:door:people:person": 2}),
    ("a status whose state is an object", {"state": {"a": 1}}, {"zone:door:people:person": 2}),
])
def test_an_odd_name_or_state_keeps_the_tile_readable(redis_server, what, status, counts):
    """Before: sorting the counts compared None with a name (a zone named "" became None), or a list
    state was looked up as a dict key: TypeError, and the whole tile became 'unreadable', its fps, counts and
    picture gone."""
    client = redis_server.client()
    client.hset(K.cameras, "odd", _status(**status))
    client.hset(K.counts("odd"), mapping=counts)
    client.hset(K.snapshot("odd"), mapping={"jpeg": b"\xff\xd8x\xff\xd9", "frame": 3})
    tile = {t["camera"]: t for t in Hub(redis_server.url).poll(client)}["odd"]
    assert tile["detail"] != "unreadable" and tile["error"] is None, (what, tile["error"])
    assert tile["counts"] and tile["snapshot"] and tile["fps"] == 5.0, what


# --- the page in a browser --------------------------------------------------------------------------------------

browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression
    return page


def wait_ticks(page, n: int = 2) -> None:
    """Until the page took ``n`` more ticks (a tick renders the tiles and the camera filter)."""
    page.evaluate("""(n) => new Promise((done) => {
        const source = new EventSource("api/stream"); let seen = 0;
        source.addEventListener("tick", () => { if (++seen > n) { source.close(); done(); } });
    })""", n)


def test_hostile_text_shows_literally_and_never_runs(redis_server, browser):
    """Normal-path guard (passes on the original code too): markup in a camera id, an error, a state, a zone,
    a line, a head and an event's fields is shown as text everywhere, in the grid, the feed and the detail."""
    client = redis_server.client()
    client.hset(K.cameras, XSS, _status(state="reconnecting", last_error=XSS, heads=[XSS], url=XSS))
    client.hset(K.counts(XSS), mapping={f"zone:{ZONE}:people:person": 1, f"line:{ZONE}:people:person:in": 2})
    client.xadd(K.events, {"data": json.dumps({"v": 1, "type": XSS, "camera": XSS, "ts": time.time(),
                                               "zone": XSS, "head": XSS, "note": XSS})})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = open_page(browser, server.url)
        tile = page.locator(".tile").first
        assert tile.get_attribute("data-camera") == XSS
        assert tile.locator(".name").inner_text() == XSS
        assert tile.locator(".error").inner_text() == XSS
        assert XSS in page.locator("#feed li").first.inner_text()
        page.locator(".tile .name").first.click()
        page.wait_for_selector("#detail table.zones td")
        for where in ("#detail h2", "#detail .url", "#detail table.heads", "#detail .recent"):
            assert XSS in page.inner_text(where), where
        assert page.inner_text("#detail table.zones").count(ZONE) == 2
        assert f"{ZONE}: 1 person" in tile.locator("dd.counts").inner_text().replace("\u2068", "").replace("\u2069", "")
        wait_ticks(page)
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator("#grid script, #detail script, #feed script, #grid img:not(.snap)").count() == 0
        assert not page.errors, page.errors


def test_the_camera_filter_stays_bounded_whatever_events_name(redis_server, browser):
    """Before: an event without a camera, or with a number for one, added one more option to the camera filter at
    every tick (its value, a string, never equal to the event's camera), 86400 a day; and an option per camera
    ever named stayed for good, past the 500 events the page keeps."""
    client = redis_server.client()
    client.hset(K.cameras, "cam-01", _status())
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = open_page(browser, server.url)
        pipe = client.pipeline()
        for i in range(700):  # a new camera name per event, live (a page's first backlog holds only 300)
            pipe.xadd(K.events, {"data": json.dumps({"v": 1, "type": "stream_up", "camera": f"ev-{i:03d}",
                                                     "ts": time.time()})})
        for extra in ({}, {"camera": 5}, {"camera": None}, {"camera": ["a"]}, {"camera": "last"}):
            pipe.xadd(K.events, {"data": json.dumps({"v": 1, "type": "stream_up", "ts": time.time(), **extra})})
        pipe.execute()
        page.wait_for_selector('#feed li[data-camera="last"]', state="attached")
        wait_ticks(page)
        options = lambda: page.evaluate("() => document.querySelectorAll('#filter-camera option').length")  # noqa
        before = options()
        wait_ticks(page, 5)
        after = options()
        assert after == before, f"the camera filter grew from {before} to {after} options in 5 ticks"
        assert after <= 1 + 1 + 500, f"{after} options for 1 camera and 500 kept events"
        assert page.locator('#filter-camera option[value="cam-01"]').count() == 1
        assert page.locator('#filter-camera option[value="ev-699"]').count() == 1
        assert page.locator('#filter-camera option[value="last"]').count() == 1
        assert not page.errors, page.errors


def test_long_texts_do_not_widen_the_page(redis_server, browser):
    """Before: a long state, camera name in an event or zone name (no space to wrap at) widened the page far past
    the window: the state label does not wrap, the camera filter is as wide as its longest option, and the detail
    view's heading and tables did not wrap."""
    client = redis_server.client()
    client.hset(K.cameras, "cam-01", _status(state="S" * 900, last_error="E" * 900))
    client.hset(K.cameras, "C" * 400, _status())
    client.hset(K.counts("cam-01"), mapping={f"zone:{'Z' * 600}:people:person": 1})
    client.xadd(K.events, {"data": json.dumps({"v": 1, "type": "stream_up", "camera": "V" * 900,
                                               "ts": time.time(), "note": "N" * 900})})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = open_page(browser, server.url)
        width = "() => [document.documentElement.scrollWidth, window.innerWidth]"
        scroll, inner = page.evaluate(width)
        assert scroll <= inner, f"the grid is {scroll} px wide in a {inner} px window"
        for camera in ("cam-01", "C" * 400):
            page.goto(f"{server.url}#/camera/{camera}")
            page.wait_for_selector(f'#detail[data-camera="{camera}"] dd.fps:not(:empty)')
            for size in ({"width": 1400, "height": 900}, {"width": 700, "height": 900}):  # one column below 900
                page.set_viewport_size(size)
                scroll, inner = page.evaluate(width)
                assert scroll <= inner, f"the detail of {camera[:10]} is {scroll} px wide in a {inner} px window"
        assert not page.errors, page.errors


READS_LEFT_TO_RIGHT = """([selector, word]) => {
    // whether ``word`` inside the element is drawn left to right (its first letter left of its last)
    const root = document.querySelector(selector);
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const at = node.data.indexOf(word);
        if (at < 0) continue;
        const box = (i) => { const r = document.createRange(); r.setStart(node, i); r.setEnd(node, i + 1);
                             return r.getBoundingClientRect().left; };
        return box(at) < box(at + word.length - 1);
    }
    return null;
}"""


def test_a_right_to_left_override_in_a_name_does_not_reverse_the_rest_of_the_line(redis_server, browser):
    """Before: a camera, zone or head named with a U+202E (right-to-left override) at its end reversed everything
    after it on its line: the feed showed 'zone_entered' as 'deretne_enoz' and a tile's 'vehicles 0' as
    '0 selcihev' (a name from Redis could change what the rest of the line seems to say)."""
    client = redis_server.client()
    rlo = "\u202e"
    client.hset(K.cameras, "cam-01", _status(heads=[f"a{rlo}", "vehicles"]))
    client.xadd(K.detections("cam-01"), {"data": json.dumps({"v": 1, "camera": "cam-01", "frame": 1, "ts": time.time(),
                                                             "heads": [f"a{rlo}", "vehicles"], "detections": []})})
    client.hset(K.counts("cam-01"), mapping={f"zone:a{rlo}:people:person": 1, "zone:door:people:person": 2})
    client.xadd(K.events, {"data": json.dumps({"v": 1, "type": "zone_entered", "camera": f"cam{rlo}", "ts": time.time(),
                                               "zone": f"z{rlo}", "head": "people", "class": "person",
                                               "track_id": 3, "occupancy": 2})})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = open_page(browser, server.url)
        tile = '.tile[data-camera="cam-01"]'
        checks = (("#feed li .type", "zone_entered"), ("#feed li", "occupancy"),
                  (f"{tile} dd.tracks", "vehicles"), (f"{tile} dd.counts", "door"))
        reversed_ = [f"{word} in {selector}" for selector, word in checks
                     if page.evaluate(READS_LEFT_TO_RIGHT, [selector, word]) is not True]
        assert not reversed_, f"reversed: {reversed_}"
        assert f"cam{rlo}" in page.inner_text("#feed li .cam") and not page.errors
