"""Path-aggregation neck (PANet, Liu et al. 2018; the neck of the YOLO family): FPN's top-down pass, then a
bottom-up path that carries the fine levels' localisation back up to the coarse ones.

``N3 = P3``, ``N(i+1) = relu(conv3x3(P(i+1) + relu(conv3x3_stride2(N(i)))))``: PANet's additions (YOLO's
necks concatenate and use CSP blocks instead; addition keeps every level at ``channels`` and the neck
small). Same contract as FPN: ``out_channels`` channels at the backbone's strides. The top-down part is
FPN itself, with FPN's key names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.fpn import FPN, FPNConfig


@dataclass
class PANConfig:
    channels: int = 64

    def __post_init__(self) -> None:
        if self.channels < 8:
            raise ValueError(f"pan channels must be >= 8, got {self.channels}")


class PAN(FPN):
    """Maps backbone maps [C3, C4, C5] to [N3, N4, N5], all with ``config.channels`` channels."""

    def __init__(self, in_channels: list[int], in_strides: tuple[int, ...], config: PANConfig):
        super().__init__(in_channels, in_strides, FPNConfig(channels=config.channels))
        self.config = config  # type: ignore[assignment]  (a PANConfig: what the checkpoint records)
        c = config.channels
        self.down = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in in_channels[1:])
        self.fuse = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in in_channels[1:])
        for m in [*self.down, *self.fuse]:
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p = super().forward(feats)
        out = [p[0]]
        for i, (down, fuse) in enumerate(zip(self.down, self.fuse), 1):  # bottom-up: fine maps refine coarser ones
            out.append(F.relu(fuse(p[i] + F.relu(down(out[-1])))))
        return out
