"""Scores against a synthetic scene's ground truth: tracking (MOTA / IDF1) and, in pipeline/analytics_eval.py,
zones and lines. The tests (tests/mot.py re-exports these) and the benchmarks share them.
"""

from __future__ import annotations

import numpy as np
import torch
from trackers.eval import compute_clear_metrics, compute_identity_metrics

from models.postprocess import box_iou
from synthetic.scene import CLASS_NAMES, StreetScene


def scene_truth(seed: int, frames: int, width: int = 640, height: int = 360, fps: float = 25.0) -> list:
    scene = StreetScene(seed, width=width, height=height, fps=fps)
    return [scene.step()[1] for _ in range(frames)]


def mot_scores(messages: list[dict], truths: list, min_visibility: float = 0.5, start: int = 0) -> dict:
    """MOTA / IDF1 (trackers.eval, IoU 0.5) of the published tracks against the scene's truth.

    A track is identified by (head, track_id); a detection may only match a truth box of the same
    class. Frames without a message count as frames where nothing was found. Predictions on mostly
    hidden objects are ignored, as MOT benchmarks do with distractors. Frames before ``start`` are not scored.
    """
    by_frame = {m["frame"]: m for m in messages}
    ids: dict[tuple[str, int], int] = {}
    gt_ids, tr_ids, sims = [], [], []
    missing = 0
    for f, truth in enumerate(truths):
        if f < start:
            continue
        good = truth.visibility >= min_visibility
        hidden = (truth.visibility > 0) & ~good
        gt_boxes = torch.tensor(truth.boxes[good], dtype=torch.float32).reshape(-1, 4)
        gt_cls = truth.class_ids[good]
        msg = by_frame.get(f)
        if msg is None:
            missing += 1
        dets = [d for d in (msg["detections"] if msg else []) if d["track_id"] is not None]
        p_boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32).reshape(-1, 4)
        # A class the scene has no objects of (a user's model may know more) matches no truth: a false positive.
        p_cls = np.array([CLASS_NAMES.index(d["class"]) if d["class"] in CLASS_NAMES else -1 for d in dets], dtype=int)
        iou = box_iou(gt_boxes, p_boxes).numpy() * (gt_cls[:, None] == p_cls[None, :])
        if len(dets) and hidden.any():
            h_iou = box_iou(torch.tensor(truth.boxes[hidden], dtype=torch.float32), p_boxes).numpy()
            on_hidden = (h_iou >= 0.5).any(0) & ~((iou >= 0.5).any(0) if len(gt_boxes) else np.zeros(len(dets), bool))
            keep = ~on_hidden
            dets = [d for d, k in zip(dets, keep) if k]
            iou = iou[:, keep]
        tr = np.array([ids.setdefault((d["head"], d["track_id"]), len(ids)) for d in dets], dtype=int)
        gt_ids.append(truth.object_ids[good].astype(int))
        tr_ids.append(tr)
        sims.append(iou.astype(np.float64))
    clear = compute_clear_metrics(gt_ids, tr_ids, sims, threshold=0.5)
    ident = compute_identity_metrics(gt_ids, tr_ids, sims, threshold=0.5)
    return {"MOTA": float(clear["MOTA"]), "IDF1": float(ident["IDF1"]), "IDSW": int(clear["IDSW"]),
            "FP": int(clear["CLR_FP"]), "FN": int(clear["CLR_FN"]), "TP": int(clear["CLR_TP"]),
            "frames": max(0, len(truths) - max(start, 0)), "frames_without_message": missing, "tracks": len(ids)}
