"""Training: a backbone with heads from scratch, or from a checkpoint in one of three fine-tuning modes.

  freeze_shared     new heads on the frozen model: everything else stays bit-identical
  unfreeze_stages   the heads named in ``heads``, the backbone's last N stages and the neck train; the
                    model's other heads read the changed features untrained, so their held-out mAP is
                    measured before and after and recorded in the checkpoint's history (and printed)
  lora              new heads on a LoRA adapter of the frozen backbone (``models/lora.py``): the other
                    heads stay bit-identical, and the output file holds only the adapter and the new heads

Resumable: every ``checkpoint_every`` steps the full state (weights, optimizer, schedule, step)
is written next to the output, and a rerun of the same command continues from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.checkpoint import checkpoint_files, load_checkpoint, read_tensors, save_checkpoint, training_into
from models.datasets import DatasetError, Sample, SyntheticFrames, YoloFolder, collate
from models.evaluate import EvalConfig, evaluate
from models.files import aside_of, written_aside
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.losses import assign_targets, fcos_loss, size_ranges
from models.train_attributes import check_seed

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    out: Path
    heads: dict[str, list[str]]  # head name -> class names (a subset of the data's classes)
    data: str = "synthetic"  # "synthetic" or a YOLO dataset folder
    init: Path | None = None  # start from this checkpoint
    freeze_shared: bool = False  # train only heads not already in `init`; everything else stays bit-identical
    unfreeze_stages: int = 0  # train the backbone's last N stages, the neck and `heads` (from `init`)
    lora: dict | None = None  # {"rank": 4, "stages": 1, "alpha": None}: new heads on a LoRA adapter (from `init`)
    eval_scenes: int = 8  # with unfreeze_stages: the held-out scenes the other heads are scored on
    eval_frames: int = 40  # ... and frames per scene
    input_size: tuple[int, int] = (256, 448)
    backbone: dict = field(default_factory=lambda: {"type": "resnet", "depth": 18, "width": 16})
    neck: dict = field(default_factory=lambda: {"type": "fpn", "channels": 64})
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    seed: int = 0
    checkpoint_every: int = 250
    workers: int = 1

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.init = Path(self.init) if self.init else None
        if not self.heads:
            raise ValueError("train needs at least one head, e.g. --head people=person")
        if self.freeze_shared and self.init is None:
            raise ValueError("freeze_shared (training a new head on a frozen backbone) needs an init checkpoint")
        if sum([self.freeze_shared, self.unfreeze_stages > 0, self.lora is not None]) > 1:
            raise ValueError("choose one fine-tuning mode: freeze_shared, unfreeze_stages or lora")
        if self.unfreeze_stages < 0:
            raise ValueError(f"unfreeze_stages must be >= 0, got {self.unfreeze_stages}")
        if (self.unfreeze_stages or self.lora is not None) and self.init is None:
            raise ValueError("unfreeze_stages and lora fine-tune a trained model: they need an init checkpoint")
        if self.lora is not None and self.out.resolve() == self.init.resolve():
            raise ValueError(f"--out {self.out} is --from: a LoRA adapter's file holds only its additions and loads "
                             "together with its base, which it would overwrite; write it to another file")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # AdamW refuses < 0 only; 0 would train nothing, nan NaNs
            raise ValueError(f"lr (the learning rate) must be a positive number, got {self.lr}")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive, got {self.checkpoint_every}")
        check_seed(self.seed)

    @property
    def state_path(self) -> Path:
        return self.out.with_name(self.out.name + ".train-state.pt")

    @property
    def new_heads_only(self) -> bool:
        """Modes that train only heads not already in ``init`` (and leave the others bit-identical)."""
        return self.freeze_shared or self.lora is not None

    @property
    def partial(self) -> bool:
        """Modes that keep some of the model frozen (in eval mode, so BatchNorm statistics stay)."""
        return self.new_heads_only or self.unfreeze_stages > 0


def build_data(cfg: TrainConfig, input_size: tuple[int, int], seed: int) -> tuple[Any, list[str]]:
    if cfg.data == "synthetic":
        ds = SyntheticFrames(input_size, seed=seed)
        return DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.workers,
                          persistent_workers=cfg.workers > 0), list(ds.classes)
    ds = YoloFolder(cfg.data, input_size, seed=seed)
    gen = torch.Generator().manual_seed(seed % 2**64)  # seed * 1000 + step can pass torch's 64 bits; numpy takes any
    loader = DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                        num_workers=0, generator=gen)
    return loader, list(ds.classes)


def endless(loader: Any):
    while True:
        yield from loader


def class_maps(heads: dict[str, list[str]], data_classes: list[str]) -> dict[str, np.ndarray]:
    """Per head: data class index -> head class index, or -1 for classes the head treats as background."""
    maps = {}
    for head, classes in heads.items():
        missing = [c for c in classes if c not in data_classes]
        if missing:
            raise DatasetError(f"head {head!r}: classes {missing} are not in the data's classes {data_classes}")
        m = np.full(len(data_classes), -1, np.int64)
        for i, c in enumerate(classes):  # every id of the name: a merged dataset can list one class twice
            m[[j for j, d in enumerate(data_classes) if d == c]] = i
        maps[head] = m
    return maps


def check_head_boxes(heads: dict[str, list[str]], ds: YoloFolder) -> None:
    """Refuses a head none of whose classes has a box in the label files (it would learn to detect nothing, and
    be saved as if trained); warns of a head's classes without one."""
    found = {ds.classes[int(c)] for _, rows in ds.items for c in rows[:, 0]}
    for head, classes in heads.items():
        absent = [c for c in classes if c not in found]
        if absent == classes:
            raise DatasetError(f"head {head!r}: no label file in {ds.root} has a box of {classes} (the labels have "
                               f"boxes of {sorted(found)} only)")
        if absent:
            log.warning("head %r: no label file in %s has a box of %s: it learns those as background", head,
                        ds.root, absent)


