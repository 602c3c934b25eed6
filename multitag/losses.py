"""Losses: one small class each, taking (logits, targets, ignore) so the engine treats them alike.

logits (B, C); targets (B, C) in {0, 1}; ignore (B, C) bool — ignored pairs contribute nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multitag.errors import UserError, did_you_mean


class MaskedBCE(nn.Module):
    """Binary cross-entropy on logits averaged over the pairs that are not ignored."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits, targets, ignore):
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight,
                                                  reduction="none")
        keep = (~ignore).float()
        return (loss * keep).sum() / keep.sum().clamp(min=1)


class SmoothedCE(nn.Module):
    """Softmax cross-entropy for single-label data (one positive per row), with label smoothing."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets, ignore):
        return F.cross_entropy(logits.float(), targets.argmax(1), label_smoothing=self.label_smoothing)


LOSSES = ("bce", "ce")


def build_loss(name: str, multi_label: bool, label_smoothing: float = 0.0) -> nn.Module:
    if name == "auto":
        name = "bce" if multi_label else "ce"
    if name == "bce":
        return MaskedBCE()
    if name == "ce":
        if multi_label:
            raise UserError('train.loss=ce needs single-label data (one class per image); use train.loss=bce.')
        return SmoothedCE(label_smoothing)
    raise UserError(f'unknown loss "{name}"{did_you_mean(name, LOSSES)}.')
