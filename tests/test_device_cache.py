"""The GPU batching path, checked as far as a CPU allows: the device-resident row cache gathers what
the memory-mapped cache gathers, and a loader moved to the CPU is unchanged. The last test (GPU
batches equal CPU batches) runs only where CUDA is present."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multitag.config import AugConfig
from multitag.data.cache import build_cache
from multitag.data.device_cache import DeviceCache, to_device
from multitag.data.formats import read_table
from multitag.data.loader import BatchLoader
from multitag.data.transforms import BatchAugment


@pytest.fixture(scope="module")
def cache_and_table(digits_csv, tmp_path_factory):
    table = read_table(digits_csv)
    return build_cache(table.paths[:24], 32, tmp_path_factory.mktemp("dc"), progress=False), table.subset(np.arange(24))


def test_device_cache_gathers_the_same_pixels(cache_and_table):
    cache, _ = cache_and_table
    rows = np.array([3, 5, 7, 11, 20])
    held = DeviceCache(cache, rows, torch.device("cpu"))
    for idx in ([5, 20, 3], [7]):
        assert torch.equal(held.get_batch(idx), cache.get_batch(idx))
        assert torch.equal(held.get_batch(idx, channels_last=True), cache.get_batch(idx, channels_last=True))
    assert held.pixels.shape == (5, 32, 32, 3)       # only the loader's rows are held


def test_to_device_is_a_no_op_on_the_cpu():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert to_device(x, torch.device("cpu")) is x


def test_loader_on_cpu_unchanged_and_device_cache_batches_match(cache_and_table):
    cache, t = cache_and_table
    aug = BatchAugment(AugConfig(preset="standard", erasing=0.5), (0.5,) * 3, (0.5,) * 3)
    make = lambda c: BatchLoader(c, np.arange(16), t.targets, t.ignore, batch_size=8, mean=(0.5,) * 3,
                                 std=(0.5,) * 3, augment=aug, shuffle=True)
    plain = [b.images for b in make(cache).iterate(1, 0)]
    moved = [b.images for b in make(cache).to("cpu").iterate(1, 0)]
    held = [b.images for b in make(DeviceCache(cache, np.arange(16), torch.device("cpu"))).iterate(1, 0)]
    for a, b, c in zip(plain, moved, held):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loader_matches_cpu(cache_and_table):
    cache, t = cache_and_table
    aug = BatchAugment(AugConfig(preset="standard", erasing=0.5), (0.5,) * 3, (0.5,) * 3)
    make = lambda: BatchLoader(cache, np.arange(16), t.targets, t.ignore, batch_size=8, mean=(0.5,) * 3,
                               std=(0.5,) * 3, augment=aug, shuffle=True)
    gpu = make().to("cuda")
    assert isinstance(gpu.cache, DeviceCache)
    for a, b in zip(make().iterate(1, 0), gpu.iterate(1, 0)):
        assert b.images.device.type == "cuda"
        torch.testing.assert_close(a.images, b.images.cpu(), atol=1e-4, rtol=0)
