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

from models.heads import default_groups


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
    if sum(len(b) for b in boxes) == 0:
        return feats[0].new_zeros((0, c, pool, pool))
    b = torch.cat(boxes).float()
    side = ((b[:, 2] - b[:, 0]).clamp(min=1) * (b[:, 3] - b[:, 1]).clamp(min=1)).sqrt()
    level = torch.floor(torch.log2(side / (strides[0] * pool))).clamp(0, len(feats) - 1).long()
    # Every box's grid at once (its level's extent per box), then one grid_sample per (image, level) on a
    # contiguous run of boxes: grid_sample reads one image per call, so only this loop is per image. On a GPU
    # the one read back to the host (a sync) is the run lengths; the tables below come from Python numbers
    # (no copies to the device) and the counting from scatter_add (bincount reads its range back first).
    width, height = torch.zeros_like(side), torch.zeros_like(side)  # of each box's level, in pixels
    for lv, (f, s) in enumerate(zip(feats, strides)):
        width = torch.where(level == lv, float(s * f.shape[-1]), width)
        height = torch.where(level == lv, float(s * f.shape[-2]), height)
    run = box_images(boxes, b.device) * len(feats) + level  # boxes of one (image, level) pair
    order = torch.argsort(run, stable=True)
    counts = torch.zeros(len(boxes) * len(feats), dtype=torch.long, device=b.device)
    counts.scatter_add_(0, run, torch.ones_like(run))
    grid = bin_grid(b, pool, torch.stack([width, height], 1))[order].to(feats[0].dtype)  # grid_sample: same dtype
    parts, start = [], 0
    for key, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        i, lv = divmod(key, len(feats))
        f = feats[lv][i:i + 1]
        # (1, C, n*pool, pool); under autocast grid_sample runs in fp32 (CUDA and CPU) on an fp16/bf16 pyramid
        g = grid[start:start + n].reshape(1, n * pool, pool, 2)
        parts.append(F.grid_sample(f, g, align_corners=False).reshape(c, n, pool, pool).transpose(0, 1))
        start += n
    out = torch.empty((len(b), c, pool, pool), dtype=feats[0].dtype, device=b.device)
    out[order] = torch.cat(parts).to(out.dtype)
    return out


def box_images(boxes: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(K,) the image of each box of ``boxes`` (one tensor per image), filled on the device: no copy to it."""
    return torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device) for i, b in enumerate(boxes)])


def bin_grid(boxes: torch.Tensor, pool: int, extent: torch.Tensor) -> torch.Tensor:
    """(K, pool, pool, 2) grid_sample coordinates of the centres of each box's pool x pool bins; ``extent``
    (K, 2): the width and height in pixels of the map each box is read from (align_corners=False: -1 and 1 are
    its outer edges)."""
    bins = (torch.arange(pool, device=boxes.device, dtype=torch.float32) + 0.5) / pool  # bin centres, 0..1
    x = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * bins  # (K, pool) in pixels
    y = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * bins
    gx, gy = 2 * x / extent[:, 0:1] - 1, 2 * y / extent[:, 1:2] - 1
    return torch.stack([gx[:, None, :].expand(-1, pool, -1), gy[:, :, None].expand(-1, -1, pool)], -1)


class AttributeHead(nn.Module):
    def __init__(self, in_channels: int, strides: tuple[int, ...], config: AttributeConfig):
        super().__init__()
        self.config, self.strides = config, tuple(strides)
        p = config.pool
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.GroupNorm(default_groups(in_channels), in_channels),
            nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(in_channels * p * p, config.hidden), nn.ReLU(inplace=True),
            nn.Linear(config.hidden, len(config.labels)))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """Label logits (K, labels) for the boxes of each image (model-input pixels)."""
        return self.mlp(roi_features(feats, self.strides, boxes, self.config.pool))
