"""Edges of the snapshots' labels (workers/snapshots.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv

from workers.analytics_settings import SnapshotConfig
from workers.snapshots import Snapshotter


def one_box(xyxy: list[float]) -> sv.Detections:
    return sv.Detections(xyxy=np.array([xyxy], float), confidence=np.ones(1), class_id=np.zeros(1, int),
                         tracker_id=np.array([7]), data={"class_name": np.array(["person"])})


@pytest.mark.parametrize("box", [
    [630, 100, 640, 200],  # a person coming in from the right, cut by the frame
    [637, 340, 640, 360],  # the last pixels of a car leaving at the bottom-right corner
])
def test_the_label_of_a_box_at_the_pictures_right_edge_is_drawn_inside_the_picture(box):
    """The label ("#7 person", ~63 px) starts at its box's left edge: for a box narrower than that at the
    picture's right edge, all but a few pixels of it were cut off, and the dashboard showed no track id."""
    fields = Snapshotter(SnapshotConfig()).render(np.zeros((360, 640, 3), np.uint8), (640, 360), [one_box(box)],
                                                  None, 1, 0.0, 0.0)
    drawn = cv2.imdecode(np.frombuffer(fields["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    top = box[1] - 14  # the label's background, above the box: 11 px of it at a safe distance from its borders
    lit = (drawn[top:top + 11, 580:636].max(axis=2) > 100).mean()  # coloured background, white text on it
    assert lit > 0.8, lit
