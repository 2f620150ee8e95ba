"""Zones and lines: config validation that names the field, occupancy, dwell, hysteresis, line counts."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from pipeline.app import App
from pipeline.config import ConfigError, parse_camera, parse_config
from workers.analytics import LINE_MEMORY_FRAMES, LOST_PER_SEEN, CameraAnalytics, LineCounter, ZoneCounter
from workers.analytics_settings import LineConfig, ZoneConfig, analytics_errors
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker

HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}
SIZE = (640, 360)
SQUARE = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]  # normalised: x 160..480, y 90..270


def cam(**kw):
    return {"id": "c1", "url": "synthetic://street", **kw}


def zone(**kw):
    return {"name": "z", "polygon": SQUARE, **kw}


def line(**kw):
    return {"name": "l", "start": [0.5, 0.0], "end": [0.5, 1.0], **kw}


# --- bad definitions are refused at config load, naming the field ------------------------------------------

@pytest.mark.parametrize("camera, expected", [
    (cam(zones=[zone(polygon=[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.9]])]),
     r"cameras\[0\]\.zones\[0\]\.polygon: edges 1-2 and 3-0 cross \(the polygon is self-intersecting\)"),
    (cam(zones=[zone(polygon=[[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]])]),
     r"cameras\[0\]\.zones\[0\]\.polygon: encloses no area: its points are collinear \(the polygon is degenerate\)"),
    (cam(zones=[zone(polygon=[[0.1, 0.1], [0.1, 0.1], [0.9, 0.9]])]),
     r"cameras\[0\]\.zones\[0\]\.polygon: points 0 and 1 are the same"),
    (cam(zones=[zone(polygon=[[0.1, 0.1], [0.9, 0.1]])]), r"cameras\[0\]\.zones\[0\]\.polygon: List should have at least 3"),
    (cam(zones=[zone(polygon=[[10, 10], [600, 10], [300, 300]])]),
     r"cameras\[0\]\.zones\[0\]\.polygon: point 0 \(10, 10\) is outside the frame: normalized coordinates are 0\.\.1 "
     r"\(for source pixels set units: pixels\)"),
    (cam(zones=[zone(units="pixels", polygon=[[10, 10], [600, -1], [300, 300]])]),
     r"cameras\[0\]\.zones\[0\]\.polygon: point 1 \(600, -1\) is outside the frame"),
    (cam(zones=[zone(polygon=[[0.1, float("nan")], [0.9, 0.1], [0.5, 0.9]])]),
     r"cameras\[0\]\.zones\[0\]\.polygon: point 0 \(0.1, nan\) is not finite"),
    (cam(lines=[line(start=[0.5, 0.5], end=[0.5, 0.5])]),
     r"cameras\[0\]\.lines\[0\]\.end: the line has length 0: start and end are both \(0\.5, 0\.5\)"),
    (cam(lines=[line(end=[1.5, 0.5])]), r"cameras\[0\]\.lines\[0\]\.end: point 1 \(1\.5, 0\.5\) is outside the frame"),
    (cam(zones=[zone(), zone()]), r"cameras\[0\]: zones\[1\]\.name: duplicate zone name 'z' \(also zones\[0\]\)"),
    (cam(heads=["people"], lines=[line(heads=["vehicles"])]),
     r"cameras\[0\]: lines\[0\]\.heads: head 'vehicles' is not one the camera runs \(\['people'\]\)"),
    (cam(zones=[zone(anchors=["feet"])]), r"cameras\[0\]\.zones\[0\]\.anchors\[0\]: Input should be 'center'"),
    (cam(zones=[zone(heads=[])]), r"cameras\[0\]\.zones\[0\]\.heads: must name at least one"),
    (cam(zones=[zone()], tracker={"enabled": False}), r"cameras\[0\]: zones: zones and lines count tracked objects"),
    (cam(zones=[zone(min_inside_s=-1)]), r"cameras\[0\]\.zones\[0\]\.min_inside_s: Input should be greater than"),
])
def test_bad_zone_and_line_definitions_are_refused_naming_the_field(camera, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config({"cameras": [camera]})


@pytest.mark.parametrize("camera, expected", [
    (cam(zones=[zone(polygon=[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.9]])]),
     r"^camera\.zones\[0\]\.polygon: edges 1-2 and 3-0 cross"),
    (cam(zones=[zone(), zone()]), r"^camera\.zones\[1\]\.name: duplicate zone name 'z'"),
    (cam(lines=[line(start=[0.2, 0.2], end=[0.2, 0.2])]), r"^camera\.lines\[0\]\.end: the line has length 0"),
    (cam(lines=[line(heads=["faces"])]), r"^camera\.lines\[0\]\.heads: unknown head\(s\) \['faces'\]"),
    (cam(zones=[zone(classes=["truck"])]), r"^camera\.zones\[0\]\.classes: \['truck'\] not a class"),
])
def test_a_runtime_change_is_refused_the_same_way(camera, expected):
    """parse_camera is what a control API (adding or updating a camera while running) validates with."""
    with pytest.raises(ConfigError, match=expected):
        parse_camera(camera, HEADS)


def test_good_definitions_in_both_units_load():
    cfg = parse_config({"cameras": [cam(
        zones=[zone(), zone(name="px", units="pixels", polygon=[[0, 200], [640, 200], [640, 360], [0, 360]],
                            heads=["people"], classes=["person"], anchors=["bottom_center", "center"])],
        lines=[line(), line(name="px", units="pixels", start=[320, 0], end=[320, 360])])]})
    c = cfg.cameras[0]
    assert [z.name for z in c.zones] == ["z", "px"] and [ln.units for ln in c.lines] == ["normalized", "pixels"]


@pytest.mark.parametrize("camera, expected", [
    (cam(zones=[zone(heads=["faces"])]), r"cameras\[0\]\.zones\[0\]\.heads: unknown head\(s\) \['faces'\]"),
    (cam(lines=[line(classes=["truck"])]), r"cameras\[0\]\.lines\[0\]\.classes: \['truck'\] not a class of head"),
    (cam(heads=["people"], zones=[zone(classes=["car"])]), r"cameras\[0\]\.zones\[0\]\.classes: \['car'\] not a class"),
])
def test_unknown_heads_and_classes_are_refused_against_the_model(camera, expected, tiny_checkpoint):
    config = parse_config({"model": {"checkpoint": str(tiny_checkpoint)}, "cameras": [camera]})
    with pytest.raises(ConfigError, match=expected):
        App(config, say=lambda m: None).check_model()  # what `hydravision run` does before starting anything


def test_pixel_points_outside_the_real_frame_switch_that_zone_off_and_say_which():
    zones = [ZoneConfig(name="ok", polygon=SQUARE),
             ZoneConfig(name="big", units="pixels", polygon=[(0, 0), (700, 0), (700, 300)])]
    lines = [LineConfig(name="far", units="pixels", start=(100, 10), end=(100, 400))]
    a = CameraAnalytics(zones, lines, HEADS, SIZE)
    assert list(a.zones) == ["ok"] and not a.lines
    assert a.errors == {"zones[1]": "zones[1].polygon: point (700, 0) is outside the 640x360 frame; zone 'big' is off",
                        "lines[0]": "lines[0].end: point (100, 400) is outside the 640x360 frame; line 'far' is off"}


def test_model_check_is_a_plain_function_for_runtime_changes():
    z = [ZoneConfig(name="z", polygon=SQUARE, heads=["people"], classes=["person"])]
    assert analytics_errors(z, [], None, HEADS) == []
    assert analytics_errors(z, [], ["vehicles"], HEADS) == [
        "zones[0].heads: head(s) ['people'] not run by this camera (it runs ['vehicles'])"]


# --- zones ----------------------------------------------------------------------------------------------

def people(boxes, ids, name="person"):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return sv.Detections(xyxy=boxes, confidence=np.full(len(boxes), 0.9), class_id=np.zeros(len(boxes), int),
                         tracker_id=np.asarray(ids, int).reshape(-1), data={"class_name": np.array([name] * len(boxes))})


def standing_at(x, y, h=60.0, w=20.0):
    """A box whose bottom centre (the default anchor) is at (x, y)."""
    return [x - w / 2, y - h, x + w / 2, y]


def walk(counter, xs, y=200.0, fps=10.0, tid=1, head="people"):
    events = []
    for f, x in enumerate(xs):
        events += counter.update(head, people([standing_at(x, y)], [tid]) if x is not None else people([], []),
                                 f, f / fps)
    return events


def test_walk_through_a_zone_enters_once_leaves_once_with_its_dwell():
    z = ZoneCounter(ZoneConfig(name="z", polygon=SQUARE), SIZE, {"people": ["person"]})
    xs = list(np.arange(100.0, 640.0, 10.0))  # 10 px per frame at 10 fps; inside x in [160, 480]
    events = walk(z, xs)
    assert [e["type"] for e in events] == ["zone_entered", "zone_left"]
    entered, left = events
    first_in = next(f for f, x in enumerate(xs) if x >= 160) / 10
    last_in = max(f for f, x in enumerate(xs) if x <= 480) / 10
    assert entered["entered_pts"] == pytest.approx(first_in)
    assert left["dwell_s"] == pytest.approx(last_in - first_in, abs=1e-6)
    assert left["reason"] == "exited" and left["occupancy"] == 0 and entered["occupancy"] == 1


def test_occupancy_counts_per_class_and_only_confirmed_tracks():
    z = ZoneCounter(ZoneConfig(name="z", polygon=SQUARE, min_inside_s=0), SIZE, {"vehicles": ["car", "bicycle"]})
    det = sv.Detections(xyxy=np.array([standing_at(200, 200), standing_at(300, 200), standing_at(400, 200),
                                       standing_at(600, 200)], float),
                        confidence=np.full(4, 0.9), class_id=np.array([0, 0, 1, 0]), tracker_id=np.array([1, -1, 2, 3]),
                        data={"class_name": np.array(["car", "car", "bicycle", "car"])})
    z.update("vehicles", det, 0, 0.0)
    assert dict(z.occupancy()) == {("vehicles", "car"): 1, ("vehicles", "bicycle"): 1}
    assert z.update("people", people([standing_at(300, 200)], [5]), 0, 0.0) == []  # not a head of this zone


def jittered_stationary_events(zone_cfg: ZoneConfig, seconds=60.0, fps=10.0, seed=0):
    """A parked object whose box bottom sits ON the zone's edge (y = 270): box jitter of +-3 px flips the raw
    anchor in and out; the detector misses it now and then (1-4 frames) and twice for 1.8 s, long enough for
    ByteTrack to drop the track and start a new one."""
    rng = np.random.default_rng(seed)
    tracker = CameraTracker(["people"], TrackerConfig(), frame_rate=fps)
    z = ZoneCounter(zone_cfg, SIZE, {"people": ["person"]})
    events, ids, gap = [], set(), 0
    n = int(seconds * fps)
    for f in range(n):
        if f in (int(0.3 * n), int(0.7 * n)):
            gap = int(1.8 * fps)
        elif gap == 0 and rng.random() < 0.05:
            gap = int(rng.integers(1, 5))
        if gap > 0:
            gap -= 1
            det = people([], [])
        else:
            box = np.array(standing_at(300, 268.0)) + rng.normal(0, 3, 4)
            det = people([box], [-1])
        tracked, _ = tracker.update("people", det, f, f / fps)
        ids |= {int(t) for t in tracked.tracker_id if t >= 0}
        events += z.update("people", tracked, f, f / fps)
    return events, ids


def test_stationary_object_in_a_zone_for_60_s_enters_once_and_nothing_else():
    events, ids = jittered_stationary_events(ZoneConfig(name="z", polygon=SQUARE))
    assert len(ids) >= 2  # the long misses did give it new track ids
    assert [e["type"] for e in events] == ["zone_entered"]


def test_the_stationary_test_can_fail_without_hysteresis():
    raw = ZoneConfig(name="z", polygon=SQUARE, min_inside_s=0, min_outside_s=0, exit_margin=0, lost_s=0.1)
    events, _ = jittered_stationary_events(raw)
    assert len(events) > 10


def test_occupant_not_seen_for_lost_s_leaves_with_dwell_to_its_last_frame_inside():
    z = ZoneCounter(ZoneConfig(name="z", polygon=SQUARE, lost_s=1.0), SIZE, {"people": ["person"]})
    events = walk(z, [300.0] * 20 + [None] * 15)  # seen 2 s, then gone
    assert [e["type"] for e in events] == ["zone_entered", "zone_left"]
    assert events[1]["reason"] == "lost" and events[1]["dwell_s"] == pytest.approx(1.9)
    assert events[1]["pts"] == pytest.approx(2.9)  # last seen 1.9 + lost_s


def test_a_still_box_seen_for_a_moment_is_not_kept_for_lost_s():
    """A box seen for 0.3 s (e.g. a duplicate detection on a passing bicycle) and then never again leaves after
    LOST_PER_SEEN x 0.3 s, not after lost_s; one seen for 1 s is kept the whole lost_s (a parked car)."""
    short = walk(ZoneCounter(ZoneConfig(name="z", polygon=SQUARE, lost_s=3.0), SIZE, {"people": ["person"]}),
                 [300.0] * 4 + [None] * 40)  # seen at 0.0-0.3 s
    assert [e["type"] for e in short] == ["zone_entered", "zone_left"]
    assert short[1]["reason"] == "lost"
    assert short[1]["pts"] == pytest.approx(0.3 + LOST_PER_SEEN * 0.3)
    long = walk(ZoneCounter(ZoneConfig(name="z", polygon=SQUARE, lost_s=3.0), SIZE, {"people": ["person"]}),
                [300.0] * 11 + [None] * 40)  # seen at 0.0-1.0 s
    assert long[1]["pts"] == pytest.approx(1.0 + 3.0)


def test_hold_keeps_occupants_through_frames_the_motion_gate_skipped():
    z = ZoneCounter(ZoneConfig(name="z", polygon=SQUARE, lost_s=1.0), SIZE, {"people": ["person"]})
    walk(z, [300.0] * 5)
    for f in range(5, 100):  # 9.5 s of skipped frames
        z.hold(f / 10)
    assert z.update("people", people([standing_at(300, 200)], [1]), 100, 10.0) == []
    assert sum(z.occupancy().values()) == 1


# --- lines ----------------------------------------------------------------------------------------------

def test_line_counts_in_and_out_per_class_with_direction_from_start_to_end():
    ln = LineCounter(LineConfig(name="l", start=(0.5, 0.0), end=(0.5, 1.0)), SIZE, HEADS, HEADS)
    events = walk(ln, list(np.arange(200.0, 460.0, 20.0)), tid=1)  # left to right across x = 320
    events += walk(ln, list(np.arange(460.0, 200.0, -20.0)), tid=2)  # back
    assert [(e["direction"], e["track_id"], e["class"], e["count"]) for e in events] == [
        ("in", 1, "person", 1), ("out", 2, "person", 1)]
    assert ln.counts()[("people", "person")] == {"in": 1, "out": 1}
    assert ln.counts()[("vehicles", "car")] == {"in": 0, "out": 0}


def test_two_crossings_on_one_frame_each_carry_the_count_so_far_this_one_included():
    ln = LineCounter(LineConfig(name="l", start=(0.5, 0.0), end=(0.5, 1.0)), SIZE, HEADS, HEADS)
    events = []
    for f, x in enumerate(np.arange(200.0, 460.0, 20.0)):  # side by side, left to right across x = 320
        events += ln.update("people", people([standing_at(x, 150.0), standing_at(x, 250.0)], [1, 2]), f, f / 10)
    events += walk(ln, list(np.arange(200.0, 460.0, 20.0)), tid=3)  # a third one later
    assert [(e["track_id"], e["count"]) for e in events] == [(1, 1), (2, 2), (3, 3)]
    assert ln.counts()[("people", "person")] == {"in": 3, "out": 0}


def test_a_track_missed_while_it_crosses_is_still_counted():
    """Detections drop out for 4 frames right at the line (something stands there), then the same track is seen
    past it: one crossing. supervision's LineZone alone forgets the side after 2 missing frames (checked below,
    so this test notices if that changes) and then never counts it."""
    xs = [200.0, 240.0, 280.0, None, None, None, None, 440.0, 480.0, 520.0]  # the line is at x = 320
    ln = LineCounter(LineConfig(name="l", start=(0.5, 0.0), end=(0.5, 1.0)), SIZE, HEADS, HEADS)
    assert [(e["direction"], e["track_id"]) for e in walk(ln, xs)] == [("in", 1)]
    plain = sv.LineZone(sv.Point(320, 0), sv.Point(320, 360))
    for x in xs:
        plain.trigger(people([standing_at(x, 200.0)], [1]) if x is not None else people([], []))
    assert plain.in_count == 0
    gone = [200.0, 280.0] + [None] * LINE_MEMORY_FRAMES + [440.0, 480.0]  # longer than the memory: forgotten
    ln = LineCounter(LineConfig(name="l", start=(0.5, 0.0), end=(0.5, 1.0)), SIZE, HEADS, HEADS)
    assert walk(ln, gone) == []


def test_counts_hash_fields():
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE, min_inside_s=0, classes=["person", "car"])],
                        [LineConfig(name="l", start=(0.5, 0.0), end=(0.5, 1.0), heads=["people"])], HEADS, SIZE)
    a.update("people", people([standing_at(300, 200)], [1]), 0, 0.0)
    assert a.counts() == {"zone:z:people:person": 1, "zone:z:vehicles:car": 0,
                          "line:l:people:person:in": 0, "line:l:people:person:out": 0}


def test_reconfigured_keeps_unchanged_zones_and_the_occupants_of_changed_ones():
    """A changed zone started afresh: whoever stood in it got a second zone_entered (no zone_left between)."""
    z1, z2 = ZoneConfig(name="a", polygon=SQUARE, min_inside_s=0), ZoneConfig(name="b", polygon=SQUARE, min_inside_s=0)
    a = CameraAnalytics([z1, z2], [], HEADS, SIZE)
    a.update("people", people([standing_at(300, 200)], [1]), 0, 0.0)
    b = a.reconfigured([z1, z2.model_copy(update={"min_outside_s": 5.0})], [])
    assert b.zones["a"] is a.zones["a"] and b.zones["b"] is not a.zones["b"]
    assert sum(b.zones["a"].occupancy().values()) == 1 and sum(b.zones["b"].occupancy().values()) == 1
    assert b.update("people", people([standing_at(300, 200)], [1]), 1, 0.1) == []
