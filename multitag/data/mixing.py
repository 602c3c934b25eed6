"""MixUp and CutMix of a training batch, as timm's ``Mixup`` in its "batch" mode (timm/data/mixup.py).

One λ per batch, drawn from Beta(α, α); every image i is mixed with a partner p(i):

    MixUp  (Zhang et al., ICLR 2018):  x_i = λ·x_i + (1-λ)·x_p(i)
    CutMix (Yun et al., ICCV 2019):    a box of area ≈ (1-λ) of the image pasted from x_p(i); λ is then
                                       recomputed from the box clipped to the image (timm's correct_lam)
    targets, both:                     y_i = λ·y_i + (1-λ)·y_p(i)         (soft targets)

Partners are the neighbours (0, 1), (2, 3), ... of the batch. The batch is a fresh shuffle every epoch,
so neighbours are as random a pairing as timm's reversed batch; unlike the reversal, a pair never
straddles two processes' parts (or accumulation micro-batches) of an even split, so the mixed images
do not depend on the process count. The draws come from the epoch's CPU generator, one number per
batch, the same on every process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from multitag.config import AugConfig, resolve_aug


@dataclass(frozen=True)
class MixDraw:
    """How one batch is mixed."""
    lam: float                                   # each image's own weight; its partner's is 1 - lam
    box: tuple[int, int, int, int] | None        # CutMix: rows [y0, y1), columns [x0, x1) taken from the
                                                 # partner; None = MixUp


def cutmix_box(lam: float, h: int, w: int, cy: int, cx: int) -> MixDraw:
    """The CutMix box for a drawn ``lam`` centred on pixel (cy, cx), and the λ it really gives.

    The box has sides int(h·√(1-λ)) × int(w·√(1-λ)) (area fraction 1-λ before clipping), clipped to the
    image where its centre is near an edge; the pasted area is then smaller, so the targets are mixed
    by λ = 1 - box area / image area, the share of the image that is still its own.
    """
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    y0, y1 = np.clip([cy - cut_h // 2, cy + (cut_h + 1) // 2], 0, h)
    x0, x1 = np.clip([cx - cut_w // 2, cx + (cut_w + 1) // 2], 0, w)
    return MixDraw(1.0 - float((y1 - y0) * (x1 - x0)) / (h * w), (int(y0), int(y1), int(x0), int(x1)))


def partners(parts: list[tuple[int, int]]) -> torch.Tensor:
    """(n,) int64: the partner of each image of a global batch split into ``parts`` [lo, hi) (one per
    process, loader.shard_bounds; [(0, n)] in one process).

    Neighbours (lo, lo+1), (lo+2, lo+3), ... within each part, so a process mixes only images it holds;
    when every part has an even size these are the pairs (0, 1), (2, 3), ... of the whole batch, whatever
    the process count. The last image of an odd part (only in an epoch smaller than one batch:
    config_checks asks for an even share) is its own partner.
    """
    out = torch.arange(parts[-1][1])
    for lo, hi in parts:
        even = lo + (hi - lo) // 2 * 2                      # images [lo, even) are paired
        out[lo:even] = torch.arange(lo, even).view(-1, 2).flip(1).reshape(-1)
    return out


def mix_labels(targets: torch.Tensor, ignore: torch.Tensor, lam: float,
               partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) soft targets λ·y + (1-λ)·y[partner], and (B, C) ignore | ignore[partner].

    A pair ignored ("difficult", unknown) in either image is ignored in the mix: its mixed target
    would need the unknown label, so no known value of λ·y_i + (1-λ)·y_p is right to train towards.
    """
    return lam * targets + (1 - lam) * targets[partner], ignore | ignore[partner]


class BatchMix:
    """MixUp / CutMix for the training loader; ``aug`` is resolved against its preset (resolve_aug)."""

    def __init__(self, aug: AugConfig):
        self.aug = resolve_aug(aug)

    @staticmethod
    def of(aug: AugConfig) -> "BatchMix | None":
        """The batch mixing ``aug`` asks for, or None when mixup and cutmix are both off."""
        a = resolve_aug(aug)
        return BatchMix(a) if a.mixup > 0 or a.cutmix > 0 else None

    def describe(self) -> str:
        """One line for the training log."""
        a = self.aug
        kinds = [f"MixUp α {a.mixup:g}"] * (a.mixup > 0) + [f"CutMix α {a.cutmix:g}"] * (a.cutmix > 0)
        switch = f" (CutMix for {a.mix_switch_prob:.0%} of them)" if len(kinds) == 2 else ""
        return (f"{' + '.join(kinds)} on {a.mix_prob:.0%} of the batches{switch}, one λ per batch, "
                "neighbouring images paired, soft targets")

    def draw(self, g: torch.Generator, h: int, w: int) -> MixDraw | None:
        """This batch's mixing for (h, w) images, or None to leave it as it is.

        Exactly one number is taken from ``g`` per batch whatever is drawn, so the generator stays in
        step on every process; numpy's Beta sampler, seeded from it, makes the draws.
        """
        a = self.aug
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
        if rng.random() >= a.mix_prob:
            return None
        cut = a.cutmix > 0 and (a.mixup == 0 or rng.random() < a.mix_switch_prob)
        alpha = a.cutmix if cut else a.mixup
        lam = float(rng.beta(alpha, alpha))
        draw = cutmix_box(lam, h, w, int(rng.integers(h)), int(rng.integers(w))) if cut else MixDraw(lam, None)
        return None if draw.lam == 1.0 else draw      # an empty box mixes nothing (nor the ignore masks)

    @staticmethod
    def images(x: torch.Tensor, draw: MixDraw, partner: torch.Tensor) -> torch.Tensor:
        """x: (b, 3, H, W) float, augmented and normalised; partner: (b,) indices into x."""
        partner = partner.to(x.device)
        if draw.box is None:
            return x * draw.lam + x[partner] * (1 - draw.lam)
        y0, y1, x0, x1 = draw.box
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
        return out
