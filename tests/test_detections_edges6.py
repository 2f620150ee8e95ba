"""Edge inputs between the model's raw outputs and the published detections and tracks: box decoding
(models/postprocess.py), the model -> sv.Detections step (workers/frames.py) and appearance in the association
(workers/appearance.py). Tiny arrays only."""

from __future__ import annotations

import numpy as np
import supervision as sv
import torch
from trackers import ByteTrackTracker

from models.letterbox import Letterbox
from models.postprocess import make_points, postprocess
from workers.appearance import AppearanceByteTrack
from workers.frames import to_detections

OPTIONS = dict(frame_rate=10.0, track_activation_threshold=0.6, minimum_iou_threshold=0.1, high_conf_det_threshold=0.5)


def planted(points: torch.Tensor, at: list[int]) -> dict[str, torch.Tensor]:
    """One image, one class: a confident 8 x 8 box at each point of ``at``, nothing elsewhere."""
    p = len(points)
    out = {"cls_logits": torch.full((1, p, 1), -10.0), "box_ltrb": torch.full((1, p, 4), 4.0),
           "centerness": torch.full((1, p), 10.0)}
    out["cls_logits"][0, at, 0] = 10.0
    return out


def test_a_box_whose_distance_overflowed_is_no_detection():
    """An fp16 overflow in the box branch gives an infinite distance. NaN boxes were dropped, but an infinite one
    was clamped to the frame's edge and published as a confident box reaching across the frame (tracked, counted
    in zones). Its neighbour is untouched."""
    pts = make_points([(4, 4)], (8,), torch.device("cpu"))
    out = planted(pts, [0, 10])  # points (4, 4) and (20, 20)
    out["box_ltrb"][0, 10, 2] = float("inf")
    for dtype in (torch.float32, torch.float16):
        dets = postprocess({k: v.to(dtype) for k, v in out.items()}, pts, (32, 32), score_threshold=0.5)
        assert dets[0].boxes.tolist() == [[0, 0, 8, 8]], dtype


def test_guard_normal_path_a_box_reaching_past_the_edge_is_clipped_and_kept():
    """Normal-path guard (passes before and after the fix): a finite box beyond the input is clipped, not dropped."""
    pts = make_points([(4, 4)], (8,), torch.device("cpu"))
    out = planted(pts, [10])
    out["box_ltrb"][0, 10, 2] = 1000.0
    assert postprocess(out, pts, (32, 32), score_threshold=0.5)[0].boxes.tolist() == [[16, 16, 32, 24]]


def test_a_box_with_no_area_in_the_source_image_is_not_published():
    """A portrait camera's picture fills the middle of the model input: a box the model found in the grey padding
    beside it maps back to a box of width 0 at the frame's edge, and a box whose distances the head's relu made 0
    has no area either. Both were published on every frame as untracked detections (at IoU 0 with everything no
    track ever confirms them). The detection beside them keeps its own data."""
    lb = Letterbox.fit((1920, 1080), (256, 448))  # the picture is x 152..296 of the input
    arrays = {"boxes": np.array([[20, 40, 100, 120], [200, 80, 200, 80], [160, 40, 200, 120]], np.float32),
              "scores": np.array([0.9, 0.8, 0.7], np.float32), "class_ids": np.array([0, 0, 1]),
              "attr:kind": np.array(["a", "b", "c"]), "attr:kind:conf": np.array([0.5, 0.6, 0.7], np.float32),
              "embedding": np.eye(3, 4, dtype=np.float16)}
    det = to_detections(arrays, lb, ["person", "bicycle"])
    assert len(det) == 1, det.xyxy
    assert (det.xyxy[:, 2:] > det.xyxy[:, :2]).all()
    assert det.data["class_name"].tolist() == ["bicycle"] and det.confidence.tolist() == [np.float32(0.7)]
    assert det.data["attr:kind"].tolist() == ["c"] and det.data["embedding"].tolist() == [[0, 0, 1, 0]]
    nothing = to_detections({k: v[:2] for k, v in arrays.items()}, lb, ["person", "bicycle"])
    assert len(nothing) == 0


def test_guard_normal_path_a_one_pixel_wide_frame_keeps_its_box():
    """Normal-path guard (passes before and after the fix): a 1-pixel-wide frame's box is 1 pixel wide, not none."""
    lb = Letterbox.fit((720, 1), (256, 448))
    det = to_detections({"boxes": np.array([[220, 10, 230, 100]], np.float32), "scores": np.array([0.9], np.float32),
                         "class_ids": np.array([0])}, lb, ["person"])
    np.testing.assert_allclose(det.xyxy, [[0, 10 * 720 / 256, 1, 100 * 720 / 256]], rtol=1e-5)


def people(boxes: list[list[float]], looks: list[list[float]]) -> sv.Detections:
    return sv.Detections(xyxy=np.array(boxes, float), confidence=np.full(len(boxes), 0.9),
                         class_id=np.zeros(len(boxes), int),
                         data={"class_name": np.array(["person"] * len(boxes)),
                               "embedding": np.array(looks, np.float16)})


def test_a_box_whose_look_was_lost_is_associated_by_motion():
    """to_detections turns a non-finite embedding (an fp16 overflow) into a zero vector, 'no look'. The association
    took it for a look unlike any other (cosine 0): a person standing still lost its track to a look-alike that
    stepped half into its box, and got a new id, where motion alone (ByteTrack) keeps it."""
    a, b, none = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]
    ours, theirs = AppearanceByteTrack(**OPTIONS), ByteTrackTracker(**OPTIONS)
    for _ in range(6):
        standing = people([[100, 50, 140, 130], [300, 50, 340, 130]], [a, b])
        first, _ = ours.update(standing), theirs.update(standing)
    assert first.tracker_id.tolist() == [0, 1]
    frame = people([[100, 50, 140, 130], [118, 50, 158, 130]], [none, a])
    mine, motion = ours.update(frame), theirs.update(frame)
    assert dict(zip(motion.xyxy[:, 0].tolist(), motion.tracker_id.tolist())) == {100.0: 0, 118.0: -1}
    assert dict(zip(mine.xyxy[:, 0].tolist(), mine.tracker_id.tolist())) == {100.0: 0, 118.0: -1}


def test_guard_normal_path_a_look_still_outranks_a_closer_box():
    """Normal-path guard (passes before and after the fix): where both boxes carry a look, appearance still
    decides among what the IoU gate lets through."""
    a, b = [1, 0, 0, 0], [0, 1, 0, 0]
    ours = AppearanceByteTrack(**OPTIONS)
    for _ in range(6):
        ours.update(people([[100, 50, 140, 130], [300, 50, 340, 130]], [a, b]))
    mine = ours.update(people([[100, 50, 140, 130], [118, 50, 158, 130]], [b, a]))
    assert dict(zip(mine.xyxy[:, 0].tolist(), mine.tracker_id.tolist())) == {118.0: 0, 100.0: -1}


def test_a_head_asking_for_more_boxes_than_the_pre_nms_cut_gets_them():
    """A head configured for a crowd (max_detections 350) got at most ``pre_nms_topk`` (300) candidates into NMS,
    so never more than 300 boxes a frame, silently."""
    pts = make_points([(20, 20)], (8,), torch.device("cpu"))  # 400 cells, each its own 8 x 8 box: none overlaps
    out = planted(pts, list(range(400)))
    assert [len(d) for d in postprocess(out, pts, (160, 160), score_threshold=0.5, max_detections=350)] == [350]
    assert [len(d) for d in postprocess(out, pts, (160, 160), score_threshold=0.5, max_detections=100)] == [100]