def build_model(cfg: TrainConfig) -> tuple[HydraNet, dict, list[str]]:
    """The model to train, its prior training history, and the names of the heads to train."""
    if cfg.init is None:
        heads = {name: {"classes": classes} for name, classes in cfg.heads.items()}
        config = HydraNetConfig(input_size=cfg.input_size, backbone=cfg.backbone, neck=cfg.neck, heads=heads)
        return HydraNet(config), {}, list(cfg.heads)
    model, history = load_checkpoint(cfg.init)
    new = [h for h in cfg.heads if h not in model.heads]
    for name in new:
        model.add_head(name, cfg.heads[name])
    for name in cfg.heads:
        if name not in new and model.head_classes(name) != cfg.heads[name]:
            raise ConfigError(f"head {name!r} in {cfg.init} has classes {model.head_classes(name)}, not {cfg.heads[name]}")
    if cfg.new_heads_only and not new:
        mode = "freeze_shared" if cfg.freeze_shared else "lora"
        raise ConfigError(f"{mode} trains new heads only, but every head in {list(cfg.heads)} is already in {cfg.init}")
    if cfg.unfreeze_stages > model.backbone.num_stages:
        raise ConfigError(f"unfreeze_stages {cfg.unfreeze_stages}: the backbone ({model.config.backbone['type']}) "
                          f"has {model.backbone.num_stages} stages")
    if cfg.lora is not None:
        model.add_adapter("_".join(new), new, **cfg.lora)
    return model, history, (new if cfg.new_heads_only else list(cfg.heads))


def trainable_parameters(model: HydraNet, cfg: TrainConfig, heads: list[str]) -> list[torch.nn.Parameter]:
    """The parameters the mode trains; every other one gets requires_grad False."""
    if not cfg.partial:
        return list(model.parameters())
    params = freeze_all_but(model, heads)
    extra: list[torch.nn.Parameter] = []
    if cfg.lora is not None:
        extra = list(model.adapters[model.adapter_of(heads[0])].parameters())
    elif cfg.unfreeze_stages:
        first = model.backbone.num_stages - cfg.unfreeze_stages
        extra = [*model.backbone.stage_parameters(first).values(), *model.neck.parameters()]
    for p in extra:
        p.requires_grad_(True)
    return params + extra


