"""Losses: hand-computed values, limiting cases (focal and ASL reduce to BCE), the ignore mask, pos_weight."""
import math

import numpy as np
import pytest
import torch

from multitag.config import TrainConfig
from multitag.errors import UserError
from multitag.losses import (
    MAX_POS_WEIGHT,
    AsymmetricLoss,
    FocalLoss,
    MaskedBCE,
    SmoothedCE,
    balanced_pos_weight,
    build_loss,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def one_pair(loss, logit: float, target: float) -> float:
    """The loss of a single (logit, target) pair."""
    return loss(torch.tensor([[logit]]), torch.tensor([[target]]), torch.zeros(1, 1, dtype=torch.bool)).item()


def random_batch(seed=0, b=16, c=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 4
    targets = (torch.rand(b, c, generator=g) < 0.3).float()
    ignore = torch.rand(b, c, generator=g) < 0.2
    return logits, targets, ignore


def test_bce_hand_values():
    assert one_pair(MaskedBCE(), 0.0, 1.0) == pytest.approx(math.log(2))
    assert one_pair(MaskedBCE(), 2.0, 0.0) == pytest.approx(math.log(1 + math.exp(2)))
    assert one_pair(MaskedBCE(torch.tensor([3.0])), 0.0, 1.0) == pytest.approx(3 * math.log(2))


def test_focal_hand_values():
    # FL = -α_t (1 - p_t)^γ log p_t
    assert one_pair(FocalLoss(gamma=2), 0.0, 1.0) == pytest.approx(0.25 * math.log(2))
    p = sigmoid(2.0)
    assert one_pair(FocalLoss(gamma=2), 2.0, 0.0) == pytest.approx(p ** 2 * -math.log(1 - p), rel=1e-5)
    assert one_pair(FocalLoss(gamma=2, alpha=0.25), 0.0, 1.0) == pytest.approx(0.25 * 0.25 * math.log(2))
    assert one_pair(FocalLoss(gamma=2, alpha=0.25), 0.0, 0.0) == pytest.approx(0.75 * 0.25 * math.log(2))


def test_asl_hand_values():
    asl = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05)
    # negative at p = 0.5: p_m = 0.45, loss = p_m^4 · -log(1 - p_m)
    assert one_pair(asl, 0.0, 0.0) == pytest.approx(0.45 ** 4 * -math.log(0.55), rel=1e-5)
    # positive at p = 0.5: (1 - p)^1 · -log p
    assert one_pair(asl, 0.0, 1.0) == pytest.approx(0.5 * math.log(2), rel=1e-6)
    # an easy negative below the margin (p ≈ 0.018 < 0.05) costs nothing and has no gradient
    logit = torch.tensor([[-4.0]], requires_grad=True)
    loss = asl(logit, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and logit.grad.item() == 0.0


@pytest.mark.parametrize("other", [FocalLoss(gamma=0, alpha=None), AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)])
def test_limits_equal_bce_in_value_and_gradient(other):
    logits, targets, ignore = random_batch()
    for pos_weight in (None, torch.tensor([1.0, 2.0, 5.0, 1.0, 50.0])):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        other.pos_weight = pos_weight
        bce = MaskedBCE(pos_weight)(a, targets, ignore)
        lim = other(b, targets, ignore)
        bce.backward()
        lim.backward()
        assert lim.item() == pytest.approx(bce.item(), rel=1e-6)
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


@pytest.mark.parametrize("loss", [MaskedBCE(), FocalLoss(gamma=2, alpha=0.25), AsymmetricLoss()])
def test_ignored_pairs_contribute_nothing(loss):
    logits, targets, ignore = random_batch(1)
    changed = torch.where(ignore, -logits * 7, logits)          # ignored pairs get other logits and targets
    flipped = torch.where(ignore, 1 - targets, targets)
    assert loss(changed, flipped, ignore).item() == pytest.approx(loss(logits, targets, ignore).item(), rel=1e-6)
    # the mean is over the kept pairs only: one kept pair = that pair's loss
    only = torch.ones_like(ignore)
    only[0, 0] = False
    assert loss(logits, targets, only).item() == pytest.approx(one_pair(loss, logits[0, 0].item(), targets[0, 0].item()),
                                                               rel=1e-5)
    assert loss(logits, targets, torch.ones_like(ignore)).item() == 0.0


def test_small_gamma_keeps_gradients_finite_at_extreme_logits():
    logits = torch.tensor([[120.0, -120.0, 0.0, 30.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    ignore = torch.zeros_like(targets, dtype=torch.bool)
    for loss in (FocalLoss(gamma=0.5), AsymmetricLoss(gamma_neg=0.5, gamma_pos=0.5, clip=0.05)):
        logits.grad = None
        loss(logits, targets, ignore).backward()
        assert torch.isfinite(logits.grad).all()


def test_pos_weight_formula():
    # w_c = clip(negatives / positives, 1, 50) over the non-ignored pairs of the training rows
    targets = np.zeros((200, 4), dtype=np.float32)
    ignore = np.zeros_like(targets, dtype=bool)
    targets[:50, 0] = 1                 # 50 positives, 150 negatives → 3
    targets[:2, 1] = 1                  # 2 positives, 198 negatives → 99 → capped at 50
    targets[:150, 2] = 1                # more positives than negatives → floor 1
    targets[:10, 3] = 1                 # 10 positives; 90 of the 190 negatives ignored → 100 / 10 = 10
    ignore[100:190, 3] = True
    w = balanced_pos_weight(targets, ignore)
    assert MAX_POS_WEIGHT == 50 and w.tolist() == [3.0, MAX_POS_WEIGHT, 1.0, 10.0]
    # a class without positives divides by 1: its weight multiplies nothing anyway
    assert balanced_pos_weight(np.zeros((5, 1)), np.zeros((5, 1), bool)).item() == 5.0


def test_build_loss_reads_the_train_config():
    targets = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
    ignore = np.zeros_like(targets, dtype=bool)
    focal = build_loss(TrainConfig(loss="focal", focal_gamma=1.5, focal_alpha=0.3), True)
    assert isinstance(focal, FocalLoss) and (focal.gamma, focal.alpha) == (1.5, 0.3)
    asl = build_loss(TrainConfig(loss="asl", asl_gamma_neg=2, asl_gamma_pos=1, asl_clip=0.1,
                                 class_weights="balanced"), True, targets, ignore)
    assert isinstance(asl, AsymmetricLoss) and (asl.gamma_neg, asl.gamma_pos, asl.clip) == (2, 1, 0.1)
    assert asl.pos_weight.tolist() == [1.0, 3.0, 3.0]
    assert isinstance(build_loss(TrainConfig(), True), MaskedBCE)
    assert isinstance(build_loss(TrainConfig(label_smoothing=0.1), False), SmoothedCE)
    with pytest.raises(UserError, match='did you mean "focal"'):
        build_loss(TrainConfig(loss="focall"), True)
    with pytest.raises(UserError, match="single-label"):
        build_loss(TrainConfig(loss="ce"), True)
    with pytest.raises(UserError, match="clip"):
        build_loss(TrainConfig(loss="asl", asl_clip=1.5), True)


def test_label_smoothing_of_a_recipe_on_multi_label_data_is_said_to_be_unused():
    from multitag.config import TrainConfig
    from multitag.losses import build_loss

    with pytest.warns(UserWarning, match="label_smoothing=0.1 is not used: it applies to single-label data"):
        build_loss(TrainConfig(label_smoothing=0.1), multi_label=True)
