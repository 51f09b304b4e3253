"""Fold eval-mode BatchNorm into the preceding convolution.

In eval mode BN is an affine map per channel, so ``bn(conv(x))`` equals one conv with scaled weights and a shifted
bias. Folding removes a full pass over every activation map, which matters most on the occlusion path where the
same net runs on hundreds of occluded copies of one image.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def folded_conv_params(block) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of the single conv equal to ``block.bn(block.conv(x))`` in eval mode."""
    conv, bn = block.conv, block.bn
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, device=weight.device)
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        weight = weight * scale[:, None, None, None]
        bias = (bias - bn.running_mean) * scale + bn.bias.detach()
    return weight.contiguous(), bias.contiguous()


def fold_bn(model: nn.Module) -> nn.Module:
    """A deep copy of a :class:`~cifarbench.nets.CifarNet` in eval mode with every BN folded into its conv (BN
    replaced by ``Identity``). Outputs equal the original's up to float rounding."""
    folded = copy.deepcopy(model).eval()
    for block in folded.conv_blocks().values():
        if isinstance(block.bn, nn.BatchNorm2d):
            weight, bias = folded_conv_params(block)
            if block.conv.bias is None:
                block.conv.bias = nn.Parameter(torch.empty_like(bias))
            with torch.no_grad():
                block.conv.weight.copy_(weight)
                block.conv.bias.copy_(bias)
            block.bn = nn.Identity()
    return folded
