"""Feature-pyramid neck: lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs.

``extra_levels`` adds coarser levels after P5 (P6, P7, ...), each a stride-2 3x3 conv, the first on
P5 and the next on the ReLU of the one before: RetinaNet's and FCOS's P6/P7 (torchvision's
``LastLevelP6P7`` when the FPN's input and output channels agree, as in ``fcos_resnet50_fpn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FPNConfig:
    channels: int = 64
    extra_levels: int = 0  # 2 for FCOS/RetinaNet's P6 and P7

    def __post_init__(self) -> None:
        if self.channels < 8:
            raise ValueError(f"fpn channels must be >= 8, got {self.channels}")
        if not 0 <= self.extra_levels <= 3:
            raise ValueError(f"fpn extra_levels must be 0..3, got {self.extra_levels}")


class FPN(nn.Module):
    """Maps backbone maps [C3, C4, C5] to [P3, P4, P5 (, P6, P7)], all with ``config.channels`` channels."""

    def __init__(self, in_channels: list[int], in_strides: tuple[int, ...], config: FPNConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.lateral = nn.ModuleList(nn.Conv2d(cin, c, 1) for cin in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in range(config.extra_levels))
        self.out_channels = c
        self.strides = tuple(in_strides) + tuple(in_strides[-1] * 2 ** (i + 1) for i in range(config.extra_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse maps refine finer ones
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        out = [conv(x) for conv, x in zip(self.output, laterals)]
        for i, conv in enumerate(self.extra):
            out.append(conv(out[-1] if i == 0 else F.relu(out[-1])))
        return out
