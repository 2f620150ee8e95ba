"""ResNet backbones in torchvision's published layout.

Module names and tensor shapes match ``torchvision.models.resnet`` (v1.5: the stride of a
Bottleneck sits on its 3x3 conv), so an ImageNet state dict for resnet18/34/50/101 loads by key
when ``width == 64``. Smaller ``width`` values and the extra ``depth=10`` keep the same key
layout with fewer channels/blocks, which is what makes CPU inference fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.backbone import StagedBackbone

# depth -> (block type, blocks per stage); 10 is not a torchvision model but keeps its key layout.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass
class ResNetConfig:
    depth: int = 18
    width: int = 64  # channels of conv1 and layer1; torchvision's models use 64
    num_classes: int | None = None  # keep torchvision's `fc` classifier (only for layout checks / imports)

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"resnet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        if self.width < 4 or self.width % 4:
            raise ValueError(f"resnet width must be a positive multiple of 4, got {self.width}")


class ResNet(StagedBackbone):
    """Returns the feature maps of layer2..layer4 (strides 8, 16, 32) as a list.

    Stages: 0 the stem (conv1, bn1, max pool), 1-4 layer1..layer4.
    """

    strides = (8, 16, 32)
    out_stages = (2, 3, 4)
    classifier_prefix = "fc."

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        kind, blocks = DEPTHS[config.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        w = config.width
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, w, blocks[0])
        self.layer2 = self._make_layer(block, w * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, w * 4, blocks[2], stride=2)
        self.layer4 = self._make_layer(block, w * 8, blocks[3], stride=2)
        self.out_channels = [w * m * block.expansion for m in (2, 4, 8)]
        if config.num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(w * 8 * block.expansion, config.num_classes)
        self._init_weights()

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual branch: every block starts as identity (trains faster).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def stage_names(self) -> list[list[str]]:
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, w, H/4, W/4)
        # layer2..4: (N, C3, H/8, W/8), (N, C4, H/16, W/16), (N, C5, H/32, W/32)
        return getattr(self, f"layer{i}")(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-style logits; only exists when built with ``num_classes``."""
        if self.config.num_classes is None:
            raise RuntimeError("this ResNet was built without a classifier (num_classes=None)")
        c5 = self.forward(x)[-1]
        return self.fc(torch.flatten(self.avgpool(c5), 1))
