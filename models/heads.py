"""Anchor-free (FCOS-style) detection head that runs on the shared pyramid features.

One tower shared by all pyramid levels, then three predictions per location: class logits, box
distances (left, top, right, bottom) and centerness. Decoding and NMS are in ``models/postprocess.py``
so that one backbone pass can feed any number of heads.

Towers (``HeadConfig.tower``):
  "separable"  depthwise 3x3 + pointwise 1x1 + GroupNorm per block, 1x1 predictions (the default):
               two blocks cost 16% of backbone+neck (batch 8, 2-core CPU; "conv" with two: 49%);
  "conv"       FCOS's own: full 3x3 convs + GroupNorm, 3x3 predictions (checkpoints saved before
               the field existed are this kind);
  "split"      the published FCOS layout (torchvision's ``fcos_resnet50_fpn``): one "conv" tower for
               the classes and another for box and centerness; what ``models/import_fcos.py`` fills.
Measured with ``benchmarks/bench_heads.py`` (``results-heads-2core.json``).
"""

from __future__ import annotations

import numbers

import math
from dataclasses import dataclass, field

import torch
from torch import nn


# Up to this many candidates a frame go through NMS, whose (K, K) maps per image grow with its square (1000: 0.7 s
# for a batch of 8 with every candidate above the threshold, one CPU thread); a crowd fits well under it.
MAX_DETECTIONS = 1000


