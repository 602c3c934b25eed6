"""Losses: one small class each, taking (logits, targets, ignore) so the engine treats them alike.

logits (B, C); targets (B, C) in {0, 1}; ignore (B, C) bool — ignored pairs contribute nothing.
Multi-label: BCE (optionally with a balanced pos_weight), focal, asymmetric (ASL); single-label:
cross-entropy with label smoothing. Parameters keep their papers' names.

Mixed batches (aug.mixup / aug.cutmix) bring soft targets y = λ·y_a + (1-λ)·y_b. Every loss here is
linear in the target (y · positive term + (1 - y) · negative term; cross-entropy's Σ y_c · log p_c),
so the loss of the soft target is exactly λ·L(y_a) + (1-λ)·L(y_b): the mixed loss of Zhang et al.'s
reference code (and of timm's SoftTargetCrossEntropy), for focal and ASL as much as for BCE. What
focal and ASL give up is what they give up on 0/1 targets too: their minimum is not at p = y.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from multitag.config import TrainConfig
from multitag.errors import UserError, did_you_mean


def masked_mean(loss: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, C) per-pair loss over the pairs that are not ignored (0 when all are)."""
    keep = (~ignore).to(loss.dtype)
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def _focus(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """base ** gamma with base kept off 0, so a γ < 1 never makes a 0 · ∞ (NaN) gradient."""
    return base.clamp(min=1e-12).pow(gamma)


class _SigmoidLoss(nn.Module):
    """Base of the per-class sigmoid losses: an optional (C,) pos_weight multiplying the positive term."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def combine(self, pos_term, neg_term, targets, ignore) -> torch.Tensor:
        """Masked mean of -(w_c · y · pos_term + (1 - y) · neg_term); the terms are log-likelihoods."""
        if self.pos_weight is not None:
            pos_term = pos_term * self.pos_weight.to(pos_term.device)
        return masked_mean(-(targets * pos_term + (1 - targets) * neg_term), ignore)


class MaskedBCE(_SigmoidLoss):
    """Binary cross-entropy on logits averaged over the pairs that are not ignored."""

    def forward(self, logits, targets, ignore):
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight, reduction="none")
        return masked_mean(loss, ignore)


class FocalLoss(_SigmoidLoss):
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), per class:

        FL = -α_t · (1 - p_t)^γ · log(p_t),   p_t = p if y = 1 else 1 - p,   p = sigmoid(logit)
        α_t = α for positives, 1 - α for negatives (alpha=None: no α weighting)

    Well-classified pairs (p_t → 1) are down-weighted by (1 - p_t)^γ; γ = 0 with alpha=None is BCE.
    Averaged over the pairs that are not ignored.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, pos_weight: torch.Tensor | None = None):
        super().__init__(pos_weight)
        if gamma < 0 or (alpha is not None and not 0 <= alpha <= 1):
            raise UserError(f"focal loss needs gamma ≥ 0 and alpha in [0, 1] or null; got gamma={gamma}, alpha={alpha}.")
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits, targets, ignore):
        x = logits.float()
        log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)          # log p, log(1 - p), stable for any logit
        pos = _focus(torch.sigmoid(-x), self.gamma) * log_p       # (1 - p)^γ log p
        neg = _focus(torch.sigmoid(x), self.gamma) * log_q        # p^γ log(1 - p)
        if self.alpha is not None:
            pos, neg = self.alpha * pos, (1 - self.alpha) * neg
        return self.combine(pos, neg, targets, ignore)


class AsymmetricLoss(_SigmoidLoss):
    """Asymmetric Loss, ASL (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021):

        L+ = (1 - p)^γ+ · log(p)
        L- = p_m^γ- · log(1 - p_m),   p_m = max(p - m, 0)   (m = clip, the probability margin)
        loss = -(y · L+ + (1 - y) · L-)

    Negatives, the vast majority of pairs in multi-label data, are focused harder (γ- > γ+) and the
    easy ones (p < m) are discarded entirely. γ+ = γ- = 0 with m = 0 is BCE. Averaged over the
    pairs that are not ignored (the authors' code sums; the mean keeps BCE's learning-rate scale),
    and the gradient flows through the focusing weights as in the paper's formula.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 pos_weight: torch.Tensor | None = None):
        super().__init__(pos_weight)
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
            raise UserError(f"asymmetric loss needs gammas ≥ 0 and clip in [0, 1); got gamma_neg={gamma_neg}, "
                            f"gamma_pos={gamma_pos}, clip={clip}.")
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits, targets, ignore):
        x = logits.float()
        q = torch.sigmoid(-x)                                     # 1 - p
        q_m = (q + self.clip).clamp(max=1.0)                      # 1 - p_m
        log_q_m = F.logsigmoid(-x) if self.clip == 0 else q_m.log()   # exact log(1 - p) without a margin
        pos = _focus(q, self.gamma_pos) * F.logsigmoid(x)
        neg = _focus(1 - q_m, self.gamma_neg) * log_q_m
        return self.combine(pos, neg, targets, ignore)


class SmoothedCE(nn.Module):
    """Softmax cross-entropy for single-label data (one positive per row), with label smoothing.

    ``soft_targets`` (batch mixing on): targets are class probabilities (B, C), mixes of two one-hots;
    torch smooths them as y·(1-ε) + ε/C, which equals mixing the two smoothed one-hots (smoothing is
    affine), as timm's mixup_target composes them. Off, the class index form is kept: the same loss,
    but not bit for bit, and runs without mixing stay exactly as they were.
    """

    def __init__(self, label_smoothing: float = 0.0, soft_targets: bool = False):
        super().__init__()
        self.label_smoothing, self.soft_targets = label_smoothing, soft_targets

    def forward(self, logits, targets, ignore):
        target = targets if self.soft_targets else targets.argmax(1)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


