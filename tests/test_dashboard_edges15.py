"""The dashboard, audit 15: what an operator read on a page left open through 33 minutes of cameras added, removed
and changed: a stopped camera's zones occupied as if now, and "no snapshot yet" under a camera whose snapshots
were switched off. Browser checks in Debian's chromium through Playwright, as tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import time

from pipeline import dashboard_data as data
from pipeline.dashboard import DashboardServer
from pipeline.status import mark_stale
import test_dashboard_browser
from workers.publish import keys

K = keys("hv")
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)
# a car park: 2 cars inside its zone "mid" at its last frame, 77 in / 71 out over its line "gate"
COUNTS = {"zone:mid:vehicles:car": 2, "zone:mid:people:person": 1, "line:gate:vehicles:car:in": 77,
          "line:gate:vehicles:car:out": 71}


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _loaded(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression


def _text(page, selector: str) -> str:
    """The text at ``selector`` without the bidi isolates the page puts around names."""
    return page.inner_text(selector).replace("\u2068", "").replace("\u2069", "")


def test_a_camera_not_up_says_its_zone_occupancy_is_its_last_frames():
    """Before: a camera stopped, reconnecting or stale had its counts hash's zone occupancy in its tile with
    nothing to tell it from objects inside now (its tracks were already hidden): 'mid: 1 person, 2 car' on a
    camera that is off. Its counts stay (its line totals are history), said to be of its last frame."""
    counts = data.parse_counts(COUNTS)
    now = time.time()
    statuses = {"running": {"state": "running", "heartbeat_ts": now},
                "stopped": {"state": "stopped", "heartbeat_ts": now - 600},
                "reconnecting": {"state": "reconnecting", "heartbeat_ts": now},
                "stale": {"state": "running", "heartbeat_ts": now - 600}}  # its service died
    tiles = {name: data.make_tile({**mark_stale(s, now), "camera": name}, None, counts, None)
             for name, s in statuses.items()}
    assert {name: t["occupancy_now"] for name, t in tiles.items()} == \
        {"running": True, "stopped": False, "reconnecting": False, "stale": False}
    assert all(t["counts"] == counts for t in tiles.values())


def test_the_page_marks_a_stopped_cameras_zone_occupancy_as_its_last_frames(redis_server, browser):
    """The grid's counts row and the detail view of a stopped camera (a run-time camera left over after the
    service restarted): before, 'mid: 1 person, 2 car' (and '2 inside') as if now, for as long as it stayed; a
    running camera's read as before."""
    client = redis_server.client()
    client.hset(K.cameras, mapping={"park": _status(state="stopped"), "live": _status()})
    for cam in ("park", "live"):
        client.hset(K.counts(cam), mapping=COUNTS)
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, server.url)
            page.wait_for_selector('.tile[data-camera="park"] dd.counts:not(:empty)')
            live, park = (_text(page, f'.tile[data-camera="{cam}"] dd.counts') for cam in ("live", "park"))
            assert live == "mid: 1 person, 2 car · gate: 77 in, 71 out"
            assert park == "mid: 1 person, 2 car (last frame) · gate: 77 in, 71 out"
            page.goto(f"{server.url}#/camera/park")
            page.wait_for_selector('#detail[data-camera="park"] table.zones td')
            rows = [_text(page, f"#detail table.zones tr:nth-child({i}) td:last-child") for i in (2, 3, 4)]
            assert rows == ["1 inside at its last frame", "2 inside at its last frame", "77 in / 71 out"], rows
            assert _text(page, "#detail dd.counts") == park
            page.goto(f"{server.url}#/camera/live")
            page.wait_for_selector('#detail[data-camera="live"] table.zones td')
            assert _text(page, "#detail table.zones tr:nth-child(2) td:last-child") == "1 inside"
            assert not page.errors, page.errors
        finally:
            page.close()


def test_a_tile_says_when_its_cameras_snapshots_are_off():
    """The camera's status says whether its snapshots are on (``snapshot_enabled``); only an explicit false says
    off: a status that does not say (an older writer) keeps the placeholder it had."""
    tile = lambda **s: data.make_tile({"camera": "c", "state": "running", **s}, None, None, None)  # noqa: E731
    assert tile(snapshot_enabled=False)["snapshots_off"] is True
    assert tile(snapshot_enabled=True)["snapshots_off"] is False
    assert tile()["snapshots_off"] is False


def test_the_placeholder_of_a_camera_whose_snapshots_are_off_says_so(redis_server, browser):
    """Before: a camera whose snapshots were switched off at run time (PATCH {"snapshot": {"enabled": false}}, its
    last picture deleted) showed "no snapshot yet" for ever, in its tile and its detail view, as if one were
    coming; a camera that has none yet still says so."""
    client = redis_server.client()
    client.hset(K.cameras, mapping={"off": _status(snapshot_enabled=False), "new": _status(),
                                    "fifo": _status(state="failed", last_error="is a FIFO (named pipe)")})
    placeholder = '.tile[data-camera="{}"] .placeholder'
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, server.url)
            page.wait_for_selector('.tile[data-camera="off"] dd.fps:not(:empty)')
            assert page.is_visible(placeholder.format("off"))
            assert page.inner_text(placeholder.format("off")) == "snapshots off for this camera"
            assert page.inner_text(placeholder.format("new")) == "no snapshot yet"
            assert page.inner_text(placeholder.format("fifo")) == "no picture (failed)"  # none is coming (op15g)
            page.goto(f"{server.url}#/camera/off")
            page.wait_for_selector('#detail[data-camera="off"] dd.fps:not(:empty)')
            assert page.is_visible("#detail .placeholder")
            assert page.inner_text("#detail .placeholder") == "snapshots off for this camera"
            assert not page.errors, page.errors
        finally:
            page.close()


def test_a_cameras_status_says_whether_its_snapshots_are_on_as_a_live_switch_leaves_them():
    """What the placeholder goes by: no status said it, so a camera switched off read "no snapshot yet" for ever."""
    from test_capture_recovery import MODEL_INFO, RecordingPublisher
    from workers.stream import CameraPipeline

    pub = RecordingPublisher()
    pipe = CameraPipeline({"id": "c", "url": "synthetic://street", "snapshot": {"enabled": True}}, None, MODEL_INFO,
                          pub)
    pipe.publish_status()
    off = pipe.camera.snapshot.model_copy(update={"enabled": False})
    pipe.update(pipe.camera.model_copy(update={"snapshot": off}))
    pipe.publish_status()
    assert (pub.statuses[0]["snapshot_enabled"], pub.statuses[-1]["snapshot_enabled"]) == (True, False)
    assert data.make_tile({"camera": "c", "state": "running", **pub.statuses[-1]}, None, None, None)["snapshots_off"]