def freeze_all_but(model: HydraNet, trainable: list[str]) -> list[torch.nn.Parameter]:
    """requires_grad only for the given heads; frozen parts also stay in eval mode so BN statistics never move."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name in trainable:
        for p in model.heads[name].parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def set_train_mode(model: HydraNet, trainable: list[str], cfg: TrainConfig) -> None:
    model.eval()
    if not cfg.partial:
        model.train()
    for name in trainable:
        model.heads[name].train()
    if cfg.unfreeze_stages:
        for m in model.backbone.stage_submodules(model.backbone.num_stages - cfg.unfreeze_stages):
            m.train()
        model.neck.train()


def score_heads(model: HydraNet, heads: list[str], cfg: TrainConfig, progress: bool = False) -> dict[str, float | str]:
    """Held-out mAP@0.5 of ``heads`` (or why a head is not scored) and the accuracy of the attribute heads on
    them, as ``hydravision eval`` measures them."""
    model.eval()
    report = evaluate(model, EvalConfig(scenes=cfg.eval_scenes, frames_per_scene=cfg.eval_frames), only=heads,
                      progress=progress)  # minutes for a large model: the bar says it is not stuck
    return {**{h: r["map50"] for h, r in report["heads"].items()},
            **{f"attribute {a}": r["accuracy"] if r["scored"] else "not scored: no detected objects to score"
               for a, r in report.get("attributes", {}).items()},
            **{h: f"not scored: {why}" for h, why in report.get("skipped", {}).items()}}


def lr_at(step: int, cfg: TrainConfig) -> float:
    # a run shorter than the warm-up still decays (not its last step at the peak); longer ones as they were
    warmup = cfg.warmup_steps if cfg.steps > cfg.warmup_steps else cfg.steps // 2
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_targets(model: HydraNet, feats_shapes: list[tuple[int, int]], samples: list[Sample],
                  cmap: np.ndarray, device: torch.device, offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    strides = model.strides
    pts = model.points([torch.empty(1, 1, h, w, device=device) for h, w in feats_shapes], offset)
    ranges = size_ranges(strides)
    pstr = torch.cat([torch.full((h * w,), float(s), device=device) for (h, w), s in zip(feats_shapes, strides)])
    plev = torch.cat([torch.full((h * w,), i, dtype=torch.long, device=device) for i, (h, w) in enumerate(feats_shapes)])
    cls_t, box_t = [], []
    for s in samples:
        labels = cmap[s.labels] if len(s.labels) else s.labels
        mine = labels >= 0
        c, b = assign_targets(pts, pstr, plev, torch.from_numpy(s.boxes[mine]).to(device),
                              torch.from_numpy(labels[mine]).to(device), torch.from_numpy(s.ignore).to(device),
                              ranges)
        cls_t.append(c)
        box_t.append(b)
    return torch.stack(cls_t), torch.stack(box_t)


def memory_format_for(model: HydraNet, device: torch.device) -> torch.memory_format:
    """NHWC: oneDNN's and cuDNN's convs are faster in it (a training step 1.5x on this project's CPU). But torch
    2.13's CPU backward of a strided 1x1 conv narrower than 12 channels in NHWC kills the process (SIGSEGV, a
    ResNet of width 4 or 8 at 192x320): such a model trains in NCHW on a CPU."""
    narrow = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                 and m.in_channels < 12 for m in model.modules())
    return torch.contiguous_format if device.type == "cpu" and narrow else torch.channels_last


# Progress where the bar is off (logs, pipes): a line every PROGRESS_STEPS steps and at least every PROGRESS_EVERY_S.
# Every 100 steps alone left a stage of 60 steps on a loaded machine silent for 25 minutes.
PROGRESS_STEPS, PROGRESS_EVERY_S = 100, 30.0
_clock = time.monotonic  # the progress lines' clock (tests give their own)


def _duration(seconds: float) -> str:
    """A progress line's time left: "40 s", "25 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def train(cfg: TrainConfig, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Trains and writes a checkpoint to ``cfg.out``; returns its path."""
    with training_into(cfg.out):  # one run per --out; the resume state is written beside it every few steps
        return _train(cfg, progress, on_step)


