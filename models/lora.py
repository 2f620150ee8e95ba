"""LoRA adapters (Hu et al. 2021) on a backbone's last stages, for heads that want features of their own.

An adapter adds a low-rank delta ``scale * B @ A`` to every adaptable weight of the backbone's last
``stages`` stages: each conv with ``groups == 1`` (depthwise convs have too few weights to be worth it)
and the attention projections of a ViT block (``in_proj_weight``, ``out_proj.weight``). Norms, biases,
MLPs and everything else stay as they are. ``B`` starts at zero, so a new adapter starts as the identity.

The backbone's own weights are never modified. A frozen backbone runs once per frame for every head; a
LoRA'd backbone would change the features of every head. So the adapter's heads get a second run of the
adapted stages only: ``backbone.finish`` again, from the state the shared earlier stages left
(``models/backbone.py:Carry``), with the merged weights ``W + scale * B @ A`` substituted for that one call
(``torch.func.functional_call``), then the neck. Heads without the adapter read the plain pass, which is
bit for bit what they read before the adapter existed.

Cost, for the frames that ask for an adapter's heads: the adapted stages and the neck once more, plus one
rank-r product per adapted weight per batch to form the merged weights. The earlier stages are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.backbone import Carry, StagedBackbone
from models.vit import SelfAttention


@dataclass
class LoRAConfig:
    heads: list[str]  # the heads that read this adapter's features
    rank: int = 4
    alpha: float | None = None  # the delta is scaled by alpha / rank; None: alpha = rank (scale 1)
    stages: int = 1  # adapt the backbone's last N stages

    def __post_init__(self) -> None:
        if not self.heads:
            raise ValueError("an adapter needs at least one head")
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.stages < 1:
            raise ValueError(f"lora stages must be >= 1, got {self.stages}")
        # 0 leaves an adapter that never trains; NaN or inf wipes its heads' features (every score NaN: no boxes)
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha != 0):
            raise ValueError(f"lora alpha must be a finite non-zero number (or null), got {self.alpha}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def adaptable_weights(backbone: StagedBackbone, first_stage: int) -> dict[str, torch.Size]:
    """Name -> shape of the weights an adapter on stages ``first_stage`` onwards changes."""
    prefixes = [n for names in backbone.stage_names()[first_stage:] for n in names]
    found: dict[str, torch.Size] = {}
    for name, m in backbone.named_modules():
        if not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            found[f"{name}.weight"] = m.weight.shape
        elif isinstance(m, SelfAttention):
            found[f"{name}.in_proj_weight"] = m.in_proj_weight.shape
            found[f"{name}.out_proj.weight"] = m.out_proj.weight.shape
    return found


class _Finish(nn.Module):
    """``backbone.finish`` as a module's forward, so that functional_call can substitute its weights."""

    def __init__(self, backbone: StagedBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, carry: Carry, start: int) -> list[torch.Tensor]:
        return self.backbone.finish(carry, start)


class LoRA(nn.Module):
    def __init__(self, backbone: StagedBackbone, config: LoRAConfig):
        super().__init__()
        if config.stages > backbone.num_stages:
            raise ValueError(f"lora stages must be at most the backbone's {backbone.num_stages}, got {config.stages}")
        self.config = config
        self.start = backbone.num_stages - config.stages  # the first adapted stage
        self.shapes = adaptable_weights(backbone, self.start)
        if not self.shapes:
            raise ValueError(f"the backbone's last {config.stages} stage(s) have no weight a LoRA adapter can change")
        # Parameter names cannot hold dots: layer4.0.conv1.weight is stored as a.layer4__0__conv1__weight.
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for name, shape in self.shapes.items():
            a = torch.empty(config.rank, math.prod(shape[1:]))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises a weight of that shape
            self.a[self._key(name)] = nn.Parameter(a)
            self.b[self._key(name)] = nn.Parameter(torch.zeros(shape[0], config.rank))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def merged(self, backbone: StagedBackbone) -> dict[str, torch.Tensor]:
        """The adapted weights, ``W + scale * B @ A``, by their names in the backbone."""
        params = dict(backbone.named_parameters())
        return {name: params[name] + self.config.scale * (self.b[self._key(name)] @ self.a[self._key(name)]).view(shape)
                for name, shape in self.shapes.items()}

    @torch.no_grad()
    def fold_batchnorm(self, scales: dict[str, torch.Tensor]) -> None:
        """Follows ``fuse_conv_bn`` (serving): a folded conv's weight became ``s * W``, so the delta must be
        ``s * B @ A``. ``scales``: the folded convs' per-channel ``s`` by name."""
        for name in self.shapes:
            s = scales.get(name.rsplit(".", 1)[0])
            if s is not None:
                self.b[self._key(name)].mul_(s.to(self.b[self._key(name)].dtype)[:, None])

    def finish(self, backbone: StagedBackbone, carry: Carry, start: int) -> list[torch.Tensor]:
        """The backbone's maps from ``carry`` (the state before stage ``start`` <= ``self.start``), adapted."""
        if start > self.start:
            raise ValueError(f"the adapter starts at stage {self.start}; a run from stage {start} would skip it")
        backbone = getattr(backbone, "_orig_mod", backbone)  # torch.compile's wrapper prefixes parameter names
        weights = {f"backbone.{k}": v for k, v in self.merged(backbone).items()}
        return torch.func.functional_call(_Finish(backbone), weights, (carry, start))
