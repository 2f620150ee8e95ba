"""Training an attribute head on a frozen model: everything else stays bit-identical.

The head learns from ground-truth boxes of its classes, jittered by a few percent of their size so that it
sees what a detector's boxes look like, on the synthetic scenes (the data that knows each car's body type).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.checkpoint import load_checkpoint, save_checkpoint, training_into
from models.datasets import DatasetError, SyntheticFrames, collate
from synthetic.scene import CAR_KINDS, CLASS_NAMES

log = logging.getLogger(__name__)
# what the synthetic scenes label, per attribute: the classes that carry it and its values ("" for other classes)
DATA_ATTRIBUTES = {"kind": (("car",), CAR_KINDS)}
# Without the bar (a log, a pipe, CI) a line every this many steps, as models/train.py logs: 150 steps of the
# README's attribute example ran 104 s in silence, its 600 ~7 minutes.
PROGRESS_EVERY = 100


@dataclass
class AttributeTrainConfig:
    init: Path  # the model to add the head to
    out: Path
    name: str  # the head's name, and the data's attribute it learns ("kind": a car's body type)
    labels: list[str]
    on: str  # detection head whose boxes it labels
    of: list[str]  # that head's classes it labels
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    jitter: float = 0.08  # box corners move by up to this fraction of the box's size
    seed: int = 0

    def __post_init__(self) -> None:
        self.init, self.out = Path(self.init), Path(self.out)
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        check_seed(self.seed)


def check_seed(seed: int) -> None:
    """A seed both torch and numpy take: numpy refuses a negative one, deep in the first step."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed}")


def targets(samples, cfg: AttributeTrainConfig, rng: np.random.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per image the (jittered) boxes to label, and all their label indices in order."""
    boxes, labels = [], []
    for s in samples:
        values = s.attributes.get(cfg.name)
        if values is None:
            raise DatasetError(f"the training data has no attribute {cfg.name!r} (synthetic scenes have: kind)")
        names = np.array([CLASS_NAMES[c] for c in s.labels])
        keep = np.isin(names, cfg.of) & np.isin(values, cfg.labels)
        b = s.boxes[keep].copy()
        size = np.concatenate([b[:, 2:] - b[:, :2]] * 2, 1)
        b += rng.uniform(-cfg.jitter, cfg.jitter, b.shape).astype(np.float32) * size
        boxes.append(torch.from_numpy(b))
        labels += [cfg.labels.index(v) for v in values[keep]]
    return boxes, torch.tensor(labels, dtype=torch.long)


def head_only_optimizer(model: torch.nn.Module, head: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Freezes ``model`` except ``head`` and returns the head's optimizer: a new head on frozen features."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)


def head_lr(lr: float, step: int, steps: int) -> float:
    """Cosine decay from ``lr`` to 5% of it over ``steps`` (no warm-up: the head is small and starts fresh)."""
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def log_progress(step: int, steps: int, loss: float, t0: float) -> None:
    """The bar's place where it is off: every ``PROGRESS_EVERY`` steps, the step, smoothed loss and speed."""
    if (step + 1) % PROGRESS_EVERY == 0:
        log.info("step %d/%d loss %.3f %.2f steps/s", step + 1, steps, loss, (step + 1) / max(1e-6, time.time() - t0))


def check_data(cfg: AttributeTrainConfig) -> None:
    """Refuses before any training an attribute the data cannot teach: every step skipped boxes it never labels,
    and the refusal came after the whole run (8 min at the defaults on a CPU); a head shown one label was saved."""
    classes, values = DATA_ATTRIBUTES.get(cfg.name, (cfg.of, cfg.labels))  # an unknown name: the first step says so
    if not set(cfg.of) & set(classes):
        raise DatasetError(f"attribute {cfg.name!r}: no box of {cfg.on!r} ({', '.join(cfg.of)}) in the training data "
                           f"has it (synthetic scenes give it to {', '.join(classes)}); nothing to learn from")
    if len(known := set(cfg.labels) & set(values)) < 2:
        raise DatasetError(f"attribute {cfg.name!r}: the training data shows {len(known)} of the labels {cfg.labels} "
                           f"(it has {', '.join(values)}); a head needs two to tell apart")


def train_attribute(cfg: AttributeTrainConfig, progress: bool = True) -> Path:
    check_data(cfg)
    with training_into(cfg.out):  # one run per --out, as `train`
        return _train_attribute(cfg, progress)


def _train_attribute(cfg: AttributeTrainConfig, progress: bool) -> Path:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, training = load_checkpoint(cfg.init, device=device)
    head = model.add_attribute(cfg.name, cfg.labels, cfg.on, cfg.of)
    opt = head_only_optimizer(model, head, cfg.lr)
    model.eval()
    head.train()  # only the new head: BatchNorm statistics elsewhere stay as they are
    loader = DataLoader(SyntheticFrames(model.config.input_size, seed=cfg.seed), batch_size=cfg.batch_size,
                        collate_fn=collate, num_workers=1)
    batches = iter(loader)
    bar = tqdm(range(cfg.steps), desc=f"train attribute {cfg.name}", unit="step", disable=not progress)
    t0, smooth, seen, losses = time.time(), None, 0, []
    per_label = np.zeros(len(cfg.labels), np.int64)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = head_lr(cfg.lr, step, cfg.steps)
        images, samples = next(batches)
        boxes, labels = targets(samples, cfg, rng)
        if len(labels):  # a batch without a box to label is skipped
            with torch.no_grad():
                feats = model.features(model.normalize(images.to(device)))
            loss = F.cross_entropy(head(feats, [b.to(device) for b in boxes]), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(labels)
            per_label += np.bincount(labels.numpy(), minlength=len(cfg.labels))
            losses.append(loss.item())
            smooth = losses[-1] if smooth is None else 0.95 * smooth + 0.05 * losses[-1]
            bar.set_postfix(loss=f"{smooth:.3f}")
        if not progress and smooth is not None:  # progress for logs and pipes, where the bar is off
            log_progress(step, cfg.steps, smooth, t0)
    if not seen:  # every step was skipped: the head never trained, and must not be saved as if it had
        raise DatasetError(f"attribute {cfg.name!r}: in {cfg.steps} steps of training data no box of {cfg.on!r} "
                           f"({', '.join(cfg.of)}) had one of the labels {cfg.labels}; nothing to learn from")
    if unseen := [label for label, n in zip(cfg.labels, per_label) if not n]:
        log.warning("attribute %r: the training data never showed %s: the head cannot have learned %s",
                    cfg.name, ", ".join(map(repr, unseen)), "them" if len(unseen) > 1 else "it")
    history = list(training.get("history", []))
    history.append({"attribute": cfg.name, "labels": cfg.labels, "on": cfg.on, "of": cfg.of, "steps": cfg.steps,
                    "seed": cfg.seed, "objects_seen": seen, "seconds": round(time.time() - t0, 1),
                    "first_loss": float(np.mean(losses[:20])), "final_loss": smooth, "frozen_shared": True,
                    "init": str(cfg.init)})
    return save_checkpoint(model, cfg.out, {**training, "history": history})
