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


def test_snapshots_switched_off_delete_the_last_picture_once():
    """Snapshots switched off (live, or in the config since the last run): the camera's last picture stayed in
    Redis, and the dashboard showed it as the camera's view for as long as the camera ran."""
    import numpy as np
    from test_capture_recovery import RecordingPublisher

    from workers.capture import CapturedFrame
    from workers.stream import CameraPipeline

    written: list[tuple[str, dict]] = []

    class Hashes(RecordingPublisher):
        def set_hash(self, key: str, fields: dict) -> None:
            written.append((key, fields))

    camera = {"id": "cam", "url": "synthetic://street?fps=25", "snapshot": {"enabled": False},
              "tracker": {"enabled": False}}
    pipe = CameraPipeline(camera, None, {"input_size": [96, 160], "heads": {"people": ["person"]}}, Hashes())
    image = np.zeros((3, 96, 160), np.uint8)
    for i in range(3):
        pipe._publish_frame(CapturedFrame(i, i * 0.04, 1.8e9 + i * 0.04, (360, 640), image, None), {})
    assert [w for w in written if w[0] == "hv:cam:cam:snapshot"] == [("hv:cam:cam:snapshot", {})]