@dataclass
class HeadConfig:
    classes: list[str]
    tower_convs: int = 2
    tower: str = "separable"  # "separable", "conv" or "split" (see the module docstring)
    # GroupNorm groups in the tower; None: default_groups(channels), up to 8 that divide the channels
    norm_groups: int | None = None
    center_offset: float = 0.5  # a location's point sits at (i + offset) * stride; torchvision's FCOS: 0
    prior_prob: float = 0.01  # initial foreground probability, keeps early focal loss stable
    # Inference defaults; callers can override per call.
    score_threshold: float = 0.35  # chosen for ByteTrack: lower-scored boxes joined tracks as false positives
    nms_iou: float = 0.6
    max_detections: int = 100
    meta: dict = field(default_factory=dict)  # free-form: who trained it, on what

    def __post_init__(self) -> None:
        for name in ("tower_convs", "max_detections", "norm_groups"):
            setattr(self, name, _whole(name, getattr(self, name)))
        for name in ("center_offset", "prior_prob", "score_threshold", "nms_iou"):  # a string failed the range
            value = getattr(self, name)  # check below unnamed: "'<=' not supported between 'str' and 'float'"
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # Real: numpy's floats too
                raise ValueError(f"head {name} must be a number, got {value!r}")
        if not self.classes or isinstance(self.classes, str):  # a string would be a class per letter: 'car' -> c, a, r
            raise ValueError(f"head classes must be a non-empty list of class names, got {self.classes!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"head classes must be unique, got {self.classes}")
        if self.tower_convs < 0:
            raise ValueError(f"head tower_convs must be >= 0, got {self.tower_convs}")
        if self.tower not in TOWERS:
            raise ValueError(f"head tower must be one of {list(TOWERS)}, got {self.tower!r}")
        if not 0.0 <= self.center_offset < 1.0:
            raise ValueError(f"head center_offset must be in [0, 1), got {self.center_offset}")
        if self.max_detections < 1:
            raise ValueError(f"head max_detections must be >= 1, got {self.max_detections}")
        if self.max_detections > MAX_DETECTIONS:  # NMS is quadratic in it: 4000 took 2.2 GB and 14 s a batch of 8
            raise ValueError(f"head max_detections must be at most {MAX_DETECTIONS}, got {self.max_detections}")
        # the checks below fail on NaN too: a NaN threshold passes no score, silently; 0 or 1 broke the bias init
        # (ZeroDivisionError, "math domain error") and 0 groups the divisibility check, neither naming the field
        if self.norm_groups is not None and self.norm_groups < 1:
            raise ValueError(f"head norm_groups must be >= 1 (or null), got {self.norm_groups}")
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"head prior_prob must be in (0, 1), got {self.prior_prob}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"head score_threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.nms_iou <= 1.0:  # below 0 every box suppresses every later one of its class
            raise ValueError(f"head nms_iou must be in [0, 1], got {self.nms_iou}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


TOWERS = ("separable", "conv", "split")


def _whole(name: str, value: object) -> object:
    """An int field's value, 100.0 (YAML's 1e2, a hand-edited file) as 100, as the pydantic configs take it; a bool
    or a fraction is refused by name (a float failed unnamed in torch.topk on a busy frame, True meant 1)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)  # numpy's ints and floats too (a sweep script's computed values)
    raise ValueError(f"head {name} must be a whole number, got {value!r}")


def default_groups(c: int) -> int:
    """GroupNorm's groups for ``c`` channels: up to 8 of at least 4 channels, and a divisor of ``c`` (100
    channels: 4, not 8, which failed); where min(8, c // 4) divides ``c`` it is that, so trained weights load."""
    return math.gcd(c, max(1, min(8, c // 4)))


def make_tower(c: int, config: HeadConfig) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: the tower is shared by levels with different statistics.
    groups = config.norm_groups or default_groups(c)
    layers: list[nn.Module] = []
    for _ in range(config.tower_convs):
        if config.tower == "separable":  # depthwise + pointwise: ~1/8 of a full 3x3 conv's work at 64 channels
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1)]
        else:
            layers.append(nn.Conv2d(c, c, 3, padding=1))
        layers += [nn.GroupNorm(groups, c), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Scale(nn.Module):
    """Learnable scalar per pyramid level: levels share the regression conv but not its range."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DetectionHead(nn.Module):
    def __init__(self, in_channels: int, strides: tuple[int, ...], config: HeadConfig):
        super().__init__()
        self.config = config
        self.strides = tuple(strides)
        c = in_channels
        if config.norm_groups is not None and c % config.norm_groups:
            raise ValueError(f"head norm_groups {config.norm_groups} must divide the neck's {c} channels")
        if config.tower == "split":  # separate towers for classes and for boxes (the published FCOS)
            self.cls_tower, self.box_tower = make_tower(c, config), make_tower(c, config)
        else:
            self.tower = make_tower(c, config)
        k = 1 if config.tower == "separable" else 3
        self.cls_logits = nn.Conv2d(c, config.num_classes, k, padding=k // 2)
        self.box_ltrb = nn.Conv2d(c, 4, k, padding=k // 2)
        self.centerness = nn.Conv2d(c, 1, k, padding=k // 2)
        self.scales = nn.ModuleList(Scale() for _ in strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - config.prior_prob) / config.prior_prob))

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps pyramid levels to flat per-location predictions, levels concatenated in order.

        Returns ``cls_logits`` (N, P, C), ``box_ltrb`` (N, P, 4) distances in input pixels,
        ``centerness`` (N, P) logits, where P = sum of H_l * W_l over levels.
        """
        if len(feats) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feats)}")
        cls, box, ctr = [], [], []
        for feat, stride, scale in zip(feats, self.strides, self.scales):
            if self.config.tower == "split":
                tc, t = self.cls_tower(feat), self.box_tower(feat)
            else:
                tc = t = self.tower(feat)
            cls.append(self.cls_logits(tc).flatten(2).transpose(1, 2))  # (N, HW, C)
            # relu keeps distances non-negative; x stride makes one set of conv weights fit all levels
            ltrb = torch.relu(scale(self.box_ltrb(t))) * stride
            box.append(ltrb.flatten(2).transpose(1, 2))  # (N, HW, 4)
            ctr.append(self.centerness(t).flatten(1))  # (N, HW); reshape(n, -1) failed on an empty batch
        return {"cls_logits": torch.cat(cls, 1), "box_ltrb": torch.cat(box, 1), "centerness": torch.cat(ctr, 1)}
