"""timm ResNets with the stem's ReLU after its max-pool instead of before it.

ReLU(MaxPool(y)) equals MaxPool(ReLU(y)) exactly, values and gradients: a max commutes with any
non-decreasing function, and where a window's max is <= 0 both orders give 0 and pass no gradient.
After the pool the ReLU runs on a quarter of the elements — (B, 64, H/4, W/4) instead of the
conv's (B, 64, H/2, W/2), which at 224 px and batch 32 is 25.7 M values — and its backward, which
reads the mask and the gradient at full size, shrinks with it: the training step of the ResNet-18
layout was 1.01–1.10× faster on the AMX machine (benchmarks/RESULTS.md, run R; as noisy as that range
says). Parameters, state dict keys, module names and ``forward_intermediates`` (which returns the stem's
post-ReLU map) are timm's own; only ``forward_features`` runs the two stem ops the other way round.
"""
from __future__ import annotations

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.resnet import ResNet
from torch import nn


class PoolFirstResNet(ResNet):
    """A timm ResNet whose ``forward_features`` pools before the stem ReLU. Models become one by
    ``relu_after_pool`` (a class swap), never by construction."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))                   # (B, 64, H/2, W/2)
        x = self.act1(self.maxpool(x))                # (B, 64, H/4, W/4); = maxpool(act1(x))
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(layers, x, flatten=True)
        for layer in layers:
            x = layer(x)
        return x


def relu_after_pool(model: nn.Module) -> nn.Module:
    """``model`` as a PoolFirstResNet when it is a plain timm ResNet whose stem is ReLU then a plain
    max-pool (its act1 could be another activation, its maxpool an anti-aliased pool or absent, in
    some variants: those stay as they are). In place; returns ``model``."""
    if type(model) is ResNet and type(model.act1) is nn.ReLU and type(model.maxpool) is nn.MaxPool2d:
        model.__class__ = PoolFirstResNet
    return model


def relu_before_pool(model: nn.Module) -> nn.Module:
    """Undo ``relu_after_pool``: timm's (and the reference systems') stem order, for a baseline that
    runs the model as they wrote it (multitag bench's naive loop). In place; returns ``model``."""
    if type(model) is PoolFirstResNet:
        model.__class__ = ResNet
    return model