def _train(cfg: TrainConfig, progress: bool, on_step: Callable[[int, dict], None] | None) -> Path:
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.lora is not None and cfg.out.resolve() in [p.resolve() for p in checkpoint_files(cfg.init)[1:]]:
        raise ConfigError(f"--out {cfg.out} is a checkpoint that --from {cfg.init} adds to: the new adapter's file "
                          "loads together with both, and would replace one of them; write it to another file")
    model, history, trainable = build_model(cfg)
    layout = memory_format_for(model, device)
    model.to(device, memory_format=layout)
    params = trainable_parameters(model, cfg, trainable)
    adapter = model.adapter_of(trainable[0]) if cfg.lora is not None else None
    others = [h for h in model.head_names if h not in trainable] if cfg.unfreeze_stages else []
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    start, before, seconds_before = 0, {}, 0.0
    init_digest = weights_digest(cfg.init) if cfg.init is not None else None  # build_model has read it: it is there
    if cfg.state_path.is_file():
        try:
            state = torch.load(cfg.state_path, map_location=device, weights_only=True)
        except Exception as e:  # e.g. cut short by a full disk before its writes were atomic
            raise ConfigError(f"{cfg.state_path}: unreadable resume state ({type(e).__name__}); delete it to "
                              "start over") from None
        if state.get("train_config") != _jsonable(cfg):
            raise ConfigError(f"{cfg.state_path}: resume state is from a different training config; delete it to start over")
        if state.get("init_weights", init_digest) != init_digest:  # (states saved before it was recorded: unchecked)
            raise ConfigError(f"{cfg.state_path}: resume state is of training from {cfg.init} as it was before: that "
                              "file has changed since, and resuming would bring back its old weights; delete the "
                              "state to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, before = int(state["step"]), state.get("other_heads_before", {})
        seconds_before = float(state.get("seconds", 0.0))  # the record's time covers every run of it
        log.info("resuming %s from step %d", cfg.out, start)
    loader, data_classes = build_data(cfg, model.config.input_size, seed=cfg.seed * 1000 + start)
    cmaps = class_maps(cfg.heads, data_classes)
    if isinstance(loader.dataset, YoloFolder):
        check_head_boxes({h: cfg.heads[h] for h in trainable}, loader.dataset)
    if others and not start:  # after the data's checks: scoring takes minutes on a real model
        before = score_heads(model, others, cfg, progress)
        log.info("other heads' held-out mAP@0.5 before unfreezing %d stage(s): %s", cfg.unfreeze_stages, before)
    batches = endless(loader)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=f"train {'+'.join(trainable)}", unit="step", dynamic_ncols=True)
    t0, smooth = time.time(), None
    started = said = _clock()
    for step in bar:
        set_train_mode(model, trainable, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        images, samples = next(batches)
        x = model.normalize(images.to(device)).contiguous(memory_format=layout)
        # Once per adapter the trained heads read (None: the plain maps). Frozen stages record no graph: neither
        # their inputs nor their weights need gradients; with freeze_shared nothing before the heads does.
        with torch.no_grad() if cfg.freeze_shared else contextlib.nullcontext():
            pyramids = {a: model.features(x, a) for a in {model.adapter_of(h) for h in trainable}}
        losses: dict[str, torch.Tensor] = {}
        for name in trainable:
            feats = pyramids[model.adapter_of(name)]  # a head on a LoRA adapter reads the adapter's maps
            shapes = [tuple(f.shape[-2:]) for f in feats]
            offset = model.heads[name].config.center_offset
            cls_t, box_t = batch_targets(model, shapes, samples, cmaps[name], device, offset)
            for k, v in fcos_loss(model.heads[name](feats), model.points(feats, offset), cls_t, box_t).items():
                losses[f"{name}/{k}"] = v
        total = sum(losses.values())
        if not torch.isfinite(total):  # step + 1: as the progress lines count them
            raise FloatingPointError(f"loss became {total.item()} at step {step + 1}: {_fmt(losses)}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        vals = {k: v.item() for k, v in losses.items()}
        smooth = vals if smooth is None else {k: 0.95 * smooth[k] + 0.05 * v for k, v in vals.items()}
        bar.set_postfix_str(f"loss {sum(smooth.values()):.3f} lr {lr_at(step, cfg):.1e}")
        if on_step:
            on_step(step, vals)
        now = _clock()
        if not progress and ((step + 1) % PROGRESS_STEPS == 0 or now - said >= PROGRESS_EVERY_S):
            said, rate = now, (step + 1 - start) / max(1e-6, now - started)
            log.info("step %d/%d loss %.3f (%s) %.2f steps/s, %s left", step + 1, cfg.steps, sum(smooth.values()),
                     ", ".join(f"{k} {v:.3f}" for k, v in smooth.items()), rate,
                     _duration((cfg.steps - step - 1) / rate))
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with written_aside(cfg.state_path, aside_of(cfg.state_path)) as tmp:  # killed mid-save: the last one stays
                torch.save({"step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "train_config": _jsonable(cfg), "other_heads_before": before, "init_weights": init_digest,
                            "seconds": seconds_before + time.time() - t0}, tmp)
    bar.close()
    # a folder absolute: int8 calibration reads it from the history wherever the service runs (models/quantize.py)
    data = cfg.data if cfg.data == "synthetic" else str(Path(cfg.data).resolve())
    record = {"heads": trainable, "steps": cfg.steps, "data": data, "seed": cfg.seed,
              "frozen_shared": cfg.freeze_shared, "init": str(cfg.init) if cfg.init else None,
              "seconds": round(seconds_before + time.time() - t0, 1), "final_loss": smooth}
    if start:
        record["resumed_from_step"] = start
    if cfg.unfreeze_stages:
        record["unfrozen_stages"] = cfg.unfreeze_stages
        if others:  # these heads were not trained, but what they read was: what that did to them
            record["other_heads_map50"] = {"before": before, "after": score_heads(model, others, cfg, progress)}
    if adapter is not None:
        record["lora"] = {"adapter": adapter, **cfg.lora}
    training = {"history": list(history.get("history", [])) + [record]}
    save_checkpoint(model, cfg.out, training, base=cfg.init if adapter is not None else None)
    cfg.state_path.unlink(missing_ok=True)
    return cfg.out


def weights_digest(path: Path) -> str:
    """SHA-256 of a checkpoint's tensors (names and bytes), not of its file: safetensors writes the same
    metadata in a different order each time, so a file saved again with the same weights has other bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(read_tensors(path).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["out"], d["init"] = str(cfg.out), (str(cfg.init) if cfg.init else None)
    d["input_size"] = list(cfg.input_size)
    for key in ("checkpoint_every", "workers", "eval_scenes", "eval_frames"):  # they do not change the training
        d.pop(key)
    return d


def _fmt(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={v.item():.4f}" for k, v in losses.items())
