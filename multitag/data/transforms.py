"""Batch transforms on uint8 image batches: normalisation (shared by training and inference)
and training augmentation done for a whole batch at once.

Images arrive from the decode-once cache as uint8 (B, 3, S, S). Augmenting the batch as one
tensor (one affine grid for crop + flip + rotation, vectorised colour jitter and erasing)
costs a few milliseconds per batch on the CPU, instead of a Python loop of per-image PIL ops.
TrivialAugment (the "strong" preset) is the exception: one op per image, in a loop on uint8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from multitag.config import AugConfig, resolve_aug
from multitag.errors import UserError


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0,1] float (B, 3, H, W) → normalised float32 (B, 3, H, W).

    The one normalisation used by training, evaluation, predict, export and serving; mean/std
    travel in model.json with the weights so inference can never use different values.
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


@dataclass(frozen=True)
class Part:
    """Images [start, stop) of a batch of ``total``: one process's share in distributed training."""
    start: int
    stop: int
    total: int


class Draws:
    """Per-image random draws made for the whole batch and returned for this call's part only.

    Each draw takes ``total`` numbers from the generator, as an unsplit batch would, so image i of
    a batch gets the same augmentation whichever process (or micro-batch) augments it, and every
    process's generator stays in step. Drawing numbers for the other parts costs microseconds;
    the images of the other parts are never touched.
    """

    def __init__(self, g: torch.Generator, b: int, part: Part | None = None):
        self.g, self.total = g, part.total if part else b
        self.part = slice(part.start, part.stop) if part else slice(None)

    def rand(self) -> torch.Tensor:                       # (b,) uniform in [0, 1)
        return torch.rand(self.total, generator=self.g)[self.part]

    def uniform(self, lo: float, hi: float) -> torch.Tensor:
        return _uniform(self.total, lo, hi, self.g)[self.part]

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.total,), generator=self.g)[self.part]


# TrivialAugmentWide (Müller & Hutter, ICCV 2021) with torchvision's "wide" magnitude ranges:
# (op, largest magnitude, random sign). Each image gets one op, its magnitude uniform over 31 bins.
TRIVIAL_BINS = 31
TRIVIAL_OPS = (
    ("identity", 0.0, False),
    ("shear_x", 0.99, True), ("shear_y", 0.99, True),
    ("translate_x", 32 / 224, True), ("translate_y", 32 / 224, True),   # 32 px at 224 px, as a fraction of
    ("rotate", 135.0, True),                                            # the side (sizes here: 32-320 px)
    ("brightness", 0.99, True), ("color", 0.99, True), ("contrast", 0.99, True), ("sharpness", 0.99, True),
    ("posterize", 6.0, False),                # bits dropped: 8 → 2 bits kept
    ("solarize", 1.0, False),                 # threshold lowered from 255 to 0
    ("autocontrast", 0.0, False), ("equalize", 0.0, False),
)


def _trivial_op(img: torch.Tensor, op: str, m: float) -> torch.Tensor:
    """One TrivialAugment op on a uint8 (3, S, S) image; geometry is nearest-neighbour with black fill."""
    side = img.shape[-1]
    if op == "identity":
        return img
    if op in ("shear_x", "shear_y"):
        shear = math.degrees(math.atan(m))
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                         shear=[shear, 0.0] if op == "shear_x" else [0.0, shear])
    if op in ("translate_x", "translate_y"):
        shift = round(m * side)
        return TF.affine(img, angle=0.0, scale=1.0, shear=[0.0, 0.0],
                         translate=[shift, 0] if op == "translate_x" else [0, shift])
    if op == "rotate":
        return TF.rotate(img, m)
    if op in ("brightness", "color", "contrast", "sharpness"):
        adjust = {"brightness": TF.adjust_brightness, "color": TF.adjust_saturation,
                  "contrast": TF.adjust_contrast, "sharpness": TF.adjust_sharpness}[op]
        return adjust(img, 1.0 + m)
    if op == "posterize":
        return TF.posterize(img, 8 - round(m))
    if op == "solarize":
        return TF.solarize(img, 255.0 * (1.0 - m))
    return TF.autocontrast(img) if op == "autocontrast" else TF.equalize(img)


