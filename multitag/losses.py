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
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight, reduction="none")
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
CLASS_WEIGHTS = ("none", "balanced")
MAX_POS_WEIGHT = 50.0      # a class with 3 positives in 10,000 images must not dominate the loss


def balanced_pos_weight(targets, ignore) -> torch.Tensor:
    """(C,) BCE pos_weight = negatives / positives per class on the training rows, clipped to [1, 50]."""
    t = torch.as_tensor(targets, dtype=torch.float32)
    keep = ~torch.as_tensor(ignore, dtype=torch.bool)
    pos = (t * keep).sum(0)
    neg = ((1 - t) * keep).sum(0)
    return (neg / pos.clamp(min=1)).clamp(1.0, MAX_POS_WEIGHT)


def build_loss(name: str, multi_label: bool, label_smoothing: float = 0.0, class_weights: str = "none",
               targets=None, ignore=None) -> nn.Module:
    """The training loss; class_weights="balanced" needs the training targets/ignore to count positives."""
    if name == "auto":
        name = "bce" if multi_label else "ce"
    if class_weights not in CLASS_WEIGHTS:
        raise UserError(f'unknown train.class_weights "{class_weights}"{did_you_mean(class_weights, CLASS_WEIGHTS)}.')
    if name == "bce":
        weights = balanced_pos_weight(targets, ignore) if class_weights == "balanced" else None
        return MaskedBCE(weights)
    if name == "ce":
        if multi_label:
            raise UserError('train.loss=ce needs single-label data (one class per image); use train.loss=bce.')
        if class_weights != "none":
            raise UserError("train.class_weights applies to the multi-label BCE loss; for single-label data use "
                            "data.oversample_to to rebalance.")
        return SmoothedCE(label_smoothing)
    raise UserError(f'unknown loss "{name}"{did_you_mean(name, LOSSES)}.')


def training_loss(model, loss_fn, x, y, ignore) -> torch.Tensor:
    """The loss of one batch. Sequence models (CNN-RNN) train on their own objective (teacher-forced
    label sequences) through ``sequence_loss``; every other model through the configured loss on logits."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "sequence_loss"):
        return model.sequence_loss(x, y, ignore) if model is base else base.sequence_loss(x, y, ignore)
    return loss_fn(model(x), y, ignore)
