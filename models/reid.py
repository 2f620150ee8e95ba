"""The re-ID (embedding) head: an L2-normalised appearance vector per detected box, from RoI-pooled shared features.

The FairMOT / JDE idea: detection and re-identification read one backbone, so telling two people apart costs a
small MLP per box, not a second network per crop. The tracker (workers/appearance.py) compares these vectors
by cosine similarity to continue an identity that motion alone lost (an occlusion, a crossing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.attributes import bin_grid, box_images, roi_features
from models.heads import default_groups


@dataclass
class ReIDConfig:
    heads: list[str]  # detection heads whose boxes get an embedding (every class of theirs)
    dim: int = 32  # embedding length; 32 float16 values (64 bytes) travel per box
    pool: int = 7  # RoI grid side
    channels: int = 32  # after the 3x3 conv: fewer than the neck's, to keep the Linear (and the file) small
    hidden: int = 128
    # colour: side of a grid of mean colours read from the input image inside each box (0: none). The neck's maps
    # are trained to find classes, which colour does not tell apart, and identities mostly differ by it.
    colour: int = 0

    def __post_init__(self) -> None:
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"reid 'heads' must name at least one detection head, each once, got {self.heads}")
        if min(self.dim, self.pool, self.channels, self.hidden) < 1 or self.colour < 0:
            raise ValueError(f"reid dim, pool, channels and hidden must be positive and colour >= 0, got "
                             f"{self.dim}, {self.pool}, {self.channels}, {self.hidden}, {self.colour}")


class EmbeddingHead(nn.Module):
    def __init__(self, in_channels: int, strides: tuple[int, ...], config: ReIDConfig):
        super().__init__()
        self.config, self.strides = config, tuple(strides)
        c, p = config.channels, config.pool
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.GroupNorm(default_groups(c), c), nn.ReLU(inplace=True),
            nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(c * p * p + 3 * config.colour ** 2, config.hidden), nn.ReLU(inplace=True),
                                 nn.Linear(config.hidden, config.dim))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], boxes: list[torch.Tensor], images: torch.Tensor | None = None,
                normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(K, dim) unit vectors for the boxes of each image (model-input pixels), K boxes in all; ``images``
        (N, 3, H, W) are needed when the config reads ``colour``: normalised as the backbone reads them, or
        uint8 with the model's ``normalize`` (see ``box_colours``)."""
        x = self.conv(roi_features(feats, self.strides, boxes, self.config.pool))  # (K, channels * pool * pool)
        if self.config.colour:
            if images is None:
                raise ValueError("this re-ID head reads colours from the input images: pass them")
            x = torch.cat([x, box_colours(images, boxes, self.config.colour, normalize).to(x.dtype)], 1)
        return F.normalize(self.mlp(x).float(), dim=1)


def box_colours(images: torch.Tensor, boxes: list[torch.Tensor], side: int,
                normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(K, 3 * side * side): each box's mean colours on a side x side grid, 4 x 4 bilinear samples per cell.

    ``images``: normalised (N, 3, H, W), or uint8 with ``normalize``: then only each image's pixels under its
    boxes are normalised. Where the backbone ran in another runtime nothing else needs the batch in float, and
    converting all of it took as long as the rest of the re-ID head (~0.3 ms a frame on a CPU core). The
    samples are the same: a bilinear sample reads the two pixels either side of it on each axis, the crop keeps
    every such pixel, and it reaches the image's edge wherever a sample reads the zero padding beyond it.
    """
    p = 4 * side
    if sum(len(b) for b in boxes) == 0:
        return torch.zeros((0, 3 * side * side), device=images.device)
    if normalize is None:
        fine = roi_features([images], (1,), boxes, p)
    else:
        h, w = images.shape[-2:]
        shown = [(image, b) for image, b in zip(images, boxes) if len(b)]
        # Each image's crop: every pixel its boxes' samples read (one at pixel coordinate u reads pixels
        # floor(u - 0.5) and the next), computed on the device for all images and read back once (a GPU sync).
        lo = torch.stack([b[:, :2].min(0).values for _, b in shown]).float()
        hi = torch.stack([b[:, 2:].max(0).values for _, b in shown]).float()
        lo, hi = torch.floor(lo - 0.5).clamp(min=0), torch.floor(hi - 0.5) + 2
        crop_boxes = torch.stack([lo[:, 0], lo[:, 1], hi[:, 0].clamp(max=w), hi[:, 1].clamp(max=h)], 1)
        crops = crop_boxes.long().tolist()  # x0, y0, x1, y1 per image with boxes
        # every box's grid at once, in its image's crop
        per_box = crop_boxes[box_images([b for _, b in shown], images.device)]  # each box its image's crop
        grid = bin_grid(torch.cat([b for _, b in shown]).float() - per_box[:, :2].repeat(1, 2), p,
                        per_box[:, 2:] - per_box[:, :2])
        parts, start = [], 0
        for (image, b), (x0, y0, x1, y1) in zip(shown, crops):
            crop = normalize(image[None, :, y0:y1, x0:x1])
            g = grid[start:start + len(b)].reshape(1, len(b) * p, p, 2).to(crop.dtype)
            parts.append(F.grid_sample(crop, g, align_corners=False).reshape(3, len(b), p, p).transpose(0, 1))
            start += len(b)
        fine = torch.cat(parts)
    return F.avg_pool2d(fine, 4).flatten(1)


def contrastive_loss(embeddings: torch.Tensor, identities: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one group of views: each embedding should be closer
    to the other views of its identity than to every other object's. Anchors without another view are skipped.

    embeddings: (K, D) unit vectors; identities: (K,) int. Returns a scalar (0 when no anchor has a positive).
    """
    sim = embeddings @ embeddings.T / temperature
    k = len(identities)
    self_mask = torch.eye(k, dtype=torch.bool, device=sim.device)
    positive = (identities[:, None] == identities[None, :]) & ~self_mask
    anchors = positive.any(1)
    if not anchors.any():
        return sim.sum() * 0.0
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    mean_pos = (log_prob * positive).sum(1)[anchors] / positive.sum(1)[anchors]
    return -mean_pos.mean()
