"""Edges of the snapshots' drawing and of the motion gate's clock (workers/snapshots.py, workers/motion.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv

from workers.analytics_settings import MotionConfig, SnapshotConfig
from workers.motion import MotionGate
from workers.snapshots import Snapshotter

INPUT = (256, 448)


def one_box(xyxy: list[float]) -> sv.Detections:
    return sv.Detections(xyxy=np.array([xyxy], float), confidence=np.ones(1), class_id=np.zeros(1, int),
                         tracker_id=np.array([7]), data={"class_name": np.array(["person"])})


@pytest.mark.parametrize("edge, box, label_area", [
    ("top", [200, 0, 400, 200], (slice(3, 14), slice(204, 240))),      # a person whose head is cut by the frame
    ("left", [-60, 150, 100, 300], (slice(136, 147), slice(3, 36))),   # a car coming in from the left
])
def test_the_label_of_a_box_at_the_pictures_edge_is_drawn_inside_the_picture(edge, box, label_area):
    """The label ("#7 person") is drawn above its box's top-left corner: for a box at the picture's top edge it
    was wholly above the picture, for one cut by the left edge left of it, so the dashboard showed such an
    object without its track id or class."""
    fields = Snapshotter(SnapshotConfig()).render(np.zeros((360, 640, 3), np.uint8), (640, 360), [one_box(box)],
                                                  None, 1, 0.0, 0.0)
    drawn = cv2.imdecode(np.frombuffer(fields["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    lit = (drawn[label_area].max(axis=2) > 100).mean()  # the label's coloured background, with white text on it
    assert lit > 0.8, (edge, lit)


def test_max_skip_s_forces_the_frame_that_is_max_skip_s_after_the_reference():
    """pts are floats: 14/10 - 4/10 is 0.9999999999999999, so a still scene let through at 0.4 was forced again
    at 1.5, not at 1.4 (one frame later than max_skip_s allows, for about one start in five)."""
    still = np.full((3, *INPUT), 90, np.uint8)
    late = []
    for start in range(40):
        gate = MotionGate(MotionConfig(enabled=True, max_skip_s=1.0))
        assert gate.wants(still, start / 10)
        forced = next(k for k in range(start + 1, start + 30) if gate.wants(still, k / 10))
        if forced != start + 10:
            late.append((start, forced))
    assert late == []