def trivial_augment(x: torch.Tensor, g: torch.Generator | Draws) -> torch.Tensor:
    """TrivialAugmentWide on a uint8 (B, 3, S, S) batch: one random op and magnitude per image.

    Drawn from ``g`` (not torch's global RNG, which torchvision's own class uses), so an epoch
    augments reproducibly. Images are transformed one by one: per-image magnitudes rarely repeat
    within a batch, and at these sizes the loop costs far less than the training step.
    """
    b = x.shape[0]
    d = g if isinstance(g, Draws) else Draws(g, b)
    ops, bins = d.randint(len(TRIVIAL_OPS)).tolist(), d.randint(TRIVIAL_BINS).tolist()
    signs = torch.where(d.rand() < 0.5, -1.0, 1.0).tolist()
    out = torch.empty_like(x)
    threads = torch.get_num_threads()
    # Per-image ops are too small to split across threads: with several OpenMP threads each op pays
    # a fork/join, and on a busy machine spin-waiting made the loop ~100× slower (measured).
    torch.set_num_threads(1)
    try:
        for i in range(b):
            name, largest, signed = TRIVIAL_OPS[ops[i]]
            m = largest * bins[i] / (TRIVIAL_BINS - 1) * (signs[i] if signed else 1.0)
            out[i] = _trivial_op(x[i], name, m)
    finally:
        torch.set_num_threads(threads)
    return out


