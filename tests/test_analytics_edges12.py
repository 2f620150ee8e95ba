"""Zones and lines, a twelfth look (workers/analytics.py, workers/analytics_settings.py): what a zone remembers of
a track the tracker may still give back, and polygons that fold back on themselves in decimal coordinates."""

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


def cars(boxes, ids):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return sv.Detections(xyxy=boxes, confidence=np.full(len(boxes), 0.9), class_id=np.zeros(len(boxes), int),
                         tracker_id=np.asarray(ids, int).reshape(-1),
                         data={"class_name": np.array(["car"] * len(boxes))})


def kinds(events):
    return [(e["type"], e["track_id"]) for e in events]


# --- 1. a track the tracker gives back after lost_s is not a new track ----------------------------------------

def test_a_car_hidden_longer_than_lost_s_and_given_back_its_id_does_not_take_over_the_occupant_it_stood_behind():
    """Car 2 is tracked outside the zone, then hidden behind parked car 1 for 5 s: longer than the zone's lost_s
    (3 s), shorter than the tracker's horizon (re-ID waits 8 s). Car 1 drives off and car 2, given its id back, is
    seen where car 1 stood. The zone had forgotten car 2 after lost_s, took it for a new track and handed car 1's
    visit on to it: car 1 never left, car 2 never entered. Only a track first seen after the occupant vanished
    may take it over (docs/architecture.md, "takeover")."""
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE)], [], HEADS, SIZE, horizon_s=8.0)
    parked, behind = [250, 150, 330, 200], [255, 152, 335, 202]
    events = []
    for f in range(100):
        t = f / 10
        if t < 1.0:  # car 2 drives up outside the zone, car 1 parked inside
            det = cars([parked, [500, 150, 580, 200]], [1, 2])
        elif t < 6.0:  # car 2 behind car 1
            det = cars([parked], [1])
        else:  # car 1 gone, car 2 seen at its place
            det = cars([behind], [2])
        events += a.update("vehicles", det, f, t)
    assert kinds(events) == [("zone_entered", 1), ("zone_entered", 2), ("zone_left", 1)]
    assert events[2]["reason"] == "lost" and events[2]["dwell_s"] == pytest.approx(5.9)
    assert "track_ids" not in events[2]


def test_guard_at_the_default_horizon_a_track_back_after_lost_s_still_takes_over():
    """The tracker's default horizon (2 s) is shorter than lost_s: a track gone for longer than that is not
    given back, so one seen again after lost_s is a flickering detection's new track, as before."""
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE)], [], HEADS, SIZE, horizon_s=2.0)
    parked = [250, 150, 330, 200]
    events = []
    for f in range(100):
        t = f / 10
        det = cars([parked, [500, 150, 580, 200]], [1, 2]) if t < 1.0 else cars([parked], [1]) if t < 6.0 \
            else cars([parked], [2])
        events += a.update("vehicles", det, f, t)
    assert kinds(events) == [("zone_entered", 1)]


# --- 2. a polygon that folds back on itself is refused in decimal coordinates too -----------------------------

@pytest.mark.parametrize("spike", [
    [[0.3, 0.9], [0.6, 0.96], [0.4, 0.92]],  # out along a slant and back part of the way
    [[0.2, 0.9], [0.5, 0.99], [0.3, 0.93]],
])
def test_a_zone_with_a_spike_typed_in_decimals_is_refused_as_self_intersecting(spike):
    """Edges that fold back onto each other were refused only where the float arithmetic came out exactly 0: in
    normalized coordinates (decimals) about half of such spikes loaded, against the docs ("Refused at load:
    self-intersecting polygons (..., edges folding back)")."""
    polygon = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], *spike, [0.1, 0.9]]
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.zones\[0\]\.polygon: .*\(the polygon is self-intersecting\)"):
        parse_config({"cameras": [{"id": "c1", "url": "synthetic://street",
                                   "zones": [{"name": "z", "polygon": polygon}]}]})


def test_guard_three_points_in_a_line_going_on_in_decimals_still_load():
    """A vertex in the middle of a straight edge (the edge goes on, it does not turn back) is a good polygon."""
    for polygon in ([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.6, 0.96], [0.3, 0.9], [0.1, 0.9]],  # not collinear
                    [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.5, 0.9], [0.3, 0.9], [0.1, 0.9]],
                    [[0.1, 0.1], [0.3, 0.3], [0.6, 0.6], [0.9, 0.9], [0.1, 0.9]],  # 3 points on the diagonal
                    [[0.1, 0.2], [0.4, 0.26], [0.7, 0.32], [0.7, 0.9]]):  # on a slant, in decimals
        assert ZoneConfig(name="z", polygon=polygon).polygon == [tuple(p) for p in polygon]
