"""Scores every head of a model on held-out synthetic scenes with supervision's mAP."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Sequence

import numpy as np
import supervision as sv
import torch
from supervision.metrics import MeanAveragePrecision
from tqdm import tqdm

from models.datasets import MIN_VISIBILITY, TRAIN_SEED_LIMIT
from models.hydranet import HydraNet
from models.letterbox import boxes_to_source, letterbox
from models.postprocess import box_iou
from synthetic.scene import CLASS_NAMES, StreetScene

log = logging.getLogger(__name__)
EVAL_SEED_BASE = TRAIN_SEED_LIMIT + 1  # never used for training
# Without the bar (a log, a pipe; train --unfreeze-stages scoring the other heads twice) a line every this many
# frames: a large model's scoring is minutes, which were silent there.
PROGRESS_EVERY = 100


@dataclass
class EvalConfig:
    scenes: int = 8
    frames_per_scene: int = 40
    frame_stride: int = 5  # frames apart, so samples are not near-duplicates
    batch_size: int = 8
    score_threshold: float = 0.05  # low, so the precision-recall curve is complete
    seed_base: int = EVAL_SEED_BASE


def held_out_frames(cfg: EvalConfig):
    """Yields (image RGB, truth) from scenes whose seeds training never uses."""
    for s in range(cfg.scenes):
        scene = StreetScene(cfg.seed_base + s)
        for i in range(cfg.frames_per_scene * cfg.frame_stride):
            frame, truth = scene.step()
            if i % cfg.frame_stride == cfg.frame_stride - 1:
                yield frame, truth


def drop_ignored(pred: sv.Detections, ignored: np.ndarray, targets: sv.Detections) -> sv.Detections:
    """Removes predictions on mostly hidden objects (not in the targets), as MOT benchmarks do with distractors."""
    if len(pred) == 0 or len(ignored) == 0:
        return pred
    p = torch.from_numpy(pred.xyxy).float()
    on_ignored = box_iou(p, torch.from_numpy(ignored).float()).max(1).values >= 0.5
    if len(targets):
        on_target = box_iou(p, torch.from_numpy(targets.xyxy).float()).max(1).values >= 0.5
        on_ignored &= ~on_target
    return pred[~on_ignored.numpy()]


# (images (N, 3, H, W) uint8, heads per image, score threshold) -> per image {head: arrays}
Detect = Callable[[np.ndarray, list, float], list]


def evaluate(model: HydraNet, cfg: EvalConfig | None = None, progress: bool = False,
             only: Sequence[str] | None = None, detect: Detect | None = None) -> dict:
    """Per head (every head, or those in ``only``): mAP@0.5, mAP@0.5:0.95 and AP@0.5 per class, on held-out
    synthetic scenes. ``detect``: what computes the detections (default: ``model.detect`` in fp32; the serving
    path's ``ModelRunner`` scores a backend and precision, workers/model_runner.py)."""
    cfg = cfg or EvalConfig()
    device = model.mean.device
    if detect is None:
        def detect(images, heads, threshold):
            found = model.detect(torch.from_numpy(images).to(device), heads, score_threshold=threshold)
            return [{name: det.numpy() for name, det in r.items()} for r in found]
    heads = {}
    skipped = {}
    for name in model.head_names if only is None else only:
        classes = model.head_classes(name)
        unknown = [c for c in classes if c not in CLASS_NAMES]
        if unknown:
            skipped[name] = f"classes {unknown} do not occur in synthetic scenes"
            continue
        # synthetic class id -> head class id (-1: not this head's class)
        cmap = np.array([classes.index(c) if c in classes else -1 for c in CLASS_NAMES])
        heads[name] = (cmap, MeanAveragePrecision())
    attrs = {name: AttributeScore(a.config.labels) for name, a in model.attributes.items()
             if a.config.on in heads and set(a.config.of) <= set(CLASS_NAMES)}
    if not heads and not attrs:  # nothing these scenes can score: said at once, not after rendering them all
        return {"frames": 0, "scenes": cfg.scenes, "seed_base": cfg.seed_base, "heads": {}, "skipped": skipped}
    frames, n = held_out_frames(cfg), 0  # a batch at a time: the whole set held at once grows with --scenes
    t0, total = time.time(), cfg.scenes * cfg.frames_per_scene
    bar = tqdm(total=total, desc="eval", unit="frame", disable=not progress)
    while chunk := list(islice(frames, max(1, cfg.batch_size))):
        n += len(chunk)
        boxed = [letterbox(img, model.config.input_size) for img, _ in chunk]
        results = detect(np.stack([b for b, _ in boxed]), [list(heads)] * len(chunk), cfg.score_threshold)
        for (img, truth), (_, lb), res in zip(chunk, boxed, results):
            good = truth.visibility >= MIN_VISIBILITY
            hidden = ~good & (truth.visibility > 0)
            for name, (cmap, metric) in heads.items():
                d = res[name]
                pred = sv.Detections(xyxy=boxes_to_source(d["boxes"], lb), confidence=d["scores"],
                                     class_id=d["class_ids"].astype(int))
                tcls = cmap[truth.class_ids]
                mine = good & (tcls >= 0)
                target = sv.Detections(xyxy=truth.boxes[mine].astype(np.float32), class_id=tcls[mine].astype(int))
                ignored = truth.boxes[hidden & (tcls >= 0)].astype(np.float32)
                metric.update(drop_ignored(pred, ignored, target), target)
            for name, score in attrs.items():
                attr = model.attributes[name].config
                score.update(res[attr.on], lb, truth, good, attr, model.heads[attr.on].config.score_threshold, name)
        bar.update(len(chunk))
        if not progress and n // PROGRESS_EVERY > (n - len(chunk)) // PROGRESS_EVERY:  # passed a multiple of it
            log.info("eval: frame %d/%d, %.2f frames/s", n, total, n / max(1e-6, time.time() - t0))
    bar.close()
    report = {"frames": n, "scenes": cfg.scenes, "seed_base": cfg.seed_base, "heads": {}}
    for name, (cmap, metric) in heads.items():
        r = metric.compute()
        classes = model.head_classes(name)
        if len(r.matched_classes) == 0:  # no target at all: supervision's mAP is its -1 sentinel, not a score
            skipped[name] = f"no visible object of its classes ({', '.join(classes)}) in the {n} frames"
            continue
        per_class = {}
        for cid, ap in zip(r.matched_classes, r.ap_per_class):
            per_class[classes[int(cid)]] = round(float(ap[0]), 4)  # column 0 is IoU 0.5
        report["heads"][name] = {"map50": round(float(r.map50), 4), "map50_95": round(float(r.map50_95), 4),
                                 "ap50_per_class": per_class}
        if missing := [c for c in classes if c not in per_class]:  # not in the head's mAP (COCO skips them)
            report["heads"][name]["classes_without_targets"] = missing
    if attrs:
        report["attributes"] = {name: score.report() for name, score in attrs.items()}
    if skipped:
        report["skipped"] = skipped
    return report


class AttributeScore:
    """An attribute head's accuracy on the boxes the service would publish: detections at the head's own
    score threshold matched one-to-one to visible ground-truth objects of its classes (IoU >= 0.5)."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.confusion = np.zeros((len(labels), len(labels)), np.int64)  # truth x predicted
        self.objects = 0  # ground-truth objects it should label
        self.unlabelled = 0  # of those, matched by a detection that carried no label (another class)

    def update(self, d: dict, lb, truth, good: np.ndarray, attr, threshold: float, name: str) -> None:
        names = np.array([CLASS_NAMES[c] for c in truth.class_ids])
        mine = good & np.isin(names, attr.of) & np.isin(truth.kinds, self.labels)
        self.objects += int(mine.sum())
        keep = np.flatnonzero(d["scores"] >= threshold)
        # surest first: an FCOS location gives a car and a bicycle the very same box, and an IoU tie must go to the car
        keep = keep[np.argsort(-d["scores"][keep], kind="stable")]
        if not mine.any() or not len(keep):
            return
        boxes = torch.from_numpy(boxes_to_source(d["boxes"][keep], lb)).float()
        iou = box_iou(torch.from_numpy(truth.boxes[mine]).float(), boxes).numpy()
        predicted = d[f"attr:{name}"][keep]
        for t, p in greedy_pairs(iou, 0.5):
            label = predicted[p]
            if label == "":
                self.unlabelled += 1
            else:
                self.confusion[self.labels.index(truth.kinds[mine][t]), self.labels.index(label)] += 1

    def report(self) -> dict:
        scored = int(self.confusion.sum())
        # None, not 0.0, where no object was scored: a script cannot tell 0 of 0 from every label wrong
        accuracy = round(float(np.trace(self.confusion) / scored), 4) if scored else None
        return {"accuracy": accuracy, "scored": scored,
                "objects": self.objects, "matched_without_label": self.unlabelled,
                "confusion_truth_x_predicted": {t: dict(zip(self.labels, map(int, row)))
                                                for t, row in zip(self.labels, self.confusion)}}


def greedy_pairs(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs by descending IoU, each at least ``threshold``; of equal IoUs the first row,
    then the first column wins (numpy's default sort orders ties differently from one CPU to another)."""
    pairs, rows, cols = [], set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        r, c = divmod(int(flat), iou.shape[1])
        if iou[r, c] < threshold:
            break
        if r not in rows and c not in cols:
            pairs.append((r, c))
            rows.add(r)
            cols.add(c)
    return pairs
