"""Anchor-free (FCOS-style) detection head that runs on the shared pyramid features.

One tower of 3x3 convs shared by all pyramid levels, then three predictions per location:
class logits, box distances (left, top, right, bottom) and centerness. Decoding and NMS are in
``models/postprocess.py`` so that one backbone pass can feed any number of heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadConfig:
    classes: list[str]
    tower_convs: int = 2
    prior_prob: float = 0.01  # initial foreground probability, keeps early focal loss stable
    # Inference defaults; callers can override per call.
    score_threshold: float = 0.35  # chosen for ByteTrack: lower-scored boxes joined tracks as false positives
    nms_iou: float = 0.6
    max_detections: int = 100
    meta: dict = field(default_factory=dict)  # free-form: who trained it, on what

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("head classes must be a non-empty list of class names")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"head classes must be unique, got {self.classes}")
        if self.tower_convs < 0:
            raise ValueError(f"head tower_convs must be >= 0, got {self.tower_convs}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
        tower: list[nn.Module] = []
        for _ in range(config.tower_convs):
            # GroupNorm rather than BatchNorm: the tower is shared by levels with different statistics.
            tower += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.ReLU(inplace=True)]
        self.tower = nn.Sequential(*tower)
        self.cls_logits = nn.Conv2d(c, config.num_classes, 3, padding=1)
        self.box_ltrb = nn.Conv2d(c, 4, 3, padding=1)
        self.centerness = nn.Conv2d(c, 1, 3, padding=1)
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
            t = self.tower(feat)
            n = t.shape[0]
            cls.append(self.cls_logits(t).flatten(2).transpose(1, 2))  # (N, HW, C)
            # relu keeps distances non-negative; x stride makes one set of conv weights fit all levels
            ltrb = torch.relu(scale(self.box_ltrb(t))) * stride
            box.append(ltrb.flatten(2).transpose(1, 2))  # (N, HW, 4)
            ctr.append(self.centerness(t).reshape(n, -1))  # (N, HW)
        return {"cls_logits": torch.cat(cls, 1), "box_ltrb": torch.cat(box, 1), "centerness": torch.cat(ctr, 1)}
