"""Zones and lines, a fifteenth look (workers/analytics.py, workers/analytics_settings.py): zones and lines that
cannot count at the frame's size (within one pixel, along the frame's edge), the counts' start of a line changed
live, and the occupants of a zone removed live. CameraAnalytics driven frame by frame, and CameraPipeline
without Ray writing its counts hash to a real Redis."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, parse_config
from workers.analytics import CameraAnalytics
from workers.analytics_settings import LineConfig, ZoneConfig
from workers.publish import Publisher, keys
from workers.settings import CameraConfig
from workers.stream import CameraPipeline

from test_analytics_edges12 import HEADS, SIZE, SQUARE, cars

MODEL_INFO = {"input_size": [192, 320], "heads": HEADS}


def across(a: CameraAnalytics, frames: range = range(38)) -> list[dict]:
    """A car driving left to right across the whole frame (its box clipped to it), 20 px a frame at 10 fps."""
    events = []
    for f in frames:
        x = 20 * f
        events += a.update("vehicles", cars([[max(0, x - 100), 200, min(640, x), 260]], [7]), f, f / 10)
    return events


def config_error(camera: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config({"cameras": [{"id": "c", "url": "synthetic://street", **camera}]})
    return str(err.value)


# --- 1. what cannot count at the frame's size is switched off and said, or refused at load --------------------

def test_a_normalised_zone_within_one_pixel_of_the_frame_is_switched_off_and_said():
    """[[0.5, 0.5], [0.5001, 0.5], [0.5001, 0.5001]] is 0.064 x 0.036 px of a 640x360 frame: it loaded, and a car
    parked on it was never inside (the same mistake in pixels is refused at load)."""
    tiny = ZoneConfig(name="z", polygon=[(0.5, 0.5), (0.5001, 0.5), (0.5001, 0.5001)])
    a = CameraAnalytics([tiny, ZoneConfig(name="ok", polygon=SQUARE)], [], HEADS, SIZE)
    assert a.errors == {"zones[0]": "zones[0].polygon: the zone lies within one pixel of the 640x360 frame "
                                    "(0.064 x 0.036 px): it can hold no object; zone 'z' is off"}
    assert list(a.zones) == ["ok"] and not [k for k in a.counts() if k.startswith("zone:z:")]


def test_a_normalised_line_within_one_pixel_of_the_frame_is_switched_off_and_said():
    near_zero = LineConfig(name="l", start=(0.5, 0.7), end=(0.5, 0.700000001))
    a = CameraAnalytics([], [near_zero, LineConfig(name="mid", start=(0.5, 0.0), end=(0.5, 1.0))], HEADS, SIZE)
    assert a.errors == {"lines[0]": "lines[0].end: the line lies within one pixel of the 640x360 frame "
                                    "(0 x 3.6e-07 px): no object can cross it; line 'l' is off"}
    assert [(e["line"], e["direction"]) for e in across(a)] == [("mid", "in")]


def test_a_pixel_line_along_the_frames_right_edge_is_switched_off_on_the_first_frame():
    """Boxes are clipped to the frame: no car gets past x = 640. The line loaded and never counted."""
    edge = LineConfig(name="edge", units="pixels", start=(640, 0), end=(640, 360))
    a = CameraAnalytics([], [edge], HEADS, SIZE)
    assert a.errors == {"lines[0]": "lines[0].end: the line lies along the right edge of the 640x360 frame "
                                    "(x = 640): no object gets past it; line 'edge' is off"}
    assert not a.lines and across(a) == []
    assert CameraAnalytics([], [edge], HEADS, (1280, 720)).errors == {}  # inside a larger frame: it counts there


def test_the_camera_says_a_zone_within_one_pixel_is_off_as_it_says_one_outside_the_frame():
    """The operator's view: the camera's last_error and an analytics_error event name the field and why."""
    sent = []
    pub = SimpleNamespace(keys=keys("hv"), set_hash=lambda key, fields: None, publish_event=sent.append)
    zone = {"name": "z", "polygon": [[0.5, 0.5], [0.5001, 0.5], [0.5001, 0.5001]]}
    pipe = CameraPipeline({"id": "cam", "url": "synthetic://street", "zones": [zone]}, None, MODEL_INFO, pub)
    item = SimpleNamespace(index=0, pts=0.0, wall=time.time(), size=(360, 640), picture=None)
    pipe._after_analytics(item, pipe._current_analytics(item))
    assert pipe.last_error.startswith("zones[0].polygon: the zone lies within one pixel of the 640x360 frame")
    assert [(e["type"], e["reason"]) for e in sent] == [("analytics_error", pipe.last_error)]


@pytest.mark.parametrize("start, end, edge", [
    ([1, 0], [1, 1], "right edge of the frame (x = 1)"),
    ([0, 0], [0, 1], "left edge of the frame (x = 0)"),  # counted only a box lying on the line (a tie): alike now
    ([0, 0], [1, 0], "top edge of the frame (y = 0)"),
    ([0.2, 1], [0.7, 1], "bottom edge of the frame (y = 1)"),
])
def test_a_normalised_line_along_an_edge_of_the_frame_is_refused_at_load(start, end, edge):
    """At any frame size: refused at load, as a line of length 0 is."""
    message = config_error({"lines": [{"name": "l", "start": start, "end": end}]})
    assert f"cameras[0].lines[0].end: the line lies along the {edge}: no object gets past it" in message


def test_pixel_zones_and_lines_that_need_no_frame_to_be_useless_are_refused_at_load():
    zone = {"name": "z", "units": "pixels", "polygon": [[100, 100], [100.5, 100], [100.5, 100.5]]}
    assert ("cameras[0].zones[0].polygon: the zone lies within one pixel (0.5 x 0.5 px): it can hold no object"
            in config_error({"zones": [zone]}))
    line = {"name": "l", "units": "pixels", "start": [0, 10], "end": [0, 300]}
    assert "lines[0].end: the line lies along the left edge of the frame (x = 0)" in config_error({"lines": [line]})


def test_guard_a_line_one_pixel_in_from_the_edge_still_loads_and_counts():
    """Of the two edge lines the operator drew, the left one counted the car by supervision's tie (a box lying on
    the line is on its right-hand side), the right one could not: both are refused now, not one pixel in."""
    left = LineConfig(name="l", units="pixels", start=(1, 0), end=(1, 360))
    assert [e["direction"] for e in across(CameraAnalytics([], [left], HEADS, SIZE))] == ["in"]


def test_guard_small_but_whole_pixel_zones_and_lines_and_the_whole_frame_still_load_and_count():
    whole = ZoneConfig(name="all", polygon=[(0, 0), (1, 0), (1, 1), (0, 1)])
    pixel = ZoneConfig(name="px", units="pixels", polygon=[(10, 10), (11, 10), (11, 11)])
    diagonal = LineConfig(name="d", start=(0, 0), end=(1, 1))
    short = LineConfig(name="s", units="pixels", start=(300, 230), end=(300, 231))
    a = CameraAnalytics([whole, pixel], [diagonal, short], HEADS, SIZE)
    assert a.errors == {} and list(a.zones) == ["all", "px"] and list(a.lines) == ["d", "s"]
    assert ("zone_entered", "all") in [(e["type"], e.get("zone")) for e in across(a)]


# --- 2. a line changed live says when its counts started -------------------------------------------------------

LINE = {"name": "gate", "start": [0.5, 0.3], "end": [0.5, 1.0]}
EXIT = {"name": "exit", "start": [0.8, 0.3], "end": [0.8, 1.0]}
ZONE_A = {"name": "a", "polygon": SQUARE}
ZONE_B = {"name": "b", "polygon": [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]]}


class Camera:
    """A CameraPipeline without Ray or a source, its analytics driven frame by frame into a real Redis."""

    def __init__(self, publisher: Publisher, client, **config):
        self.pub, self.client = publisher, client
        self.pipe = CameraPipeline({"id": "cam", "url": "synthetic://street", **config}, None, MODEL_INFO, publisher)

    def update(self, **fields) -> None:
        self.pipe.update(CameraConfig.model_validate({**self.pipe.camera.model_dump(), **fields}))

    def frame(self, index: int) -> dict[str, str]:
        """The counts hash after frame ``index`` (640x360), read back from Redis."""
        item = SimpleNamespace(index=index, pts=index / 10, wall=time.time(), size=(360, 640), picture=None)
        self.pipe._after_analytics(item, self.pipe._current_analytics(item))
        assert self.pub.flush(10)
        return {k.decode(): v.decode() for k, v in self.client.hgetall(keys("hv").counts("cam")).items()}


@pytest.fixture
def camera(redis_server):
    with Publisher(redis_server.url) as pub:
        yield lambda **config: Camera(pub, redis_server.client(), **config)


@pytest.mark.timeout(60)
def test_a_line_changed_live_says_in_the_counts_hash_since_when_it_counts(camera):
    """Its counts restart at 0 (documented), but the hash's only ``since`` stayed at the camera's start: a consumer
    read the moved line's few crossings as counted over the whole day."""
    cam = camera(lines=[LINE, EXIT])
    first = cam.frame(0)
    assert not [k for k in first if k.startswith("since:")]  # all count since the camera's start
    time.sleep(0.01)
    before = time.time()
    cam.update(lines=[{**LINE, "start": [0.4, 0.3]}, EXIT])
    counts = cam.frame(1)
    after = time.time()
    assert counts["since"] == first["since"]
    assert round(before, 3) <= float(counts["since:line:gate"]) <= round(after, 3) + 0.001
    assert "since:line:exit" not in counts  # unchanged: it counts on, since the camera's start
    assert counts["line:gate:vehicles:car:in"] == "0"
    time.sleep(0.01)
    assert cam.frame(2)["since:line:gate"] == counts["since:line:gate"]  # stamped once, not on every frame


