"""What HydraNet needs of a backbone: feature maps with declared channels and strides, run as stages.

Every backbone (ResNet, ViT, MobileNetV3) is a sequence of stages. Splitting the forward pass there is
what the fine-tuning modes build on: "unfreeze the last N stages" trains the parameters under
``stage_names()[-N:]``, and a LoRA adapter on the last stages runs ``finish`` a second time, from the
state ``begin`` left, with its weights, while every other head keeps the plain pass (``models/lora.py``).

Invariant (tested): ``forward(x) == finish(begin(x, k), k)`` bit for bit, for every ``k``; the same ops
run in the same order, only the call is split.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Carry(NamedTuple):
    """The state between two stages: the running activation and the maps collected so far."""

    x: torch.Tensor
    maps: list[torch.Tensor]
    size: tuple[int, int]  # (H, W) of the input image, for backbones that flatten the map (ViT)

    def select(self, idx: torch.Tensor) -> "Carry":
        """The same state for a subset of the batch."""
        return Carry(self.x[idx], [m[idx] for m in self.maps], self.size)


class StagedBackbone(nn.Module):
    """Base class: subclasses set ``out_channels``, ``strides`` and ``out_stages`` and implement
    ``stage_names`` and ``run_stage`` (and ``to_maps`` when the collected outputs are not the maps).

    ``classifier_prefix``: the keys of an ImageNet classifier in a pretrained file (dropped on import unless
    the backbone was built with ``num_classes``); ``new_prefixes``: our own parts that no published file has.
    """

    out_channels: list[int]  # of the maps forward() returns, finest first
    strides: tuple[int, ...]  # of those maps, in input pixels
    out_stages: tuple[int, ...]  # the stages whose outputs are collected
    classifier_prefix: str = ""
    new_prefixes: tuple[str, ...] = ()

    def published_key(self, key: str) -> str:
        """Our name for a key of a published file (older files may name some tensors differently)."""
        return key

    def stage_names(self) -> list[list[str]]:
        """Per stage, the dotted names (submodules or parameters) that hold its weights."""
        raise NotImplementedError

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_maps(self, collected: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        return collected

    @property
    def num_stages(self) -> int:
        return len(self.stage_names())

    def stage_parameters(self, first: int) -> dict[str, nn.Parameter]:
        """The parameters of stages ``first`` onwards, by name."""
        prefixes = [n for names in self.stage_names()[first:] for n in names]
        return {k: p for k, p in self.named_parameters()
                if any(k == n or k.startswith(n + ".") for n in prefixes)}

    def stage_submodules(self, first: int) -> list[nn.Module]:
        """The modules of stages ``first`` onwards (for train/eval mode: BatchNorm statistics)."""
        named = dict(self.named_modules())
        return [named[n] for names in self.stage_names()[first:] for n in names if n in named]

    def begin(self, x: torch.Tensor, stop: int) -> Carry:
        """Runs stages ``[0, stop)`` on the images ``x`` (N, 3, H, W)."""
        carry = Carry(x, [], (int(x.shape[-2]), int(x.shape[-1])))
        return self._run(carry, 0, stop)

    def finish(self, carry: Carry, start: int) -> list[torch.Tensor]:
        """Runs stages ``[start, num_stages)`` and returns the maps at ``strides``."""
        carry = self._run(carry, start, self.num_stages)
        return self.to_maps(carry.maps, carry.size)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.finish(self.begin(x, 0), 0)

    def _run(self, carry: Carry, start: int, stop: int) -> Carry:
        x, maps = carry.x, list(carry.maps)
        for i in range(start, stop):
            x = self.run_stage(i, x)
            if i in self.out_stages:
                maps.append(x)
        return Carry(x, maps, carry.size)
