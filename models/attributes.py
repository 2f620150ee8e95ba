"""Attribute heads: label each detected object (e.g. a car's body type) from RoI-pooled shared features.

An attribute head rides on a detection head (``on``): for each of that head's boxes of the classes in
``of``, it samples a ``pool`` x ``pool`` grid of the pyramid level that suits the box's size (bilinear, as
RoIAlign does, written with ``grid_sample`` because torchvision is not a dependency here) and maps it to
label logits with a small MLP. It adds no work per frame beyond its boxes: the backbone ran already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttributeConfig:
    labels: list[str]  # what it tells apart, e.g. ["sedan", "hatch", "van"]
    on: str  # the detection head whose boxes it labels
    of: list[str]  # which of that head's classes get a label (others get none)
    pool: int = 7  # RoI grid side
    hidden: int = 128
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"attribute labels must be at least two unique names, got {self.labels}")
        if not self.of:
            raise ValueError("attribute 'of' must name at least one class of its detection head")
        if self.pool < 1 or self.hidden < 1:
            raise ValueError(f"attribute pool and hidden must be positive, got {self.pool}, {self.hidden}")


def roi_features(feats: list[torch.Tensor], strides: tuple[int, ...], boxes: list[torch.Tensor],
                 pool: int) -> torch.Tensor:
    """(K, C, pool, pool) features of every box (model-input pixels, one tensor per image, K in all).

    A box is read on the level where it spans about ``pool`` to ``2 * pool`` cells (the finest level for
    smaller boxes, the coarsest for larger), at the centres of a pool x pool grid of bins.
    """
    c = feats[0].shape[1]
    total = sum(len(b) for b in boxes)
    out = feats[0].new_zeros((total, c, pool, pool))
    if total == 0:
        return out
    bins = (torch.arange(pool, device=feats[0].device, dtype=torch.float32) + 0.5) / pool  # bin centres, 0..1
    start = 0
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        b = b.float()
        side = ((b[:, 2] - b[:, 0]).clamp(min=1) * (b[:, 3] - b[:, 1]).clamp(min=1)).sqrt()
        level = torch.floor(torch.log2(side / (strides[0] * pool))).clamp(0, len(feats) - 1).long()
        for lv in level.unique().tolist():
            idx = (level == lv).nonzero().squeeze(1)
            f, s = feats[lv][i:i + 1], strides[lv]
            h, w = f.shape[-2:]
            x = b[idx, 0:1] + (b[idx, 2:3] - b[idx, 0:1]) * bins  # (k, pool) in pixels
            y = b[idx, 1:2] + (b[idx, 3:4] - b[idx, 1:2]) * bins
            # grid_sample(align_corners=False): -1 and 1 are the outer edges of the map; pixel x is x / s cells in
            gx, gy = 2 * x / (s * w) - 1, 2 * y / (s * h) - 1
            grid = torch.stack([gx[:, None, :].expand(-1, pool, -1), gy[:, :, None].expand(-1, -1, pool)], -1)
            sampled = F.grid_sample(f, grid.reshape(1, -1, pool, 2).to(f.dtype), align_corners=False)  # (1, C, k*pool, pool)
            # .to(): under autocast grid_sample runs in fp32 (on CUDA and CPU) while the pyramid is fp16/bf16
            out[start + idx] = sampled.reshape(c, len(idx), pool, pool).transpose(0, 1).to(out.dtype)
        start += len(b)
    return out


class AttributeHead(nn.Module):
    def __init__(self, in_channels: int, strides: tuple[int, ...], config: AttributeConfig):
        super().__init__()
        self.config, self.strides = config, tuple(strides)
        p = config.pool
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.GroupNorm(min(8, in_channels // 4), in_channels),
            nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(in_channels * p * p, config.hidden), nn.ReLU(inplace=True),
            nn.Linear(config.hidden, len(config.labels)))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """Label logits (K, labels) for the boxes of each image (model-input pixels)."""
        return self.mlp(roi_features(feats, self.strides, boxes, self.config.pool))
