"""Batching, multi-label oversampling and class weights."""
import numpy as np
import torch

from multitag.data.loader import BatchLoader, epoch_rows, repeat_factors
from multitag.losses import MAX_POS_WEIGHT, balanced_pos_weight


class FakeCache:
    """get_batch returns images whose every pixel is the row index, so batches can be traced."""

    def get_batch(self, index):
        return torch.as_tensor(np.asarray(index), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def test_repeat_factors_follow_the_rarest_label():
    targets = np.array([[1, 0, 0]] * 8 + [[1, 1, 0]] * 2 + [[0, 0, 0]], dtype=np.float32)
    ignore = np.zeros_like(targets, dtype=bool)
    f = repeat_factors(targets, ignore, target_per_class=8)
    assert f[:8].tolist() == [1.0] * 8          # label 0 already has 10 ≥ 8
    assert f[8:10].tolist() == [4.0, 4.0]       # label 1 has 2 → ×4
    assert f[10] == 1.0                         # no labels


def test_epoch_rows_fixed_length_and_expected_counts():
    rows = np.arange(4)
    repeats = np.array([1.0, 2.5, 1.0, 3.25])
    lengths, counts = set(), np.zeros(4)
    for seed in range(400):
        out = epoch_rows(rows, repeats, torch.Generator().manual_seed(seed))
        lengths.add(len(out))
        counts += np.bincount(out, minlength=4)
    assert lengths == {8}                       # round(7.75) every epoch
    # floor(r) copies each, and the one extra copy goes to rows 1 and 3 in proportion 0.5 : 0.25
    assert np.allclose(counts / 400, [1.0, 2 + 2 / 3, 1.0, 3 + 1 / 3], atol=0.08)


def test_loader_covers_every_row_once_without_oversampling():
    targets = np.eye(3, dtype=np.float32)[np.arange(10) % 3]
    loader = BatchLoader(FakeCache(), np.arange(10), targets, np.zeros_like(targets, bool), batch_size=4,
                         mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), shuffle=True)
    seen = np.concatenate([b.index for b in loader.iterate(epoch=3)])
    assert sorted(seen.tolist()) == list(range(10))
    batch = next(loader.iterate(epoch=3))
    # normalised pixel = index (mean 0, std 1/255) and targets follow the rows
    assert torch.allclose(batch.images[:, 0, 0, 0], torch.as_tensor(batch.index, dtype=torch.float32))
    assert torch.equal(batch.targets, torch.from_numpy(targets[batch.index]))
    again = np.concatenate([b.index for b in loader.iterate(epoch=3)])
    assert np.array_equal(seen, again)          # same (seed, epoch) → same order


def test_balanced_pos_weight():
    targets = np.array([[1, 0], [0, 0], [0, 0], [0, 1]] * 50 + [[1, 0]] * 0, dtype=np.float32)
    targets[:, 1] = 0
    targets[0, 1] = 1                           # 1 positive in 200 → clipped
    w = balanced_pos_weight(targets, np.zeros_like(targets, bool))
    assert w[0].item() == 150 / 50 and w[1].item() == MAX_POS_WEIGHT
