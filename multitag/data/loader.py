"""Batching from the decode-once cache: shuffled (seeded per epoch) index batches → augmented tensors.

Everything an epoch needs is already decoded and resized in the memory-mapped cache, so a
batch is a gather of uint8 rows plus one batched augmentation: no worker processes needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from multitag.data.transforms import normalize


@dataclass
class Batch:
    images: torch.Tensor      # (B, 3, S, S) float32, normalised
    targets: torch.Tensor     # (B, C) float32 in {0, 1}
    ignore: torch.Tensor      # (B, C) bool
    index: np.ndarray         # (B,) rows of the table


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one source of randomness of an epoch (order and augmentation); a function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class BatchLoader:
    """Iterates over ``rows`` of an image cache in batches.

    cache:   object with ``get_batch(indices) -> uint8 (B, 3, S, S)`` (data/cache.py's ImageCache).
    augment: callable (uint8 batch, generator) → normalised float batch, or None for evaluation.
    """

    def __init__(self, cache, rows: np.ndarray, targets: np.ndarray, ignore: np.ndarray, *,
                 batch_size: int, mean, std, augment: Callable | None = None, shuffle: bool = False,
                 drop_last: bool = False):
        self.cache, self.rows = cache, np.asarray(rows)
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.ignore = torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool))
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.augment, self.shuffle = augment, shuffle
        # Dropping a last tiny batch keeps BatchNorm statistics sane in training.
        self.drop_last = drop_last and len(self.rows) > batch_size

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def iterate(self, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        g = epoch_generator(seed, epoch)
        order = self.rows[torch.randperm(len(self.rows), generator=g).numpy()] if self.shuffle else self.rows
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size]
            # Sorted reads are sequential in the memory map; the batch content is unchanged.
            pixels = self.cache.get_batch(np.sort(index))
            index = np.sort(index)
            images = self.augment(pixels, g) if self.augment else normalize(pixels, self.mean, self.std)
            t = torch.from_numpy(index)
            yield Batch(images, self.targets[t], self.ignore[t], index)
