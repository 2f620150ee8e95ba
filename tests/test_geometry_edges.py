"""Edges of the model's geometry and decoding: boxes mapped through letterboxes of odd sizes (slivers whose
picture rounds to a row or two), NaN scores and boxes in a head's raw output, head settings that cannot work."""

import numpy as np
import pytest
import torch

from models.heads import DetectionHead, HeadConfig
from models.letterbox import PAD_VALUE, boxes_to_model, boxes_to_source, letterbox
from models.postprocess import make_points, postprocess

INPUT = (256, 448)  # the demo model's input (height, width)


def picture_extent(src: tuple[int, int]) -> np.ndarray:
    """Where the picture really lies in the letterboxed input, measured on its pixels (not on the transform):
    (1, 4) xyxy in model-input pixels."""
    out, _ = letterbox(np.full((*src, 3), 200, np.uint8), INPUT)
    ys, xs = np.nonzero(out[0] != PAD_VALUE)
    return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)


# (height, width) of pictures rounded to whole pixels: slivers (12 rows -> 1.31 -> 1, 34 -> 7.44 -> 7, 2 -> 0.22 ->
# at least 1), portrait slivers, sizes off the 16:9 grid (a 4:3 camera: 640 columns -> 341.33 -> 341)
def sizes(*hw: tuple[int, int], guard: bool = False) -> list:
    return [pytest.param(s, id=f"{'guard-' if guard else ''}{s[0]}x{s[1]}") for s in hw]


ROUNDED = sizes((12, 4096), (34, 2048), (2, 4096), (4096, 12), (4096, 2), (500, 333), (480, 640))
# rounded down: the picture mapped back fell short of the frame (rounded up, clipping hid it)
SHORT = sizes((12, 4096), (34, 2048), (500, 333), (480, 640))
# normal-path guards (pass before and after the fix): sizes whose picture needs no rounding
EXACT = sizes((360, 640), (1080, 1920), (720, 1280), (16, 16), (32, 2048), guard=True)


@pytest.mark.parametrize("src", SHORT + EXACT)
def test_the_picture_maps_back_onto_the_whole_source(src):
    _, lb = letterbox(np.zeros((*src, 3), np.uint8), INPUT)
    np.testing.assert_allclose(boxes_to_source(picture_extent(src), lb), [[0, 0, src[1], src[0]]], atol=1e-3)


@pytest.mark.parametrize("src", ROUNDED + EXACT)
def test_the_pictures_centre_maps_to_the_sources_centre(src):
    # a point is a zero-size box: clipping cannot hide where it lands
    _, lb = letterbox(np.zeros((*src, 3), np.uint8), INPUT)
    x0, y0, x1, y1 = picture_extent(src)[0]
    centre = np.array([[(x0 + x1) / 2, (y0 + y1) / 2] * 2], np.float32)
    np.testing.assert_allclose(boxes_to_source(centre, lb), [[src[1] / 2, src[0] / 2] * 2], atol=1e-3)


@pytest.mark.parametrize("src", ROUNDED + EXACT)
def test_training_targets_of_the_whole_source_cover_the_picture(src):
    # boxes_to_model makes the training targets: a box of the whole frame must be the picture, not more or less
    _, lb = letterbox(np.zeros((*src, 3), np.uint8), INPUT)
    whole = np.array([[0, 0, src[1], src[0]]], np.float32)
    np.testing.assert_allclose(boxes_to_model(whole, lb), picture_extent(src), atol=1e-3)


def planted(n_nan: int, nan_in: str = "cls") -> dict[str, torch.Tensor]:
    """A 4x4 stride-8 output with one confident detection at point 5 ((12, 12), box 8..16) and ``n_nan`` NaNs
    in the class logits of other points (or in point 5's box distances)."""
    cls = torch.full((1, 16, 1), -10.0)
    cls[0, 5, 0] = 10.0
    ltrb = torch.full((1, 16, 4), 4.0)
    if nan_in == "cls":
        cls[0, 8 : 8 + n_nan, 0] = float("nan")
    else:
        ltrb[0, 5, 0] = float("nan")
    return {"cls_logits": cls, "box_ltrb": ltrb, "centerness": torch.full((1, 16), 10.0)}


POINTS = make_points([(4, 4)], (8,), torch.device("cpu"))


@pytest.mark.parametrize("n_nan", [1, 3])
def test_nan_scores_do_not_crowd_out_a_real_detection(n_nan):
    # torch.topk ranks NaN above every number: the top k (k counted from scores above the threshold) were NaNs
    dets = postprocess(planted(n_nan), POINTS, (32, 32), score_threshold=0.5)
    assert dets[0].boxes.tolist() == [[8, 8, 16, 16]] and dets[0].class_ids.tolist() == [0]


def test_a_box_with_nan_coordinates_is_not_a_detection():
    # a NaN box overlaps nothing, so NMS kept it, and it reached the published JSON as NaN (not valid JSON)
    dets = postprocess(planted(0, nan_in="ltrb"), POINTS, (32, 32), score_threshold=0.5)
    assert len(dets[0]) == 0


def test_guard_a_planted_detection_without_nans_is_unchanged():
    # normal-path guard: without NaNs the planted detection comes out as before
    dets = postprocess(planted(0), POINTS, (32, 32), score_threshold=0.5)
    assert dets[0].boxes.tolist() == [[8, 8, 16, 16]] and dets[0].scores.item() > 0.99


@pytest.mark.parametrize("field, value", [
    ("prior_prob", 0.0),  # ZeroDivisionError in the bias init, naming nothing
    ("prior_prob", 1.0),  # "math domain error"
    ("norm_groups", 0),  # ZeroDivisionError: integer modulo by zero
    ("norm_groups", -4),  # accepted, GroupNorm(-4, C) fails at the first forward
    ("score_threshold", float("nan")),  # accepted: every score > NaN is False, the head never detects anything
    ("nms_iou", 1.5),  # accepted: NMS silently off
    ("nms_iou", -0.1),  # accepted: every same-class box suppresses every later one, touching or not
])
def test_a_head_setting_that_cannot_work_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DetectionHead(16, (8, 16), HeadConfig(classes=["a"], **{field: value}))
