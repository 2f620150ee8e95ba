"""MobileNetV3 backbones (Howard et al. 2019) in torchvision's published layout: the CPU and edge family.

Chosen over a YOLO-style CSP net because depthwise-separable inverted residuals do the least arithmetic for
their accuracy, and torchvision publishes ``mobilenet_v3_large`` / ``_small``, so ImageNet weights load by
key (``width=1.0``, ``num_classes=1000`` for the classifier) the way ResNet's do; YOLO's CSP nets have no
such reference layout.

Keys follow ``torchvision.models.mobilenetv3``: ``features.0`` is the stem (conv, BN, hardswish),
``features.{i}.block.{j}`` the inverted residuals (1x1 expand, depthwise kxk, optional squeeze-excitation
``fc1``/``fc2``, 1x1 project), the last ``features`` entry the 1x1 conv to 6x channels, ``classifier.{0,3}``.
``width`` is torchvision's ``width_mult``. BatchNorm keeps torchvision's eps (1e-3, part of what pretrained
weights expect) but PyTorch's default momentum (0.1, not 0.01): short trainings need statistics that keep up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import StagedBackbone

# Per inverted residual: (kernel, expanded channels, out channels, squeeze-excitation, activation, stride),
# before the width multiplier; the first block's input is the stem's 16 channels. The paper's Tables 1 and 2.
ARCHS: dict[str, tuple[tuple[int, int, int, bool, str, int], ...]] = {
    "large": (
        (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
        (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
        (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
        (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
        (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
    ),
    "small": (
        (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
        (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
    ),
}
CLASSIFIER_HIDDEN = {"large": 1280, "small": 1024}


def make_divisible(v: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of 8, never more than 10% below ``v`` (torchvision's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.Hardswish) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3)]
    return nn.Sequential(*layers, act(inplace=True)) if act is not None else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * F.hardsigmoid(scale)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str, stride: int):
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=activation))
        layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=activation))  # depthwise
        if se:
            layers.append(SqueezeExcitation(expanded))
        layers.append(conv_bn_act(expanded, cout, 1, act=None))  # linear bottleneck: no activation
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


@dataclass
class MobileNetConfig:
    # The defaults are the published mobilenet_v3_small: at 256x448 on a 2-core CPU its backbone runs a batch
    # of 8 in about half the time of "large" at width 0.5, the earlier (undocumented) default.
    arch: str = "small"  # "large" or "small" (torchvision's mobilenet_v3_large / _small)
    width: float = 1.0  # multiplier on every layer's channels; torchvision's models use 1.0
    num_classes: int | None = None  # keep torchvision's classifier (layout checks / imports)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"mobilenet arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if not 0.1 <= self.width <= 4.0:
            raise ValueError(f"mobilenet width must be in [0.1, 4], got {self.width}")


class MobileNetV3(StagedBackbone):
    """Maps at strides 8, 16, 32: the outputs of the last block at each stride (the last one after the
    final 1x1 conv). Stages are the runs of blocks at one stride: 2, 4, 8, 16 and 32."""

    strides = (8, 16, 32)
    out_stages = (2, 3, 4)
    classifier_prefix = "classifier."

    def __init__(self, config: MobileNetConfig):
        super().__init__()
        self.config = config
        ch = lambda c: make_divisible(c * config.width)  # noqa: E731
        cin = ch(16)
        layers: list[nn.Module] = [conv_bn_act(3, cin, 3, stride=2)]
        stride, stages = 2, [[0]]
        for k, expanded, cout, se, act, s in ARCHS[config.arch]:
            layers.append(InvertedResidual(cin, k, ch(expanded), ch(cout), se, act, s))
            if s == 2:
                stride *= 2
                stages.append([])
            stages[-1].append(len(layers) - 1)
            cin = ch(cout)
        layers.append(conv_bn_act(cin, 6 * cin, 1))
        stages[-1].append(len(layers) - 1)
        assert stride == 32 and len(stages) == 5, "every MobileNetV3 table halves the resolution five times"
        self.features = nn.Sequential(*layers)
        self._stages = stages
        outs = [stages[i][-1] for i in self.out_stages]
        self.out_channels = [self._out_channels(self.features[i]) for i in outs]
        if config.num_classes is not None:
            hidden = ch(CLASSIFIER_HIDDEN[config.arch])
            self.classifier = nn.Sequential(nn.Linear(6 * cin, hidden), nn.Hardswish(inplace=True),
                                            nn.Dropout(0.2, inplace=True), nn.Linear(hidden, config.num_classes))
        self._init_weights()

    @staticmethod
    def _out_channels(m: nn.Module) -> int:
        return [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1].out_channels

    def _init_weights(self) -> None:  # torchvision's
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stage_names(self) -> list[list[str]]:
        return [[f"features.{i}" for i in stage] for stage in self._stages]

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for j in self._stages[i]:
            x = self.features[j](x)
        return x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.num_classes is None:
            raise RuntimeError("this MobileNetV3 was built without a classifier (num_classes=None)")
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.forward(x)[-1], 1), 1))