SIGMOID_LOSSES = ("bce", "focal", "asl")
LOSSES = ("auto", *SIGMOID_LOSSES, "ce")
CLASS_WEIGHTS = ("none", "balanced")
MAX_POS_WEIGHT = 50.0      # a class with 3 positives in 10,000 images must not dominate the loss


def balanced_pos_weight(targets, ignore) -> torch.Tensor:
    """(C,) pos_weight for ``train.class_weights=balanced``, from the training rows:

        w_c = clip(negatives_c / max(positives_c, 1), 1, 50)

    counting only pairs that are not ignored. Multiplying class c's positive term by w_c gives its
    positives as much total weight as its negatives; the floor 1 never down-weights a frequent
    class's positives, the cap 50 keeps a class with a handful of positives from dominating.
    """
    t = torch.as_tensor(targets, dtype=torch.float32)
    keep = ~torch.as_tensor(ignore, dtype=torch.bool)
    pos = (t * keep).sum(0)
    neg = ((1 - t) * keep).sum(0)
    return (neg / pos.clamp(min=1)).clamp(1.0, MAX_POS_WEIGHT)


def describe_pos_weight(class_names: list[str], pos_weight: torch.Tensor) -> str:
    """One line of the balanced class weights, largest first (all of them up to 12 classes)."""
    pairs = sorted(zip(pos_weight.tolist(), class_names), reverse=True)
    shown = pairs if len(pairs) <= 12 else pairs[:6] + [(None, "...")] + pairs[-3:]
    return f"class weights (balanced pos_weight = negatives / positives, clipped to [1, {MAX_POS_WEIGHT:g}]): " + ", ".join(
        name if w is None else f"{name} {w:.1f}" for w, name in shown)


def check_loss_name(name: str) -> None:
    if name not in LOSSES:
        raise UserError(f'unknown train.loss "{name}"{did_you_mean(name, LOSSES)}.')


def build_loss(train: TrainConfig, multi_label: bool, targets=None, ignore=None, soft_targets: bool = False) -> nn.Module:
    """The training loss named by ``train.loss`` with its ``train.*`` parameters; class_weights="balanced"
    needs the training rows' targets/ignore to count positives; ``soft_targets``: batches are mixed
    (aug.mixup / aug.cutmix), which only cross-entropy needs to know (the sigmoid losses take any y)."""
    name = train.loss
    check_loss_name(name)
    if name == "auto":
        name = "bce" if multi_label else "ce"
    if train.label_smoothing and name != "ce":     # an explicit sigmoid loss with it is refused (config_checks)
        warnings.warn(f"train.label_smoothing={train.label_smoothing:g} is not used: it applies to single-label data "
                      f"(loss ce), and this data is multi-label (loss {name})", UserWarning, stacklevel=2)
    if train.class_weights not in CLASS_WEIGHTS:
        raise UserError(f'unknown train.class_weights "{train.class_weights}"'
                        f'{did_you_mean(train.class_weights, CLASS_WEIGHTS)}.')
    if name == "ce":
        if multi_label:
            raise UserError('train.loss=ce needs single-label data (one class per image); use train.loss=bce.')
        if train.class_weights != "none":
            raise UserError("train.class_weights applies to the multi-label losses (bce, focal, asl); for "
                            "single-label data use data.oversample_to to rebalance.")
        return SmoothedCE(train.label_smoothing, soft_targets)
    pos_weight = balanced_pos_weight(targets, ignore) if train.class_weights == "balanced" else None
    if name == "bce":
        return MaskedBCE(pos_weight)
    if name == "focal":
        return FocalLoss(train.focal_gamma, train.focal_alpha, pos_weight)
    return AsymmetricLoss(train.asl_gamma_neg, train.asl_gamma_pos, train.asl_clip, pos_weight)


def training_loss(model, loss_fn, x, y, ignore) -> torch.Tensor:
    """The loss of one batch. Sequence models (CNN-RNN) train on their own objective (teacher-forced
    label sequences) through ``sequence_loss``; every other model through the configured loss on logits."""
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "sequence_loss"):
        return model.sequence_loss(x, y, ignore) if model is base else base.sequence_loss(x, y, ignore)
    return loss_fn(model(x), y, ignore)


def loss_count(model, loss_fn, targets: torch.Tensor, ignore: torch.Tensor) -> float:
    """What ``training_loss`` on this batch averages over: non-ignored pairs for the sigmoid losses,
    rows for cross-entropy, emitted tokens (labels + END per image) for sequence models.

    A batch split into parts (processes, accumulation micro-batches) gives exactly the whole batch's
    loss, and gradient, when each part's loss is weighted by its count / the whole batch's count;
    equal weights would be exact only when every part ignores as many pairs as the others.
    """
    base = getattr(model, "_orig_mod", model)
    if hasattr(base, "sequence_loss"):
        return float(((targets > 0.5) & ~ignore).sum()) + len(targets)
    if isinstance(loss_fn, SmoothedCE):
        return float(len(targets))
    return float(max(int((~ignore).sum()), 1))
