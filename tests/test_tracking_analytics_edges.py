"""Edge cases of per-camera tracking and analytics (workers/tracking.py, workers/frames.py, workers/analytics.py),
driven directly with synthetic detections: ids across finish / head changes / restarts, what a frame publishes
when a head's numbers overflow."""

from __future__ import annotations

import json

import numpy as np
import supervision as sv

from models.letterbox import Letterbox
from workers.frames import detection_records, to_detections
from workers.publish import detection_message, event_message, validate
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker

LB = Letterbox.fit((360, 640), (256, 448))


def dets(boxes, conf=0.9, name="person"):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    return sv.Detections(xyxy=boxes, confidence=np.full(len(boxes), conf, np.float32),
                         class_id=np.zeros(len(boxes), int), data={"class_name": np.array([name] * len(boxes))})


def walker(frame, y=50.0):
    x = 10.0 + 5 * frame
    return [x, y, x + 20, y + 40]


def feed(tracker, head, frames, boxes_at):
    events = []
    for f in frames:
        events += tracker.update(head, dets(boxes_at(f)), f, f / 10)[1]
    return events


def started(events):
    return [e["track_id"] for e in events if e["type"] == "track_started"]


def publishable(events):
    """Each event as the Publisher would send it: valid v1, plain JSON."""
    for ev in events:
        fields = dict(ev)
        msg = event_message(fields.pop("type"), "cam", ts=1.0, **fields)
        validate(msg, "event")
        json.dumps(msg, allow_nan=False)


# --- what a frame publishes -----------------------------------------------------------------------------------

def vehicle_arrays(frame: int, attr_conf: float) -> dict:
    x = 100.0 + 3 * frame
    return {"boxes": np.array([[x, 100, x + 60, 140]], np.float32), "scores": np.array([0.9], np.float32),
            "class_ids": np.array([0]), "attr:body": np.array(["van"]),
            "attr:body:conf": np.array([attr_conf], np.float32)}


def test_a_nan_attribute_confidence_costs_that_label_not_the_frame_nor_the_tracks_later_frames():
    """An attribute head that overflows (fp16/bf16: NaN logits, softmax NaN, argmax a meaningless label) gave a
    NaN conf: detection_message refused the whole frame (every head's detections lost), and, summed into the
    track's vote, the NaN stayed in it: every later frame of that camera failed while the track lived."""
    tracker = CameraTracker(["vehicles"], TrackerConfig(), frame_rate=10)
    for f in range(8):
        det = to_detections(vehicle_arrays(f, float("nan") if f == 2 else 0.8), LB, ["car"])
        det, events = tracker.update("vehicles", det, f, f / 10)
        msg = detection_message("cam", f, f / 10, 1.0, 5.0, (640, 360),
                                detection_records("vehicles", det, det.tracker_id), ["vehicles"])
        validate(msg, "detection")
        json.dumps(msg, allow_nan=False)
        publishable(events)
        (record,) = msg["detections"]
        if f == 2:
            assert "attributes" not in record  # no label rather than the argmax of NaNs
        elif f > 2:
            assert record["attributes"]["body"] == {"label": "van", "conf": 1.0}


def test_guard_normal_path_finite_attribute_confidences_pass_through_unchanged():
    """Normal-path guard (passes on the original too): finite confidences and labels are left alone."""
    det = to_detections(vehicle_arrays(0, 0.8), LB, ["car"])
    assert det.data["attr:body"].tolist() == ["van"]
    assert det.data["attr:body:conf"].tolist() == [np.float32(0.8)]


# --- track ids ----------------------------------------------------------------------------------------------

def test_a_tracker_fed_after_finish_does_not_bring_an_ended_track_back_under_its_id():
    """finish() sent track_ended for every open track but left them in ByteTrack: the next update of the same
    object gave a second track_started for the id that had just ended (one id, two lifecycles)."""
    t = CameraTracker(["people"], TrackerConfig(), frame_rate=10)
    events = feed(t, "people", range(5), lambda f: [walker(f)])
    events += t.finish()
    events += feed(t, "people", range(5, 10), lambda f: [walker(f)])
    events += t.finish()
    ids = started(events)
    assert len(ids) == 2 and len(set(ids)) == 2, events
    assert t.next_ids() == {"people": max(ids) + 1}
    assert [e["type"] for e in events].count("track_ended") == 2
    publishable(events)


def test_guard_normal_path_a_head_dropped_and_added_again_numbers_on_and_a_restart_after_that_too():
    """Normal-path guard (passes on the original too): a head removed mid-track ends its track once, comes back
    numbering after its ids, and a restart from next_ids() continues after all of them."""
    t = CameraTracker(["people", "vehicles"], TrackerConfig(), frame_rate=10)
    events = feed(t, "people", range(5), lambda f: [walker(f)])
    ended = t.set_heads(["vehicles"])
    assert [(e["type"], e["track_id"]) for e in ended] == [("track_ended", 0)]
    assert t.set_heads(["vehicles", "people"]) == []
    events += ended + feed(t, "people", range(5, 10), lambda f: [walker(f)])
    assert started(events) == [0, 1]
    restarted = CameraTracker(["people"], TrackerConfig(), frame_rate=10, id_base=t.next_ids())
    assert started(feed(restarted, "people", range(3), lambda f: [walker(f, y=200)])) == [2]
    assert restarted.next_ids() == {"people": 3, "vehicles": 0}
    publishable(events + t.finish())
