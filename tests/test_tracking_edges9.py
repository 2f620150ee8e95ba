"""Tracking, zones and lines under the motion gate, a ninth look (workers/analytics.py, workers/tracking.py,
workers/motion.py): a skipped frame decides nothing, so while the last analysed frame left a decision pending the
camera sends every frame. Driven as CameraPipeline (and pipeline/analytics_eval.py) drive them: one object drawn
on a synthetic picture, the real MotionGate, ByteTrack and analytics, no model."""

from __future__ import annotations

import numpy as np
import supervision as sv

from workers.analytics import CameraAnalytics
from workers.analytics_settings import LineConfig, MotionConfig, ZoneConfig
from workers.motion import MotionGate
from workers.settings import AppearanceConfig, TrackerConfig
from workers.tracking import CameraTracker

FPS = 10.0
SIZE = (640, 360)
HEADS = {"vehicles": ["car"]}
ZONE = ZoneConfig(name="bay", polygon=[(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)])  # x 160..480


def picture(box: list[float]) -> np.ndarray:
    """The model input of a still scene with one white box (3 x H/2 x W/2): it changes only where the box moves."""
    image = np.zeros((3, SIZE[1] // 2, SIZE[0] // 2), np.uint8)
    x1, y1, x2, y2 = (np.asarray(box) / 2).round().astype(int)
    image[:, y1:y2, x1:x2] = 255
    return image


def drive(boxes: list[list[float]], zones: list[ZoneConfig], lines: list[LineConfig],
          motion: MotionConfig) -> tuple[list[dict], list[bool]]:
    """One car's box per frame -> the analytics events (with their pts) and, per frame, whether it was analysed."""
    tracker = CameraTracker(list(HEADS), TrackerConfig(appearance=AppearanceConfig(enabled=False)), FPS)
    analytics = CameraAnalytics(zones, lines, HEADS, SIZE)
    gate = MotionGate(motion)
    events, analysed, last = [], [], -1
    for f, box in enumerate(boxes):
        pts, image = f / FPS, picture(box)
        if analytics.undecided() or tracker.undecided(last):  # as CameraPipeline._gate_wants
            infer = gate.force(image, pts)
        else:
            infer = gate.wants(image, pts)
        analysed.append(infer)
        if not infer:
            analytics.hold(pts)
            continue
        det = sv.Detections(xyxy=np.array([box], float), confidence=np.array([0.9]), class_id=np.array([0]),
                            data={"class_name": np.array(["car"])})
        tracked, _ = tracker.update("vehicles", det, f, pts)
        events += analytics.update("vehicles", tracked, f, pts)
        last = f
    return events, analysed


def creeping_out(stop_at: float, frames: int = 300) -> list[list[float]]:
    """A car parked in the bay for 5 s creeps right at 10 px/s (slower than MOVING: a still object for the zone) and
    stops with its bottom centre at ``stop_at`` (the bay's edge is x = 480, its exit margin 6 px)."""
    xs = [min(440.0 + max(0, f - 50), stop_at) for f in range(frames)]
    return [[x - 20, 150, x + 20, 210] for x in xs]


def test_a_still_car_that_stopped_just_outside_a_zone_leaves_it_min_outside_s_later_not_max_skip_s():
    """Its box crossed the edge's margin at 9.6 s and stopped 0.2 s later: still, it must stay out min_outside_s
    (0.5 s) before zone_left, but nothing left undecided for the gate, which skipped the still scene until
    max_skip_s: zone_left came at 19.7 s, the bay counted the car 10 s after it had left."""
    events, analysed = drive(creeping_out(488.0), [ZONE], [], MotionConfig(enabled=True, min_changed=0.0001))
    left = [e for e in events if e["type"] == "zone_left"]
    assert len(left) == 1 and left[0]["reason"] == "exited"
    assert left[0]["pts"] < 10.6, left  # 9.7 s first seen outside + 0.5 s, a frame or two of slack
    assert left[0]["dwell_s"] < 10.0
    assert sum(analysed[120:]) <= 2  # guard: once it has left, the still scene is skipped again (max_skip_s 10 s)


def test_guard_normal_path_a_car_that_creeps_on_out_of_the_zone_leaves_as_before():
    """It keeps creeping (every frame changes, so all are analysed): zone_left min_outside_s after the margin."""
    events, _ = drive(creeping_out(600.0), [ZONE], [], MotionConfig(enabled=True, min_changed=0.0001))
    left = [e for e in events if e["type"] == "zone_left"]
    assert len(left) == 1 and 10.0 <= left[0]["pts"] < 10.6, left


def crossing_and_stopping(frames: int = 400) -> list[list[float]]:
    """A car driving right at 40 px/s whose whole box is past the line x = 320 from frame 31, stopped at frame 32."""
    return [[200.0 + 4 * min(f, 32), 150, 240.0 + 4 * min(f, 32), 210] for f in range(frames)]


def test_a_car_that_stops_just_past_a_line_is_counted_when_it_crossed_not_max_skip_s_later():
    """min_crossing_frames 3: the frames after it stopped showed nothing moving, so the gate skipped them and the
    crossing, one frame short, waited for the next max_skip_s frame: counted 10 s late (20 s with one more frame to
    go; had it then been hidden, never)."""
    line = LineConfig(name="stop", start=(0.5, 0.0), end=(0.5, 1.0), min_crossing_frames=3)
    events, analysed = drive(crossing_and_stopping(), [], [line], MotionConfig(enabled=True))
    crossed = [e for e in events if e["type"] == "line_crossed"]
    assert [(e["direction"], e["count"]) for e in crossed] == [("in", 1)]
    assert crossed[0]["pts"] <= 3.4, crossed  # frames 31, 32 and 33 on the new side
    assert sum(analysed[50:]) <= 5  # guard: once counted, the still scene is skipped again


def test_guard_normal_path_one_frame_crossings_leave_the_gate_as_it_was():
    """min_crossing_frames 1 (the default) counts on the first frame past the line: nothing pending, the same
    frames go to inference as before."""
    line = LineConfig(name="stop", start=(0.5, 0.0), end=(0.5, 1.0))
    events, analysed = drive(crossing_and_stopping(), [], [line], MotionConfig(enabled=True))
    crossed = [e for e in events if e["type"] == "line_crossed"]
    assert [(e["direction"], e["pts"]) for e in crossed] == [("in", 3.1)]
    assert sum(analysed[40:]) <= 4  # max_skip_s frames only


def test_a_zone_changed_live_decides_on_the_next_frame_even_in_a_still_scene():
    """A car parked in the bay; at 5 s the bay is moved off it and a second zone is drawn around it. The new settings
    decide from the next analysed frame, but the still scene's next one came at max_skip_s: the bay counted the car
    and the new zone did not, for 5 s more (10 s after the last analysed frame)."""
    tracker = CameraTracker(list(HEADS), TrackerConfig(appearance=AppearanceConfig(enabled=False)), FPS)
    analytics = CameraAnalytics([ZONE], [], HEADS, SIZE)
    gate = MotionGate(MotionConfig(enabled=True))
    moved = ZoneConfig(name="bay", polygon=[(0.0, 0.25), (0.3, 0.25), (0.3, 0.75), (0.0, 0.75)])
    drawn = ZoneConfig(name="new", polygon=[(0.5, 0.25), (0.75, 0.25), (0.75, 0.75), (0.5, 0.75)])
    box, last, events = [300.0, 150, 340, 210], -1, []
    for f in range(120):
        pts, image = f / FPS, picture(box)
        if f == 50:
            analytics = analytics.reconfigured([moved, drawn], [])
        if not (gate.force(image, pts) if analytics.undecided() or tracker.undecided(last) else gate.wants(image, pts)):
            analytics.hold(pts)
            continue
        det = sv.Detections(xyxy=np.array([box]), confidence=np.array([0.9]), class_id=np.array([0]),
                            data={"class_name": np.array(["car"])})
        tracked, _ = tracker.update("vehicles", det, f, pts)
        events += analytics.update("vehicles", tracked, f, pts)
        last = f
    assert [(e["type"], e["zone"]) for e in events] == [("zone_entered", "bay"), ("zone_entered", "new"),
                                                        ("zone_left", "bay")]
    assert all(e["pts"] < 6.0 for e in events[1:]), events  # 5.0 s + min_inside_s / min_outside_s
    assert gate.skipped >= 50  # guard: decided, the still scene is skipped again
