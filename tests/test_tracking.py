"""Tracking glue: per-head ByteTrack, lifecycle events, ids that survive a restart without reuse."""

import numpy as np
import pytest
import supervision as sv

from workers.settings import TrackerConfig
from workers.tracking import CameraTracker


def dets(boxes, conf=0.9, cls=0, name="person"):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    return sv.Detections(xyxy=boxes, confidence=np.full(len(boxes), conf, np.float32),
                         class_id=np.full(len(boxes), cls), data={"class_name": np.array([name] * len(boxes))})


def moving(frame, x0=10.0, speed=5.0, y=50.0):
    x = x0 + speed * frame
    return [x, y, x + 20, y + 40]


def run_track(tracker, head, frames, boxes_at):
    events, ids = [], []
    for f in range(frames):
        out, ev = tracker.update(head, dets(boxes_at(f)) if boxes_at(f) else dets([]), f, f / 10)
        events += ev
        ids.append(out.tracker_id.tolist())
    return events, ids


def test_one_object_gets_one_track_with_start_and_end_events():
    t = CameraTracker(["people"], TrackerConfig(lost_track_buffer=5, minimum_consecutive_frames=2), frame_rate=10)
    events, ids = run_track(t, "people", 40, lambda f: [moving(f)] if f < 20 else [])
    confirmed = {i for frame in ids for i in frame if i >= 0}
    assert len(confirmed) == 1
    types = [e["type"] for e in events]
    assert types == ["track_started", "track_ended"]
    assert events[0]["class"] == "person" and events[0]["head"] == "people"
    assert events[1]["frames"] >= 17


def test_heads_track_independently():
    t = CameraTracker(["people", "vehicles"], TrackerConfig(), frame_rate=10)
    for f in range(5):
        a, _ = t.update("people", dets([moving(f)]), f, f / 10)
        b, _ = t.update("vehicles", dets([moving(f, y=200)], cls=0, name="car"), f, f / 10)
    assert a.tracker_id.tolist() == [0] and b.tracker_id.tolist() == [0]  # (camera, head, id) is the identity


def test_restart_continues_ids_instead_of_reusing_them():
    first = CameraTracker(["people"], TrackerConfig(), frame_rate=10)
    run_track(first, "people", 10, lambda f: [moving(f), moving(f, y=200)])
    base = first.next_ids()
    assert base == {"people": 2}
    second = CameraTracker(["people"], TrackerConfig(), frame_rate=10, id_base=base)
    _, ids = run_track(second, "people", 10, lambda f: [moving(f)])
    assert {i for frame in ids for i in frame if i >= 0} == {2}


def test_finish_ends_open_tracks():
    t = CameraTracker(["people"], TrackerConfig(), frame_rate=10)
    run_track(t, "people", 5, lambda f: [moving(f)])
    ended = t.finish()
    assert [e["type"] for e in ended] == ["track_ended"]
    assert t.finish() == []


def test_unconfirmed_detections_have_no_id():
    t = CameraTracker(["people"], TrackerConfig(minimum_consecutive_frames=3), frame_rate=10)
    out, events = t.update("people", dets([moving(0)]), 0, 0.0)
    assert out.tracker_id.tolist() == [-1] and events == []


def _lost_for(built_at: float, analysed_at: float, told: float | None = None) -> float:
    """Seconds from an object's last sighting to its track_ended, for a tracker built for one rate that gets
    frames at another (and, with ``told``, is told so). Appearance is on (its re-link wait counts too)."""
    t = CameraTracker(["people"], TrackerConfig(), frame_rate=built_at)
    if told:
        t.set_frame_rate(told)
    for f in range(int(15 * analysed_at)):
        pts = f / analysed_at
        _, events = t.update("people", dets([moving(f, speed=40 / analysed_at)] if pts <= 2.0 else []), f, pts)
        if any(e["type"] == "track_ended" for e in events):
            return pts - 2.0
    raise AssertionError("the track never ended")


def test_a_tracker_told_its_new_rate_keeps_a_lost_track_as_long_as_one_built_for_it():
    """A lost track's life is counted in frames: a tracker built for 25 fps that then got 5 (the frame-age budget
    lowered the rate; a live update of fps) kept a lost track five times too long, and one built for 5 that
    got 25 a fifth as long (a short occlusion made a new id)."""
    at_5, at_25 = _lost_for(5, 5), _lost_for(25, 25)
    assert _lost_for(25, 5, told=5) == pytest.approx(at_5, abs=0.25)
    assert _lost_for(5, 25, told=25) == pytest.approx(at_25, abs=0.1)
    assert _lost_for(25, 5) > 2 * at_5  # what it was without being told
