"""Batching from the decode-once cache: shuffled (seeded per epoch) index batches → augmented tensors.

Everything an epoch needs is already decoded and resized in the memory-mapped cache, so a
batch is a gather of uint8 rows plus one batched augmentation: no worker processes needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from multitag.data.device_cache import DeviceCache, to_device
from multitag.data.mixing import BatchMix, mix_labels, partners
from multitag.data.transforms import Part, alternating_flip, normalize
from multitag.errors import UserError


@dataclass
class Batch:
    images: torch.Tensor      # (B, 3, S, S) float32, normalised
    targets: torch.Tensor     # (B, C) float32 in {0, 1}; in [0, 1] when mixed (aug.mixup / aug.cutmix)
    ignore: torch.Tensor      # (B, C) bool
    index: np.ndarray         # (B,) rows of the table
    whole: np.ndarray | None = None  # (B_global,) rows of the whole batch when this is one process's part
    whole_targets: torch.Tensor | None = None   # (B_global, C) targets and ignore of the whole batch, as
    whole_ignore: torch.Tensor | None = None    # trained on (mixed too), when this is one process's part

    def whole_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, ignore) of the whole global batch: what the batch's loss averages over."""
        return (self.targets, self.ignore) if self.whole is None else (self.whole_targets, self.whole_ignore)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one source of randomness of an epoch (order and augmentation); a function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def repeat_factors(targets: np.ndarray, ignore: np.ndarray, target_per_class: int,
                   max_repeat: float = 0.0) -> np.ndarray:
    """(N,) how often each training row is shown per epoch so every label reaches ~target_per_class.

    Multi-label oversampling: a row's factor is the largest need among its labels,
    max(1, target / count(label)), capped at ``max_repeat`` (0 = no cap); rows without labels
    keep 1. Frequent labels are oversampled too when they co-occur with rare ones — the usual
    price of multi-label oversampling; the cap bounds it (and the labels rarer than
    target / max_repeat then stop short of the target).
    """
    positives = (targets > 0.5) & ~ignore                      # (N, C)
    counts = positives.sum(0).clip(min=1)                      # (C,)
    need = np.maximum(1.0, target_per_class / counts)          # (C,)
    factors = np.where(positives, need[None, :], 1.0).max(1)   # (N,)
    if 0 < max_repeat < 1:
        raise UserError(f"data.oversample_max_repeat must be 0 (no cap) or at least 1, got {max_repeat}.")
    if max_repeat > 0:
        factors = np.minimum(factors, max_repeat)
    return factors.astype(np.float64)


