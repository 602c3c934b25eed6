"""Flip test-time augmentation for any model: ``model.args.tta_flip: true``.

In eval mode the logits are the mean of the image's and its mirror image's (as airbench's own
``tta_flip``, which that model keeps); in training mode the model is unchanged. Being part of the
network's eval forward, the flip reaches everything that scores: the per-epoch validation that picks
the best epoch, the thresholds calibrated on val, test metrics, predict, serve, the app and the ONNX
export, so the thresholds are always fitted to the scores they are applied to. It costs a second
forward pass (in one batch of 2B) per scored image.

The model's class is swapped for a subclass with this forward, so parameters, buffers and state-dict
keys are unchanged (weights load either way; a run trained without the flip can be scored with it).
"""
from __future__ import annotations

import torch
from torch import nn

_WITH_FLIP: dict[type, type] = {}


def _flip_averaged(base: type):
    """The forward of ``base``'s flip subclass (``base.forward`` named, not super(): a later class swap
    of the model would make super() find this forward again)."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return base.forward(self, x)
        both = base.forward(self, torch.cat([x, x.flip(3)]))       # (2B, C): the images, then their mirrors
        return both.view(2, x.shape[0], *both.shape[1:]).mean(0)   # (B, C)
    return forward


def with_flip_tta(model: nn.Module) -> nn.Module:
    """``model`` (in place) with flip-averaged logits in eval mode."""
    base = type(model)
    if base not in _WITH_FLIP:
        _WITH_FLIP[base] = type(f"{base.__name__}WithFlipTTA", (base,),
                                {"forward": _flip_averaged(base), "__module__": base.__module__})
    model.__class__ = _WITH_FLIP[base]
    return model
