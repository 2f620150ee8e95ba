"""FCOS training targets and losses (focal, GIoU, centerness), in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.postprocess import decode_boxes

RANGE_PER_STRIDE = 6.0  # a level regresses distances up to 6 strides; the next level takes over from there


def size_ranges(strides: tuple[int, ...]) -> tuple[tuple[float, float], ...]:
    """Per pyramid level, the range of an object's largest centre-to-side distance it regresses (input
    pixels): (0, 48), (48, 96), (96, inf) for strides 8, 16, 32; more levels continue the pattern."""
    bounds = [0.0, *(RANGE_PER_STRIDE * s for s in strides[:-1]), float("inf")]
    return tuple(zip(bounds[:-1], bounds[1:]))


SIZE_RANGES = size_ranges((8, 16, 32))
CENTER_RADIUS = 1.5  # centre sampling: positives lie within 1.5 strides of the box centre


def assign_targets(
    points: torch.Tensor,
    point_strides: torch.Tensor,
    point_levels: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    ignore_boxes: torch.Tensor | None = None,
    ranges: tuple[tuple[float, float], ...] = SIZE_RANGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS assignment for one image.

    points (P, 2), point_strides (P,), point_levels (P,) long; boxes (G, 4) xyxy; labels (G,).
    Returns cls_target (P,) long with -1 = background and -2 = ignored (inside a box we neither
    want nor punish, e.g. a mostly hidden object), and box_target (P, 4) xyxy of the assigned box.
    """
    p = points.shape[0]
    cls_target = torch.full((p,), -1, dtype=torch.long, device=points.device)
    box_target = torch.zeros((p, 4), device=points.device)
    if ignore_boxes is not None and len(ignore_boxes):
        inside = _inside(points, ignore_boxes).any(1)
        cls_target[inside] = -2
    if len(boxes) == 0:
        return cls_target, box_target
    x, y = points[:, 0:1], points[:, 1:2]
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)  # (P, G, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    r = point_strides[:, None] * CENTER_RADIUS
    in_center = ((x - cx).abs() < r) & ((y - cy).abs() < r) & (ltrb.min(-1).values > 0)
    max_dist = ltrb.max(-1).values
    lo = torch.tensor([s[0] for s in ranges], device=points.device)[point_levels]
    hi = torch.tensor([s[1] for s in ranges], device=points.device)[point_levels]
    in_range = (max_dist >= lo[:, None]) & (max_dist <= hi[:, None])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(p, -1).clone()
    area[~(in_center & in_range)] = float("inf")
    min_area, gt_idx = area.min(1)  # ambiguous points go to the smallest box
    pos = torch.isfinite(min_area)
    cls_target[pos] = labels[gt_idx[pos]]
    box_target[pos] = boxes[gt_idx[pos]]
    # A box narrower than the stride can fall between the grid points and get no positive at all;
    # give each such box the free point nearest its centre on its level (fallback, as ATSS-style
    # assigners guarantee), so small far-away objects are still learned.
    has_pos = torch.zeros(len(boxes), dtype=torch.bool, device=points.device)
    has_pos[gt_idx[pos]] = True
    for g in (~has_pos).nonzero().squeeze(1).tolist():
        half = float(torch.maximum(boxes[g, 2] - boxes[g, 0], boxes[g, 3] - boxes[g, 1])) / 2
        level = next(i for i, (a, b) in enumerate(ranges) if half <= b)
        free = (point_levels == level) & (cls_target < 0)
        if not free.any():
            continue
        d = ((points[:, 0] - cx[g]) ** 2 + (points[:, 1] - cy[g]) ** 2).masked_fill(~free, float("inf"))
        j = int(d.argmin())
        cls_target[j] = labels[g]
        box_target[j] = boxes[g]
    return cls_target, box_target


def _inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    x, y = points[:, 0:1], points[:, 1:2]
    return (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])


def centerness_target(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    x, y = points[:, 0], points[:, 1]
    lr = torch.stack([x - boxes[:, 0], boxes[:, 2] - x], -1).clamp(min=1e-6)
    tb = torch.stack([y - boxes[:, 1], boxes[:, 3] - y], -1).clamp(min=1e-6)
    return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalized IoU of matching (N, 4) xyxy boxes."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(1)
    union = area_p + area_t - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0).prod(1)
    return 1 - (iou - (hull - union) / hull.clamp(min=1e-6))


def fcos_loss(
    out: dict[str, torch.Tensor],
    points: torch.Tensor,
    cls_targets: torch.Tensor,
    box_targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Losses for a batch. cls_targets (N, P) with -1 background / -2 ignored; box_targets (N, P, 4)."""
    cls_logits, ltrb, ctr_logits = out["cls_logits"], out["box_ltrb"], out["centerness"]
    num_classes = cls_logits.shape[-1]
    care = cls_targets != -2
    pos = cls_targets >= 0
    num_pos = max(float(pos.sum()), 1.0)
    onehot = torch.zeros_like(cls_logits)
    onehot[pos] = F.one_hot(cls_targets[pos], num_classes).to(onehot.dtype)
    loss_cls = sigmoid_focal_loss(cls_logits[care], onehot[care]).sum() / num_pos
    if not pos.any():
        zero = ltrb.sum() * 0 + ctr_logits.sum() * 0  # keep the graph connected
        return {"cls": loss_cls, "box": zero, "ctr": zero}
    batch_points = points[None].expand(cls_targets.shape[0], -1, -1)[pos]
    tgt_boxes = box_targets[pos]
    ctr_t = centerness_target(batch_points, tgt_boxes)
    pred_boxes = decode_boxes(batch_points, ltrb[pos])  # row i: point i with distances i
    loss_box = (giou_loss(pred_boxes, tgt_boxes) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits[pos], ctr_t, reduction="sum") / num_pos
    return {"cls": loss_cls, "box": loss_box, "ctr": loss_ctr}

