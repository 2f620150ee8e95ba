"""Training the re-ID head on a frozen model from synthetic identities: everything else stays bit-identical.

A step shows the head a few frames of each of a few street scenes, seconds apart (each object seen from other
poses, sizes, light and partial occlusions), and asks, by a supervised contrastive loss, that the views of one
object lie closer together than the views of the other objects in the same scene: exactly the choice the
tracker has to make. Boxes are the true ones jittered as a detector's would be.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load_checkpoint, save_checkpoint, training_into
from models.datasets import FIRST_TRAIN_SEED, MIN_VISIBILITY, TRAIN_SEED_LIMIT, DatasetError
from models.letterbox import boxes_to_model, letterbox
from models.reid import contrastive_loss
from models.train_attributes import check_seed, head_lr, head_only_optimizer, log_progress
from synthetic.scene import CLASS_NAMES, StreetScene

@dataclass
class ReIDTrainConfig:
    init: Path  # the model to add the head to
    out: Path
    heads: list[str]  # detection heads whose boxes it embeds
    steps: int = 300
    scenes_per_step: int = 2
    views: int = 4  # frames of one scene per step
    gap: tuple[int, int] = (3, 15)  # frames between views (at 10 fps: 0.3 to 1.5 s)
    density: tuple[float, float] = (1.5, 3.0)  # crowded streets: many objects to tell apart
    lr: float = 2e-3
    temperature: float = 0.1
    jitter: float = 0.08  # box corners move by up to this fraction of the box's size
    dim: int = 32
    colour: int = 4  # mean colours of a 4 x 4 grid per box (models/reid.py)
    seed: int = 0

    def __post_init__(self) -> None:
        self.init, self.out = Path(self.init), Path(self.out)
        if self.steps <= 0 or self.scenes_per_step <= 0 or self.views < 2:
            raise ValueError(f"steps and scenes_per_step must be positive and views at least 2, got "
                             f"{self.steps}, {self.scenes_per_step}, {self.views}")
        if not 1 <= self.gap[0] <= self.gap[1]:  # 0 frames apart: a view would repeat the one before it
            raise ValueError(f"gap must be (min, max) frames with 1 <= min <= max, got {self.gap}")
        if not 0 < self.temperature < math.inf:  # 0 divides by zero: a head of NaN
            raise ValueError(f"temperature must be positive and finite, got {self.temperature}")
        if not 0 <= self.jitter < 0.5:  # half the box or more turns a box inside out
            raise ValueError(f"jitter must be in [0, 0.5), got {self.jitter}")
        check_seed(self.seed)


def identity_views(input_size: tuple[int, int], cfg: ReIDTrainConfig, rng: np.random.Generator,
                   scene_size: tuple[int, int] = (640, 360), pool: int = 4,
                   scene_frames: int = 300) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
    """Endless groups of ``cfg.views`` frames of one scene: (images (V, 3, H, W) uint8 letterboxed, boxes per
    frame (model-input pixels, jittered), object ids per frame). Objects less than half visible are left out."""
    w, h = scene_size

    def new_scene() -> list:
        seed = int(rng.integers(FIRST_TRAIN_SEED, TRAIN_SEED_LIMIT))
        return [StreetScene(seed, width=w, height=h, fps=10.0, density=float(rng.uniform(*cfg.density))), 0]

    scenes = [new_scene() for _ in range(pool)]
    while True:
        slot = int(rng.integers(pool))
        images, boxes, ids = [], [], []
        for _ in range(cfg.views):
            for _ in range(int(rng.integers(cfg.gap[0], cfg.gap[1] + 1))):
                frame, truth = scenes[slot][0].step()
                scenes[slot][1] += 1
            good = truth.visibility >= MIN_VISIBILITY
            image, lb = letterbox(frame, input_size)
            b = boxes_to_model(truth.boxes[good], lb).reshape(-1, 4)
            size = np.concatenate([b[:, 2:] - b[:, :2]] * 2, 1)
            b = b + rng.uniform(-cfg.jitter, cfg.jitter, b.shape).astype(np.float32) * size
            images.append(image)
            boxes.append(b.astype(np.float32))
            ids.append(truth.object_ids[good])
        if scenes[slot][1] >= scene_frames:
            scenes[slot] = new_scene()
        yield np.stack(images), boxes, ids


def train_reid(cfg: ReIDTrainConfig, progress: bool = True) -> tuple[Path, list[float]]:
    """Adds a re-ID head to ``cfg.init``, trains it, saves the whole model to ``cfg.out``; returns the path and
    the loss of every step."""
    with training_into(cfg.out):  # one run per --out, as `train`
        return _train_reid(cfg, progress)


def _train_reid(cfg: ReIDTrainConfig, progress: bool) -> tuple[Path, list[float]]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, training = load_checkpoint(cfg.init, device=device)
    # Features come from a copy with BatchNorm folded (the frozen backbone's arithmetic as served, and faster);
    # the file written is the model as loaded plus the head.
    frozen = copy.deepcopy(model).eval()
    frozen.fuse_batchnorm()
    head = model.add_reid(cfg.heads, dim=cfg.dim, colour=cfg.colour)
    opt = head_only_optimizer(model, head, cfg.lr)
    head.train()
    groups = identity_views(model.config.input_size, cfg, rng)
    losses: list[float] = []
    t0, seen, repeats = time.time(), 0, 0
    bar = tqdm(range(cfg.steps), desc="train reid", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = head_lr(cfg.lr, step, cfg.steps)
        batch = [next(groups) for _ in range(cfg.scenes_per_step)]
        images = torch.from_numpy(np.concatenate([b[0] for b in batch])).to(device)
        with torch.no_grad():
            x = frozen.normalize(images)
            feats = frozen.features(x)
        boxes = [torch.from_numpy(b).to(device) for group in batch for b in group[1]]
        emb = head(feats, boxes, x)
        # one loss per scene: other scenes' objects are not the confusions the tracker meets
        loss, start = emb.sum() * 0.0, 0
        for _, group_boxes, group_ids in batch:
            n = sum(len(b) for b in group_boxes)
            ids = torch.from_numpy(np.concatenate(group_ids)).to(device)
            loss = loss + contrastive_loss(emb[start:start + n], ids, cfg.temperature) / len(batch)
            start += n
            seen += n
            repeats += n - len(np.unique(np.concatenate(group_ids)))  # views of an object seen before: its positives
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if not progress:  # progress for logs and pipes, where the bar is off
            log_progress(step, cfg.steps, float(np.mean(losses[-20:])), t0)
    if not repeats:  # the loss was 0 on every step: the head never trained, and must not be saved as if it had
        raise DatasetError(f"re-ID: in {cfg.steps} steps no object was seen in two views (density {cfg.density}); "
                           "nothing to learn from")
    head.eval()
    history = list(training.get("history", []))
    history.append({"reid": cfg.heads, "dim": cfg.dim, "steps": cfg.steps, "seed": cfg.seed, "views_seen": seen,
                    "seconds": round(time.time() - t0, 1), "first_loss": float(np.mean(losses[:20])),
                    "final_loss": float(np.mean(losses[-20:])), "frozen_shared": True, "init": str(cfg.init)})
    return save_checkpoint(model, cfg.out, {**training, "history": history}), losses


@torch.no_grad()
def match_accuracy(model, seeds: list[int], pairs: int = 20, gap: int = 10, density: float = 3.0,
                   scene_size: tuple[int, int] = (640, 360)) -> dict:
    """How often an object's nearest embedding (cosine), among the objects of its class in a frame ``gap``
    frames later (10 fps), is the object itself: the choice a re-link makes. True boxes, objects at least half
    visible in both frames, of the classes of the heads it embeds (the service compares no other embeddings); on
    scenes of ``seeds`` (keep them out of training: below FIRST_TRAIN_SEED)."""
    embedded = {c for head in model.config.reid["heads"] for c in model.config.heads[head]["classes"]}
    scored = np.array([c in embedded for c in CLASS_NAMES])  # per class id of the scenes
    hits = total = 0
    chance = 0.0
    for seed in seeds:
        scene = StreetScene(seed, width=scene_size[0], height=scene_size[1], fps=10.0, density=density)
        for _ in range(pairs):
            views = []
            for _ in range(2):
                for _ in range(gap):
                    frame, truth = scene.step()
                good = (truth.visibility >= MIN_VISIBILITY) & scored[truth.class_ids]
                image, lb = letterbox(frame, model.config.input_size)
                views.append((image, boxes_to_model(truth.boxes[good], lb).reshape(-1, 4).astype(np.float32),
                              truth.object_ids[good], truth.class_ids[good]))
            images = torch.from_numpy(np.stack([v[0] for v in views])).to(model.mean.device)
            x = model.normalize(images)
            emb = model.reid(model.features(x), [torch.from_numpy(v[1]).to(images.device) for v in views], x).cpu().numpy()
            (_, _, ida, ca), (_, _, idb, cb) = views
            ea, eb = emb[:len(ida)], emb[len(ida):]
            for i, (oid, c) in enumerate(zip(ida, ca)):
                same = cb == c
                if oid not in idb[same] or same.sum() < 2:
                    continue  # gone, or nothing to confuse it with
                sims = np.where(same, eb @ ea[i], -np.inf)
                hits += int(idb[int(np.argmax(sims))] == oid)
                total += 1
                chance += 1.0 / same.sum()
    if not total:  # None, not 0.0: nothing compared is not every match wrong
        return {"accuracy": None, "chance": None, "scored": 0}
    return {"accuracy": round(hits / total, 4), "chance": round(float(chance) / total, 4), "scored": total}
