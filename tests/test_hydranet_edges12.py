"""Edges of the model (round 12): a frame's detections do not depend on what else is in its batch."""

import torch

from models.postprocess import make_points, postprocess


def test_equal_scores_keep_the_same_boxes_whatever_else_is_in_the_batch():
    """topk orders equal scores (saturated or fp16 logits) differently for another k, and k followed the batch's
    busiest image: NMS kept another of two equal boxes, so a frame's detections changed with its batch-mates."""
    pts = make_points([(16, 16)], (8,), torch.device("cpu"))  # 256 locations over a 128 x 128 input
    p = len(pts)
    cls = torch.full((2, p, 1), 3.0)
    cls[0, 40:] = -10.0  # the frame: 40 locations with equal scores; its batch-mate: every location above
    out = {"cls_logits": cls, "box_ltrb": torch.full((2, p, 4), 30.0), "centerness": torch.zeros(2, p)}
    alone = postprocess({k: v[:1] for k, v in out.items()}, pts, (128, 128), score_threshold=0.3, nms_iou=0.3)[0]
    batched = postprocess(out, pts, (128, 128), score_threshold=0.3, nms_iou=0.3)[0]
    assert torch.equal(alone.boxes, batched.boxes) and torch.equal(alone.scores, batched.scores)
    assert alone.boxes[0].tolist() == [0.0, 0.0, 34.0, 34.0]  # of equal boxes, the first location's is kept
