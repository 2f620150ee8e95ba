"""Feature-pyramid neck: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FPNConfig:
    channels: int = 64

    def __post_init__(self) -> None:
        if self.channels < 8:
            raise ValueError(f"fpn channels must be >= 8, got {self.channels}")


class FPN(nn.Module):
    """Maps backbone maps [C3, C4, C5] to [P3, P4, P5], all with ``config.channels`` channels."""

    def __init__(self, in_channels: list[int], config: FPNConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.lateral = nn.ModuleList(nn.Conv2d(cin, c, 1) for cin in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in in_channels)
        self.out_channels = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse maps refine finer ones
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        return [conv(x) for conv, x in zip(self.output, laterals)]