def _pad_crop(x: torch.Tensor, pad: int, flip: torch.Tensor, d: Draws) -> torch.Tensor:
    """Whole-pixel shifts of up to ``pad`` px (reflect-padded, CIFAR's RandomCrop(S, padding)) + flip.

    x: (B, C, H, W); flip: (B,) ±1. Integer shifts keep the pixels sharp: a bilinear resampling at
    sub-pixel offsets blurs training images that test images never are. Two gathers, no loop.
    """
    b, c, h, w = x.shape
    if pad == 0:
        return torch.where((flip < 0).view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    dy, dx = d.randint(2 * pad + 1).to(x.device), d.randint(2 * pad + 1).to(x.device)   # (B,) offsets
    x = torch.where((flip < 0).view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")                     # (B, C, H+2p, W+2p)
    rows = dy.view(b, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)
    x = x.gather(2, rows.expand(b, c, h, w + 2 * pad))                     # (B, C, H, W+2p)
    cols = dx.view(b, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)
    return x.gather(3, cols.expand(b, c, h, w))                            # (B, C, H, W)


def alternating_flip(rows: np.ndarray, epoch: int, first: torch.Tensor) -> torch.Tensor:
    """airbench's alternating flip: (B,) bool, image ``rows`` mirrored in ``epoch``. Each image is
    mirrored on every other epoch, a coin per image (``first``: (table rows,) bool) deciding whether on
    the even or the odd ones, so every two epochs see both views of every image, where independent
    coins leave a quarter of them unseen in one view (Jordan 2024: worth ~20 % fewer epochs)."""
    return first[torch.from_numpy(rows)] ^ bool(epoch % 2)


class BatchAugment:
    """Training augmentation for a uint8 batch; returns normalised float32 of the same shape.

    ``aug`` is resolved against its preset (config.resolve_aug). Randomness comes only from the
    ``torch.Generator`` passed in, so an epoch seeded the same way augments the same way (this is
    what makes --resume reproduce an uninterrupted run). Every image of a batch gets its own draws,
    so the copies of an oversampled image are augmented independently. ``part`` says which images
    of a larger batch ``x`` holds (distributed training): they are augmented as in the whole batch.
    """

    def __init__(self, aug: AugConfig, mean, std):
        self.aug, self.mean, self.std = resolve_aug(aug), mean, std
        if self.aug.alternate_flip and not self.aug.hflip:
            raise UserError("aug.alternate_flip=true says when to mirror images, but aug.hflip is off; "
                            "set aug.hflip=true as well, or aug.alternate_flip=false.")

    def describe(self) -> str:
        """One line for the training log: the preset and the operations it resolved to."""
        a = self.aug
        steps = {"TrivialAugment": a.trivial_augment, "hflip": a.hflip and not a.alternate_flip,
                 "hflip on alternate epochs": a.hflip and a.alternate_flip,
                 f"crop {a.scale[0]:g}-{a.scale[1]:g}": tuple(a.scale) != (1.0, 1.0),
                 f"rotate ±{a.rotate:g}°": a.rotate > 0, f"translate {a.translate:g}": a.translate > 0,
                 f"jitter {a.color_jitter:g}": a.color_jitter > 0, f"erasing p {a.erasing:g}": a.erasing > 0}
        return f"preset {a.preset}: {', '.join(k for k, on in steps.items() if on) or 'none'}"

    def __call__(self, x: torch.Tensor, g: torch.Generator, part: Part | None = None,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
        """``flip``: (B,) bool, which images to mirror, given by the loader for aug.alternate_flip
        (alternating_flip); None = a fair coin per image."""
        b = x.shape[0]
        d = Draws(g, b, part)
        if self.aug.trivial_augment:
            x = trivial_augment(x, d)                             # on uint8, as TrivialAugment is defined
        x = x.float().div_(255)                                   # (B, 3, S, S) in [0, 1]
        x = self._geometry(x, d, flip)
        if self.aug.color_jitter > 0:
            x = self._color(x, d)
        x = normalize(x, self.mean, self.std)
        if self.aug.erasing > 0:
            x = self._erase(x, d)
        assert x.shape[0] == b
        return x

    def _geometry(self, x: torch.Tensor, d: Draws, mirror: torch.Tensor | None) -> torch.Tensor:
        """Random-resized crop, horizontal flip and rotation as one affine resampling per image."""
        b = x.shape[0]
        a = self.aug
        coin = d.rand() < 0.5 if a.hflip else torch.zeros(b, dtype=torch.bool)     # drawn either way: same stream
        flip = torch.where(coin if mirror is None else mirror, -1.0, 1.0)
        needs_resample = tuple(a.scale) != (1.0, 1.0) or a.rotate > 0 or a.translate > 0
        if not needs_resample:
            return torch.where((flip < 0).view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
        if tuple(a.scale) == (1.0, 1.0) and a.rotate == 0:
            return _pad_crop(x, round(a.translate * x.shape[-1]), flip, d)
        # Crop of area fraction s and aspect r: width w = sqrt(s·r), height h = sqrt(s/r) in
        # units of the image side, clipped to the image; its centre is uniform where it fits.
        area = d.uniform(a.scale[0], a.scale[1])
        log_r = d.uniform(math.log(a.ratio[0]), math.log(a.ratio[1]))
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        cx = (d.rand() * 2 - 1) * (1 - w)
        cy = (d.rand() * 2 - 1) * (1 - h)
        if a.translate > 0:     # a shift of t·side is 2t in the (-1..1) grid units; edges reflect
            cx = cx + d.uniform(-2 * a.translate, 2 * a.translate)
            cy = cy + d.uniform(-2 * a.translate, 2 * a.translate)
        angle = d.uniform(-a.rotate, a.rotate) * math.pi / 180 if a.rotate > 0 else torch.zeros(b)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # theta maps output coords (-1..1) to input coords: R · diag(flip·w, h) · p + (cx, cy).
        theta = torch.stack([
            torch.stack([cos * flip * w, -sin * h, cx], 1),
            torch.stack([sin * flip * w, cos * h, cy], 1),
        ], 1)                                                     # (B, 2, 3)
        # Draws stay on the CPU generator (same augmentation on every device); x may be on a GPU.
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _color(self, x: torch.Tensor, d: Draws) -> torch.Tensor:
        """Brightness, contrast and saturation jitter with factors in [1-j, 1+j] per image."""
        b, j = x.shape[0], self.aug.color_jitter

        def factor() -> torch.Tensor:                              # (B, 1, 1, 1)
            return d.uniform(max(0.0, 1 - j), 1 + j).view(b, 1, 1, 1).to(x.device)

        x = x * factor()
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, S, S)
        x = (x - gray.mean((2, 3), keepdim=True)) * factor() + gray.mean((2, 3), keepdim=True)
        x = (x - gray) * factor() + gray
        return x.clamp_(0, 1)

    def _erase(self, x: torch.Tensor, d: Draws) -> torch.Tensor:
        """Random erasing (p per image, 2–33 % of the area, aspect 0.3–3.3) filled with 0 = the mean."""
        _, _, hgt, wid = x.shape
        area = d.uniform(0.02, 0.33)
        log_r = d.uniform(math.log(0.3), math.log(3.3))
        eh = (torch.sqrt(area / torch.exp(log_r)) * hgt).clamp(1, hgt)
        ew = (torch.sqrt(area * torch.exp(log_r)) * wid).clamp(1, wid)
        y0 = d.rand() * (hgt - eh)
        x0 = d.rand() * (wid - ew)
        on = d.rand() < self.aug.erasing
        rows = torch.arange(hgt).view(1, hgt, 1)
        cols = torch.arange(wid).view(1, 1, wid)
        box = ((rows >= y0.view(-1, 1, 1)) & (rows < (y0 + eh).view(-1, 1, 1))
               & (cols >= x0.view(-1, 1, 1)) & (cols < (x0 + ew).view(-1, 1, 1)) & on.view(-1, 1, 1))
        return x.masked_fill(box.unsqueeze(1).to(x.device), 0.0)
