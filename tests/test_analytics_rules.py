"""Zones and lines: events a user saw wrong (a second zone_entered for someone who never left, a visit split by
one missed frame, an occupant handed to a passer-by) and settings that validated but counted nothing."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from pipeline.config import ConfigError, parse_config
from workers.analytics import CameraAnalytics
from workers.analytics_settings import ZoneConfig

HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}
SIZE = (640, 360)
SQUARE = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]  # normalised: x 160..480, y 90..270


def people(boxes, ids):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return sv.Detections(xyxy=boxes, confidence=np.full(len(boxes), 0.9), class_id=np.zeros(len(boxes), int),
                         tracker_id=np.asarray(ids, int).reshape(-1),
                         data={"class_name": np.array(["person"] * len(boxes))})


def standing_at(x, y, h=60.0, w=20.0):
    """A box whose bottom centre (the default anchor) is at (x, y)."""
    return [x - w / 2, y - h, x + w / 2, y]


def kinds(events):
    return [(e["type"], e["track_id"]) for e in events]


def test_a_zone_changed_live_does_not_enter_its_occupants_again():
    """An operator tweaks a zone while someone stands in it: that person got a second zone_entered (entered_pts
    the time of the change, no zone_left between); now the visit goes on, and a polygon moved away from them
    ends it with one zone_left that keeps the original entry time."""
    zone = ZoneConfig(name="door", polygon=SQUARE)
    a = CameraAnalytics([zone], [], HEADS, SIZE)
    events = []
    for f in range(10):
        events += a.update("people", people([standing_at(300, 200)], [7]), f, f / 10)
    assert kinds(events) == [("zone_entered", 7)]
    a = a.reconfigured([zone.model_copy(update={"min_outside_s": 1.0})], [])
    for f in range(10, 20):
        events += a.update("people", people([standing_at(300, 200)], [7]), f, f / 10)
    assert kinds(events) == [("zone_entered", 7)]
    moved = ZoneConfig(name="door", polygon=[[0.8, 0.1], [1.0, 0.1], [1.0, 0.9], [0.8, 0.9]], min_outside_s=1.0)
    a = a.reconfigured([moved], [])
    for f in range(20, 40):
        events += a.update("people", people([standing_at(300, 200)], [7]), f, f / 10)
    assert kinds(events) == [("zone_entered", 7), ("zone_left", 7)]
    assert events[1]["entered_pts"] == 0.0 and events[1]["reason"] == "exited"
    assert sum(a.zones["door"].occupancy().values()) == 0


def walk_at(fps, missed_x=None, seconds=12.0):
    """A walker at 40 px/s (0.67 box heights a second: moving) through the zone; the detector misses it on the
    one frame at which it is at ``missed_x`` or just past it."""
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE)], [], HEADS, SIZE)
    events = []
    for f in range(int(seconds * fps)):
        t = f / fps
        x = 120 + 40 * t
        missed = missed_x is not None and missed_x <= x < missed_x + 40 / fps
        events += a.update("people", people([], []) if missed else people([standing_at(x, 200)], [1]), f, t)
    return events


@pytest.mark.parametrize("fps", [2.0, 1.0])
def test_one_missed_detection_at_a_low_analysed_rate_does_not_split_a_visit(fps):
    """At 2 fps (the frame-age budget lowers the analysed rate down to 1 fps) one missed frame is 0.5 s unseen,
    which made a walker 'lost': zone_left after 0.5 s, then a second zone_entered for the same track."""
    events = walk_at(fps, missed_x=300)
    assert [(e["type"], e.get("reason")) for e in events] == [("zone_entered", None), ("zone_left", "exited")]
    assert events[1]["dwell_s"] == pytest.approx(walk_at(fps)[1]["dwell_s"])


def test_an_occupant_gone_at_a_low_analysed_rate_still_leaves():
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE)], [], HEADS, SIZE)
    events = []
    for f in range(12):  # 2 fps: walks in, then vanishes mid-zone at 2.0 s (e.g. into a doorway)
        t = f / 2
        events += a.update("people", people([standing_at(200 + 40 * t, 200)], [1]) if t < 2 else people([], []), f, t)
    assert [(e["type"], e.get("reason"), e["pts"]) for e in events] == [
        ("zone_entered", None, 0.5), ("zone_left", "lost", 2.5)]


def test_a_passer_by_tracked_before_does_not_take_over_the_occupant_it_hides():
    """A (track 1) stands just inside the zone's edge; B (track 2), tracked for a while outside, walks in past it
    and hides it for a few frames. B took A over on its first frame inside (same class, boxes overlapping): A
    then got a second zone_entered, B's visit none, and B's exit was reported as A's. A takeover is for a new
    track that appeared after the occupant vanished (a parked car's detection flickering)."""
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE)], [], HEADS, SIZE)
    events = []
    for f in range(60):
        t = f / 10
        xb = 15 + 100 * t
        boxes, ids = ([standing_at(170, 200)], [1]) if abs(xb - 170) >= 15 else ([], [])
        events += a.update("people", people(boxes + [standing_at(xb, 200)], ids + [2]), f, t)
    assert kinds(events) == [("zone_entered", 1), ("zone_entered", 2), ("zone_left", 2)]
    assert "track_ids" not in events[2]
    assert [(o.track_id, o.current_id) for o in a.zones["z"].occupants.values()] == [(1, 1)]


def cam(**kw):
    return {"id": "c1", "url": "synthetic://street", **kw}


@pytest.mark.parametrize("camera, expected", [
    (cam(zones=[{"name": "z", "units": "pixels", "polygon": SQUARE}]),
     r"cameras\[0\]\.zones\[0\]\.polygon: every point is within 0\.\.1 .* look like normalized coordinates"),
    (cam(lines=[{"name": "l", "units": "pixels", "start": [0.5, 0.0], "end": [0.5, 1.0]}]),
     r"cameras\[0\]\.lines\[0\]\.end: every point is within 0\.\.1 .* look like normalized coordinates"),
])
def test_normalized_points_under_units_pixels_are_refused(camera, expected):
    """They validated, and the zone or line (inside the top-left pixel) silently counted nothing."""
    with pytest.raises(ConfigError, match=expected):
        parse_config({"cameras": [camera]})
