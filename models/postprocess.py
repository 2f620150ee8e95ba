"""Box decoding and class-aware NMS in torch, on whatever device the head ran on.

Written by hand because torchvision (which has ``batched_nms``) is not a dependency here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class HeadDetections:
    """Detections of one head for one image, in model-input pixels (xyxy)."""

    boxes: torch.Tensor  # (K, 4) float
    scores: torch.Tensor  # (K,) float
    class_ids: torch.Tensor  # (K,) int64
    # attribute head name -> (label index (K,) int64, -1 where it does not apply; its probability (K,); label names)
    attributes: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None  # (K, D) unit vectors from the re-ID head, when the model has one

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def numpy(self) -> dict:
        """Arrays for transport: boxes, scores, class_ids, and per attribute ``attr:NAME`` (label names, "" where
        none applies) and ``attr:NAME:conf``; ``embedding`` (K, D) float16 when the model has a re-ID head."""
        out = {
            "boxes": self.boxes.float().cpu().numpy(),
            "scores": self.scores.float().cpu().numpy(),
            "class_ids": self.class_ids.cpu().numpy(),
        }
        for name, (ids, probs, labels) in self.attributes.items():
            ids = ids.cpu().numpy()
            out[f"attr:{name}"] = np.array([labels[i] if i >= 0 else "" for i in ids], dtype=str)
            out[f"attr:{name}:conf"] = np.where(ids >= 0, probs.float().cpu().numpy(), 0.0).astype(np.float32)
        if self.embeddings is not None:  # half precision: half the bytes between actors, cosines within 1e-3
            out["embedding"] = self.embeddings.to(torch.float16).cpu().numpy()
        return out


def to_cpu(results: list[dict[str, HeadDetections]]) -> list[dict[str, HeadDetections]]:
    """A batch's detections (per image {head: detections}) on the CPU, each field of every image and head
    copied at once: a copy per field of each image's head waits for a GPU each time, hundreds a batch at batch
    32. On a CPU the same code runs; it only concatenates and splits."""
    dets = [d for r in results for d in r.values()]

    def moved(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return torch.cat(tensors).cpu().split([len(t) for t in tensors]) if tensors else ()

    out = [HeadDetections(*fields) for fields in zip(*(moved([getattr(d, f) for d in dets])
                                                       for f in ("boxes", "scores", "class_ids")))]
    for name in dict.fromkeys(n for d in dets for n in d.attributes):
        having = [i for i, d in enumerate(dets) if name in d.attributes]
        ids, probs = (moved([dets[i].attributes[name][k] for i in having]) for k in (0, 1))
        for i, label, prob in zip(having, ids, probs):
            out[i].attributes[name] = (label, prob, dets[i].attributes[name][2])
    having = [i for i, d in enumerate(dets) if d.embeddings is not None]
    for i, e in zip(having, moved([dets[i].embeddings for i in having])):
        out[i].embeddings = e
    host = iter(out)
    return [{head: next(host) for head in r} for r in results]


def make_points(sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device,
                offset: float = 0.5) -> torch.Tensor:
    """Points of every feature-map cell in input pixels, levels concatenated: (P, 2) as (x, y).

    ``offset`` 0.5 puts them at cell centres (ours); torchvision's FCOS anchors sit at ``i * stride`` (0).
    """
    pts = []
    for (h, w), s in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
    return torch.cat(pts, 0)


def decode_boxes(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """(P, 2) points and (..., P, 4) distances -> (..., P, 4) xyxy boxes."""
    x, y = points[:, 0], points[:, 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (..., N, 4) and (..., M, 4) xyxy boxes -> (..., N, M)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    # x and y apart: (N, M) maps instead of (N, M, 2) ones, whose strided last axis made max/min ~4x slower on a CPU
    ax0, ay0, ax1, ay1 = (v[..., :, None] for v in a.unbind(-1))
    bx0, by0, bx1, by1 = (v[..., None, :] for v in b.unbind(-1))
    inter = ((torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(min=0)
             * (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(min=0))
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1e-6)


def nms_keep(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Exact greedy class-aware NMS for a batch of score-sorted candidates, without a Python loop per box.

    boxes (B, K, 4), labels (B, K), valid (B, K) bool, each row sorted by descending score.
    Returns the kept mask (B, K). Box i is kept iff it is valid and no KEPT box j < i of the same
    class overlaps it above the threshold; iterating that rule from "all kept" fixes one more
    position per pass, and in practice converges after as many passes as the longest chain of
    suppressions (a handful), each pass one batched matrix op.
    """
    k = boxes.shape[1]
    if k == 0:
        return valid
    iou = box_iou(boxes, boxes)
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # [j, i]: j before i
    suppresses = (iou > iou_threshold) & (labels[:, :, None] == labels[:, None, :]) & earlier
    suppresses &= valid[:, :, None]
    # Each pass counts, for every box, the kept boxes that suppress it, as one batched matrix product: an
    # elementwise AND and an any() over (B, K, K) booleans took ~10x longer per pass on a CPU (half of the
    # model's post-processing with 40 boxes a frame). Counts up to K are exact in float32.
    weights = suppresses.to(iou.dtype)
    keep = valid.clone()
    for _ in range(k):
        new_keep = valid & (torch.bmm(keep[:, None, :].to(iou.dtype), weights)[:, 0] == 0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def postprocess(
    out: dict[str, torch.Tensor],
    points: torch.Tensor,
    image_size: tuple[int, int],
    score_threshold: float = 0.25,
    nms_iou: float = 0.6,
    max_detections: int = 100,
    pre_nms_topk: int = 300,
) -> list[HeadDetections]:
    """Turns one head's raw output for a batch into per-image detections (model-input pixels).

    Score = sqrt(sigmoid(class) * sigmoid(centerness)), as in FCOS. The top ``pre_nms_topk``
    (location, class) pairs above the threshold go through class-aware NMS.
    """
    cls, ltrb, ctr = out["cls_logits"], out["box_ltrb"], out["centerness"]
    n, p, c = cls.shape
    scores = torch.sqrt(torch.sigmoid(cls.float()) * torch.sigmoid(ctr.float())[..., None]).reshape(n, p * c)
    # a NaN logit (an fp16 overflow, a broken export) scores below everything: topk ranks NaN above every number,
    # so NaNs took the places of the k real detections that ``above`` counted
    scores = scores.nan_to_num(nan=-1.0)
    above = scores > score_threshold
    # Trim K to what any image really has: the NMS cost is quadratic in K. Never below max_detections: a head
    # configured for 500 boxes a frame (a crowd) got at most pre_nms_topk, fewer after NMS, and no word of it.
    k = min(max(pre_nms_topk, max_detections), int(above.sum(1).max().item()) if n else 0)
    if k == 0:  # each image its own (a consumer may add to one), float32 as below: cls is fp16/bf16 under autocast
        return [HeadDetections(scores.new_zeros((0, 4)), scores.new_zeros((0,)),
                               torch.zeros(0, dtype=torch.long, device=cls.device)) for _ in range(n)]
    top_scores, top_idx = scores.topk(k, dim=1)  # sorted descending
    # topk orders equal scores differently for another k, and k follows the batch's busiest image: equal scores
    # (saturated or fp16 logits) ranked by location as well, or NMS kept another of two equal boxes for a frame
    # depending on what else was in its batch
    top_idx, order = top_idx.sort(dim=1)
    top_scores, order = top_scores.gather(1, order).sort(dim=1, descending=True, stable=True)
    top_idx = top_idx.gather(1, order)
    loc, labels = top_idx // c, top_idx % c
    sel_ltrb = torch.gather(ltrb.float(), 1, loc[..., None].expand(n, k, 4))
    boxes = decode_boxes(points[loc.reshape(-1)].reshape(n * k, 2), sel_ltrb.reshape(n * k, 4)).reshape(n, k, 4)
    # a NaN box overlaps nothing (NMS kept it); an infinite distance (an fp16 overflow) clamped to the frame's edge
    finite = boxes.isfinite().all(-1)
    h, w = image_size
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
    valid = (top_scores > score_threshold) & finite
    keep = nms_keep(boxes, labels, valid, nms_iou)
    keep = keep & (keep.cumsum(1) <= max_detections)  # the best max_detections of each image (rows are score-sorted)
    # the kept boxes of the whole batch in one selection, then split per image: two GPU syncs, not one an image
    rows, cols = keep.nonzero(as_tuple=True)
    sizes = keep.sum(1).tolist()
    parts = (x[rows, cols].split(sizes) for x in (boxes, top_scores, labels))
    return [HeadDetections(*d) for d in zip(*parts)]