def label_counts(targets: np.ndarray, ignore: np.ndarray, repeats: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """((C,) positives per label in the rows, (C,) expected positives per epoch after oversampling).

    The second is Σ over the rows holding the label of their repeat factor (equal to the first
    without oversampling); epoch_rows draws the fractional copies, so one epoch's count is close
    to it, not exact.
    """
    positives = (targets > 0.5) & ~ignore                      # (N, C)
    before = positives.sum(0).astype(np.float64)
    return before, before if repeats is None else repeats @ positives


def describe_oversampling(class_names: list[str], before: np.ndarray, after: np.ndarray, repeats: np.ndarray,
                          shown: int = 8) -> str:
    """Two log lines: epoch size and label-count range before → after, then the rarest labels."""
    order = np.argsort(before, kind="stable")
    picked = list(order) if len(order) <= shown + 1 else [*order[:shown], None, order[-1]]   # None = "…"
    per_label = ", ".join("…" if c is None else f"{class_names[c]} {before[c]:.0f}→{after[c]:.0f}" for c in picked)
    return (f"oversampling: {len(repeats)} → {repeats.sum():.0f} train images per epoch (largest repeat ×{repeats.max():.1f}); "
            f"label counts min/median/max {before.min():.0f}/{np.median(before):.0f}/{before.max():.0f} → "
            f"{after.min():.0f}/{np.median(after):.0f}/{after.max():.0f}\n"
            f"  per label, before → after: {per_label}")


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items; shares differ by at most one item."""
    return rank * n // world, (rank + 1) * n // world


def epoch_rows(rows: np.ndarray, repeats: np.ndarray, g: torch.Generator) -> np.ndarray:
    """Rows repeated per their factors with a fixed total, round(sum(repeats)), every epoch.

    Each row appears floor(r) times; the fractional parts decide, by weighted sampling without
    replacement, which rows get one more copy. A fixed length keeps per-batch schedules exact.
    Copies are not augmented alike: every image of a batch gets its own augmentation draws.
    """
    whole = np.floor(repeats).astype(np.int64)
    frac = repeats - whole
    extra = int(round(repeats.sum())) - int(whole.sum())
    out = np.repeat(rows, whole)
    if extra > 0:
        pick = torch.multinomial(torch.from_numpy(frac), extra, replacement=False, generator=g).numpy()
        out = np.concatenate([out, rows[pick]])
    return out


def read_rows(cache, index: np.ndarray) -> torch.Tensor:
    """cache.get_batch(index) read in ascending row order (sequential in the memory map) and returned
    in ``index``'s order: (B, 3, S, S)."""
    ascending = np.argsort(index, kind="stable")
    if (ascending == np.arange(len(index))).all():
        return cache.get_batch(index)
    back = np.empty_like(ascending)
    back[ascending] = np.arange(len(index))
    return cache.get_batch(index[ascending])[torch.from_numpy(back)]


class BatchLoader:
    """Iterates over ``rows`` of an image cache in batches.

    cache:   object with ``get_batch(indices) -> uint8 (B, 3, S, S)`` (data/cache.py's ImageCache).
    augment: callable (uint8 batch, generator, Part | None, mirror flags | None) → normalised float batch,
             or None for evaluation (transforms.BatchAugment).
    mix:     MixUp / CutMix after ``augment`` (data/mixing.py), or None; training only.
    shard:   (rank, world) in distributed training. Every rank draws the same epoch order and the
             same global batches of ``batch_size`` (all randomness comes from (seed, epoch)), then
             takes its contiguous share of each; augmentation draws are made for the whole batch
             (transforms.Draws), so the union of the ranks' parts is exactly one process's batch.
    """

    def __init__(self, cache, rows: np.ndarray, targets: np.ndarray, ignore: np.ndarray, *,
                 batch_size: int, mean, std, augment: Callable | None = None, shuffle: bool = False,
                 drop_last: bool = False, repeats: np.ndarray | None = None, shard: tuple[int, int] = (0, 1),
                 mix: BatchMix | None = None):
        self.cache, self.rows = cache, np.asarray(rows)
        self.repeats = repeats            # (len(rows),) oversampling factors, or None
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.ignore = torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool))
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.augment, self.shuffle, self.mix = augment, shuffle, mix
        self.shard = shard
        # Dropping a last tiny batch keeps BatchNorm statistics sane in training.
        self.drop_last = drop_last and self.epoch_size > batch_size
        self.device = torch.device("cpu")
        self._first_flip = None           # (seed, (table rows,) bool) for aug.alternate_flip

    def to(self, device: torch.device | str) -> "BatchLoader":
        """Deliver image batches on ``device``, augmented there. On a GPU the uint8 rows cross the bus
        (4x fewer bytes than float32; pinned, asynchronous), or, when this loader's rows fit in a
        quarter of the free GPU memory, are copied there once and gathered on the device."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and DeviceCache.fits(self.cache, self.rows, self.device):
            self.cache = DeviceCache(self.cache, self.rows, self.device)
        return self

    def _alternating_flip(self, index: np.ndarray, epoch: int, seed: int) -> torch.Tensor | None:
        """(B,) bool mirror flags of these rows under aug.alternate_flip, else None (a coin per image)."""
        aug = getattr(self.augment, "aug", None)          # BatchAugment's resolved AugConfig
        if aug is None or not aug.alternate_flip:        # (BatchAugment refuses it without hflip)
            return None
        if self._first_flip is None or self._first_flip[0] != seed:   # one coin per table row
            coins = torch.rand(len(self.targets), generator=torch.Generator().manual_seed(seed + 7_919)) < 0.5
            self._first_flip = (seed, coins)
        return alternating_flip(index, epoch, self._first_flip[1])

    @property
    def epoch_size(self) -> int:
        return len(self.rows) if self.repeats is None else int(round(self.repeats.sum()))

    def __len__(self) -> int:
        n = self.epoch_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def iterate(self, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        g = epoch_generator(seed, epoch)
        rows = self.rows if self.repeats is None else epoch_rows(self.rows, self.repeats, g)
        order = rows[torch.randperm(len(rows), generator=g).numpy()] if self.shuffle else rows
        for k in range(len(self)):
            # Kept in the shuffled order, not sorted: micro-batches (train.accumulate) and process shards
            # are slices of the batch, and slices of a class-sorted table's sorted rows would give each
            # one its own classes, and BatchNorm statistics that carry the labels.
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            whole, part = None, None
            parts = [shard_bounds(len(index), rank, self.shard[1]) for rank in range(self.shard[1])]
            if self.shard[1] > 1:     # this rank's images [lo, hi) of the global batch (B/world of them)
                lo, hi = parts[self.shard[0]]
                whole, index, part = index, index[lo:hi], Part(lo, hi, len(index))
            pixels = to_device(read_rows(self.cache, index), self.device)     # uint8 (B, 3, S, S)
            if not self.augment:
                images = normalize(pixels, self.mean, self.std)
            else:
                images = self.augment(pixels, g, part, self._alternating_flip(index, epoch, seed))
            t = torch.from_numpy(index if whole is None else whole)
            targets, ignore = self.targets[t], self.ignore[t]                   # (B_global, C)
            if self.mix is not None:      # after the augmentations, with the next number of the same generator
                images, targets, ignore = self._mixed(images, targets, ignore, g, parts)
            if whole is None:
                yield Batch(images, targets, ignore, index)
            else:
                yield Batch(images, targets[part.start:part.stop], ignore[part.start:part.stop], index, whole,
                            targets, ignore)

    def _mixed(self, images: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor, g: torch.Generator,
               parts: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's images (b, 3, S, S) and the whole batch's labels (B_global, C), mixed per one draw."""
        draw = self.mix.draw(g, *images.shape[-2:])
        if draw is None:
            return images, targets, ignore
        partner = partners(parts)                       # (B_global,) within each process's part
        lo, hi = parts[self.shard[0]]
        return (self.mix.images(images, draw, partner[lo:hi] - lo),
                *mix_labels(targets, ignore, draw.lam, partner))
