"""Edge inputs of the camera process's per-frame helpers: the appearance tracker (workers/appearance.py) and the
snapshot encoder (workers/snapshots.py)."""

from __future__ import annotations

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from synthetic.scene import StreetScene
from workers.analytics_settings import SnapshotConfig
from workers.appearance import AppearanceByteTrack
from workers.snapshots import Snapshotter
from workers.source_base import SourceFrame

OPTIONS = dict(frame_rate=10.0, track_activation_threshold=0.6, minimum_iou_threshold=0.1, high_conf_det_threshold=0.5)


def people(conf: list[float], embedded: bool) -> sv.Detections:
    boxes = np.array([[10 + 100 * i, 50, 30 + 100 * i, 90] for i in range(len(conf))], float)
    det = sv.Detections(xyxy=boxes, confidence=np.array(conf, float), class_id=np.zeros(len(conf), int),
                        data={"class_name": np.array(["person"] * len(conf))})
    if embedded:
        det.data["embedding"] = np.tile(np.array([1, 0, 0, 0], np.float16), (len(conf), 1))
    return det


def test_a_nan_score_box_is_returned_as_bytetrack_returns_it():
    """ByteTrack puts a box whose score is not >= the high threshold (NaN included) in its second, weak-box
    association and returns every box it was given. AppearanceByteTrack split by ``conf < threshold`` as well,
    so a NaN-score box was in neither set and vanished from the output, embeddings or not."""
    for embedded in (False, True):
        ours, theirs = AppearanceByteTrack(**OPTIONS), ByteTrackTracker(**OPTIONS)
        for _ in range(4):
            frame = people([0.9, np.nan], embedded)
            a, b = ours.update(frame), theirs.update(frame)
            assert len(b) == 2
            assert len(a) == 2, f"embedded={embedded}: the NaN-score box was dropped"
            np.testing.assert_array_equal(a.xyxy, b.xyxy)
            np.testing.assert_array_equal(a.tracker_id, b.tracker_id)


def test_a_snapshot_is_made_under_the_smallest_max_bytes_allowed():
    """max_bytes may be as low as 4096: an ordinary street picture fits at quality 40 once shrunk four times,
    but the encoder gave up after three shrinks and no snapshot was ever made (``too_big`` every time)."""
    rgb, _ = StreetScene(4, width=1280, height=720).step()
    picture = SourceFrame(0, 0.0, 0.0, (720, 1280), rgb).to_picture(960)
    snap = Snapshotter(SnapshotConfig(max_bytes=4096))
    fields = snap.render(picture, (1280, 720), [], None, 1, 0.1, 0.0)
    assert fields is not None, snap.stats()
    assert fields["bytes"] == len(fields["jpeg"]) <= 4096
    assert fields["width"] < 960 and snap.too_big == 0


def test_guard_normal_path_snapshot_keeps_its_full_size_when_it_fits():
    """Normal-path guard (passes before and after the fix): a picture that fits is not shrunk."""
    rgb, _ = StreetScene(4, width=1280, height=720).step()
    picture = SourceFrame(0, 0.0, 0.0, (720, 1280), rgb).to_picture(960)
    fields = Snapshotter(SnapshotConfig()).render(picture, (1280, 720), [], None, 1, 0.1, 0.0)
    assert (fields["width"], fields["height"], fields["quality"]) == (960, 540, 80)
