"""Inference-only rewrite: fold each BatchNorm into the convolution before it (one op instead of two).

In eval mode BN is an affine map per channel, so ``bn(conv(x)) == conv'(x)`` with
``w' = w * g / sqrt(var + eps)`` and ``b' = (b - mean) * g / sqrt(var + eps) + beta``. Applied to a copy
used for serving; checkpoints keep the original layout (and torchvision's keys).
"""

from __future__ import annotations

import torch
from torch import nn

# (conv attribute, bn attribute) pairs inside torchvision-layout ResNet blocks.
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode
                      ).to(conv.weight.device, conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_conv_bn(module: nn.Module, scales: dict[str, torch.Tensor] | None = None) -> int:
    """Folds every conv->BN pair of a backbone in place; the module must be in eval mode. Pairs are a
    ResNet block's ``convN``/``bnN`` and a conv followed by a BN inside an ``nn.Sequential`` (ResNet's
    ``downsample``, MobileNetV3's conv-BN-activation). ``scales``, if given, receives each folded conv's
    per-channel factor ``g / sqrt(var + eps)`` by the conv's name in ``module`` (what a LoRA delta on that
    conv must be multiplied by, ``models/lora.py``). Returns how many pairs were folded."""
    if module.training:
        raise ValueError("fold BatchNorm only in eval mode (training updates its statistics)")
    folded: dict[str, torch.Tensor] = {}

    def fold(name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        folded[name] = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        return fold_bn(conv, bn)

    for prefix, m in list(module.named_modules()):
        name = f"{prefix}." if prefix else ""
        for conv_name, bn_name in _PAIRS:
            conv, bn = getattr(m, conv_name, None), getattr(m, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(m, conv_name, fold(name + conv_name, conv, bn))
                setattr(m, bn_name, nn.Identity())
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d):
                    m[i], m[i + 1] = fold(f"{name}{i}", m[i], m[i + 1]), nn.Identity()
    if scales is not None:
        scales.update(folded)
    return len(folded)
