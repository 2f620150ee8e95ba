"""A Vision Transformer backbone in torchvision's ``vit_b_16`` layout, with a ViTDet simple feature pyramid.

Keys and shapes follow ``torchvision.models.vision_transformer`` (``conv_proj``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp}``,
``encoder.ln``, ``heads.head``), so torchvision's ImageNet ``vit_b_16`` state dict loads by key into
``ViTConfig(width=768, depth=12, heads=12, mlp_dim=3072)``. The default is a small CPU-sized model of the
same layout.

Detection needs maps, not a class token (ViTDet, Li et al. 2022, "simple feature pyramid"): the last
block's tokens become the stride-16 map, a 2x2 stride-2 transposed conv makes stride 8 and a 2x2 max pool
makes stride 32. ViTDet's per-level 1x1 and 3x3 convs are left to the neck (FPN's lateral and output
convs are exactly those).

The position embedding keeps torchvision's shape, one square ``pos_grid`` x ``pos_grid`` grid (14: 224 px
in 16 px patches), and is resized bicubically to the input's grid at run time, as ViTDet does for its
1024 px inputs: the letterboxed 256x448 input is a 16x28 grid.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import StagedBackbone

PATCH = 16  # the pyramid's strides 8/16/32 are half, one and two patches


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters under its key names (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``), computed with ``scaled_dot_product_attention``. Written out so that each weight is a
    plain parameter a LoRA adapter can substitute (``models/lora.py``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention initialises them
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape  # (N, L, D)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3D)
        q, k, v = qkv.view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, h, L, D/h)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(n, length, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        # torchvision's MLP: Linear, GELU, Dropout, Linear, Dropout (hence the keys mlp.0 and mlp.3)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.0))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Holds torchvision's ``encoder.*`` parameters; the ViT runs its blocks one stage at a time."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, seq_length: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp_dim)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the stride-16 map: [up 2x (D/2 channels), itself, down 2x]."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)

    def forward(self, m: torch.Tensor) -> list[torch.Tensor]:
        # ceil_mode: an odd grid's last row and column keep a stride-32 cell (as a strided conv's do, so PAN's
        # bottom-up sum fits); on an even grid it changes nothing
        return [self.up(m), m, F.max_pool2d(m, kernel_size=2, stride=2, ceil_mode=True)]


@dataclass
class ViTConfig:
    width: int = 128  # hidden size; vit_b_16: 768
    depth: int = 4  # transformer blocks; vit_b_16: 12
    heads: int = 4  # attention heads; vit_b_16: 12
    mlp_dim: int | None = None  # None: 4 x width (vit_b_16: 3072)
    pos_grid: int = 14  # the stored position embedding's side, in patches (224 / 16 in torchvision's files)
    num_classes: int | None = None  # keep torchvision's `heads.head` classifier (layout checks / imports)

    def __post_init__(self) -> None:
        if self.width < 8 or self.width % 2:
            raise ValueError(f"vit width must be an even number >= 8, got {self.width}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"vit heads must divide width {self.width}, got {self.heads}")
        if self.depth < 1:
            raise ValueError(f"vit depth must be >= 1, got {self.depth}")
        if self.pos_grid < 1:
            raise ValueError(f"vit pos_grid must be >= 1, got {self.pos_grid}")
        self.mlp_dim = self.mlp_dim or 4 * self.width


class ViT(StagedBackbone):
    """Maps at strides 8, 16, 32 with width/2, width, width channels.

    Stages: 0 the patch embedding (``conv_proj``, class token, position embedding), 1..depth the blocks;
    the last stage also owns ``encoder.ln`` and the pyramid, which run after it.
    """

    strides = (8, 16, 32)
    classifier_prefix = "heads."
    new_prefixes = ("pyramid.",)

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.conv_proj = nn.Conv2d(3, d, kernel_size=PATCH, stride=PATCH)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * PATCH * PATCH)))
        nn.init.zeros_(self.conv_proj.bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = Encoder(d, config.depth, config.heads, config.mlp_dim, 1 + config.pos_grid ** 2)
        self.pyramid = SimplePyramid(d)
        if config.num_classes is not None:
            self.heads = nn.Sequential(OrderedDict(head=nn.Linear(d, config.num_classes)))
        self.out_channels = [d // 2, d, d]
        self.out_stages = (config.depth,)

    def published_key(self, key: str) -> str:
        # torchvision's MLPBlock named its linears linear_1 / linear_2 before it became an MLP (0, 3);
        # torchvision renames them on load the same way (MLPBlock._load_from_state_dict)
        return key.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3.")

    def stage_names(self) -> list[list[str]]:
        blocks = [[f"encoder.layers.encoder_layer_{i}"] for i in range(self.config.depth)]
        blocks[-1] += ["encoder.ln", "pyramid"]
        return [["conv_proj", "class_token", "encoder.pos_embedding"], *blocks]

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh * gw, D): the class token's entry, then the patch grid's, resized to ``grid``."""
        pos = self.encoder.pos_embedding
        g = self.config.pos_grid
        if tuple(grid) == (g, g):
            return pos
        patches = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], 1)

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i > 0:
            return self.encoder.layers[i - 1](x)  # (N, 1 + L, D)
        x = self.conv_proj(x)  # (N, D, H/16, W/16)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)  # (N, L, D)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        return x + self.position_embedding(grid)

    def to_maps(self, collected: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        tokens = self.encoder.ln(collected[-1])[:, 1:]  # the class token is not part of the map
        n, _, d = tokens.shape
        m = tokens.transpose(1, 2).reshape(n, d, size[0] // PATCH, size[1] // PATCH)  # (N, D, H/16, W/16)
        return self.pyramid(m)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-style logits from the class token, as torchvision's VisionTransformer computes them."""
        if self.config.num_classes is None:
            raise RuntimeError("this ViT was built without a classifier (num_classes=None)")
        tokens = self.begin(x, self.num_stages).x
        return self.heads(self.encoder.ln(tokens)[:, 0])