@pytest.mark.timeout(60)
def test_a_line_added_live_counts_since_then_and_keeps_it_through_other_changes(camera):
    cam = camera(lines=[EXIT], zones=[ZONE_A])
    cam.frame(0)
    time.sleep(0.01)
    cam.update(lines=[EXIT, LINE])
    since = cam.frame(1)["since:line:gate"]
    cam.update(zones=[ZONE_B])  # another change: the line's counts go on
    cam.update(heads=["vehicles"])  # the heads too (CameraAnalytics.with_heads)
    counts = cam.frame(2)
    assert counts["since:line:gate"] == since and "since:line:exit" not in counts


def test_a_changed_line_is_stamped_with_the_time_of_the_change():
    a = CameraAnalytics([], [LineConfig(**LINE)], HEADS, SIZE)
    b = a.reconfigured([], [LineConfig(**{**LINE, "min_crossing_frames": 2})], now=1000.25)
    assert b.counts()["since:line:gate"] == 1000.25 and "since:line:gate" not in a.counts()


# --- 3. a zone removed live ends its occupants ------------------------------------------------------------------

def parked_in_both():
    """Zones a and b (b around a), a car parked in both since 0.0 s."""
    a = CameraAnalytics([ZoneConfig(**ZONE_A), ZoneConfig(**ZONE_B)], [], HEADS, SIZE)
    events = []
    for f in range(20):
        events += a.update("vehicles", cars([[280, 150, 360, 200]], [3]), f, f / 10)
    assert [(e["type"], e["zone"]) for e in events] == [("zone_entered", "a"), ("zone_entered", "b")]
    return a


