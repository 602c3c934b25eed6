"""The GPU side of batching: uint8 rows copied to the device once (small datasets), or moved per batch.

A batch crosses the bus as uint8 (4x fewer bytes than the float32 it becomes) from pinned memory,
asynchronously, and is augmented on the device (data/transforms.py works on any device; its random
draws stay on the CPU generator, so an epoch augments alike on every device). When a loader's rows
fit in a quarter of the free GPU memory they are copied there once, and a batch is one on-device
gather: the airbench way, where CIFAR-10 (150 MB as uint8) lives on the GPU for a whole run.
"""
from __future__ import annotations

import numpy as np
import torch

GPU_SHARE = 0.25     # the most of the free GPU memory the cached rows may take: the model needs the rest


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; CPU → CUDA copies go from pinned memory without blocking the host."""
    if device.type != "cuda":
        return x
    if x.is_cuda:               # rows of a DeviceCache (cuda:0 is not == cuda, so compare types): no pinning
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class DeviceCache:
    """The rows of an image cache that one loader reads, held on a GPU.

    pixels: (R, S, S, 3) uint8 on the device (HWC rows, as in the memory-mapped cache)
    local:  (N,) int64, table row → its row in ``pixels`` (-1 for rows not held)
    """

    def __init__(self, cache, rows: np.ndarray, device: torch.device):
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.size, self.valid = cache.size, cache.valid
        self.local = np.full(len(cache), -1, dtype=np.int64)
        self.local[rows] = np.arange(len(rows))
        self.pixels = torch.from_numpy(np.ascontiguousarray(cache.array[rows])).to(device)

    @staticmethod
    def fits(cache, rows: np.ndarray, device: torch.device) -> bool:
        if not hasattr(cache, "array"):        # e.g. a feature table: nothing to hold
            return False
        row_bytes = int(np.prod(cache.array.shape[1:]))
        free, _ = torch.cuda.mem_get_info(device)
        return len(np.unique(rows)) * row_bytes <= GPU_SHARE * free

    def __len__(self) -> int:
        return len(self.local)

    def get_batch(self, indices, channels_last: bool = False) -> torch.Tensor:
        """Rows → (B, 3, S, S) uint8 on the device, like ImageCache.get_batch."""
        local = torch.from_numpy(self.local[np.asarray(indices, dtype=np.int64)]).to(self.pixels.device)
        batch = self.pixels[local].permute(0, 3, 1, 2)       # (B, 3, S, S) view, channels_last strides
        return batch if channels_last else batch.contiguous()