def test_a_zone_removed_live_ends_its_occupants_with_zone_left_reason_removed():
    """A PATCH without zone a dropped its car silently: a consumer keeping occupancy from the events had it
    inside for ever. Now its zone_left comes on the first analysed frame under the new settings."""
    a = parked_in_both().reconfigured([ZoneConfig(**ZONE_B)], [])
    assert a.undecided()  # the motion gate lets the next frame through for it
    events = a.update("vehicles", cars([[280, 150, 360, 200]], [3]), 20, 2.0)
    assert events == [{"type": "zone_left", "head": "vehicles", "track_id": 3, "class": "car", "zone": "a",
                       "frame": 20, "pts": 2.0, "entered_pts": 0.0, "occupancy": 0, "left_pts": 1.9,
                       "dwell_s": 1.9, "reason": "removed"}]
    assert a.update("vehicles", cars([[280, 150, 360, 200]], [3]), 21, 2.1) == []  # once; zone b keeps its car
    assert a.counts() == {"zone:b:vehicles:car": 1, "zone:b:vehicles:bicycle": 0, "zone:b:people:person": 0}


def test_a_zone_switched_off_by_a_live_change_ends_its_occupants_too():
    off = ZoneConfig(name="a", units="pixels", polygon=[(100, 100), (900, 100), (900, 300)])  # outside 640x360
    a = parked_in_both().reconfigured([off, ZoneConfig(**ZONE_B)], [])
    assert "zones[0]" in a.errors
    assert [(e["zone"], e["reason"]) for e in a.update("people", cars([], []), 20, 2.0)] == [("a", "removed")]


def test_guard_a_removed_zones_occupants_of_a_head_dropped_since_go_without_events_as_on_the_drop():
    a = parked_in_both().reconfigured([ZoneConfig(**ZONE_B)], []).with_heads({"people": ["person"]})
    assert a.update("people", cars([], []), 20, 2.0) == []


@pytest.mark.timeout(60)
def test_guard_the_counts_hash_loses_a_removed_zones_and_a_removed_lines_fields(camera):
    cam = camera(zones=[ZONE_A, ZONE_B], lines=[LINE, EXIT])
    assert {"zone:a:vehicles:car", "line:exit:people:person:in"} <= set(cam.frame(0))
    cam.update(zones=[ZONE_B], lines=[LINE])
    counts = cam.frame(1)
    assert not [k for k in counts if k.startswith(("zone:a:", "line:exit:", "since:line:exit"))]
    assert "zone:b:vehicles:car" in counts and "line:gate:vehicles:car:out" in counts


@pytest.mark.timeout(60)
def test_a_cameras_last_zone_removed_live_ends_its_occupants_too(camera, redis_server):
    """With no zone or line left the camera drops its analytics on the next frame: that frame ends the occupants
    (zone_left, reason removed) as a removed zone's among others."""
    cam = camera(zones=[ZONE_A])
    cam.frame(0)
    for f in range(1, 20):
        cam.pipe.analytics.update("vehicles", cars([[280, 150, 360, 200]], [3]), f, f / 10)
    cam.update(zones=[])
    assert cam.frame(20) == {}  # the counts hash is gone
    events = [json.loads(f[b"data"]) for _, f in redis_server.client().xrange(keys("hv").events)]
    left = [(e["zone"], e["track_id"], e["reason"]) for e in events if e["type"] == "zone_left"]
    assert left == [("a", 3, "removed")], events
