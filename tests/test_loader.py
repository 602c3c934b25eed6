"""Batching, multi-label oversampling, class weights and augmentation presets."""
import dataclasses

import numpy as np
import pytest
import torch

from multitag.config import AUG_PRESETS, AugConfig, load_config, resolve_aug
from multitag.data.loader import BatchLoader, describe_oversampling, epoch_rows, label_counts, repeat_factors
from multitag.data.transforms import TRIVIAL_OPS, BatchAugment, _trivial_op, trivial_augment
from multitag.errors import UserError
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


def test_micro_batches_and_shards_of_a_class_sorted_table_mix_the_classes():
    # A folder dataset's rows are sorted by class. The first quarter of a batch (a micro-batch of
    # train.accumulate=4) or half (the shard of process 0 of 2) must not hold only the low classes:
    # BatchNorm statistics would then carry the labels (train loss fine, test accuracy ~50 %).
    targets = np.eye(4, dtype=np.float32)[np.arange(400) // 100]           # rows 0-99 class 0, ...
    common = dict(mean=(0, 0, 0), std=(1 / 255,) * 3, shuffle=True)
    ignore = np.zeros_like(targets, bool)
    whole = next(BatchLoader(FakeCache(), np.arange(400), targets, ignore, batch_size=400, **common).iterate())
    assert set(whole.index[:100] // 100) == {0, 1, 2, 3}
    assert torch.allclose(whole.images[:, 0, 0, 0], torch.as_tensor(whole.index % 256, dtype=torch.float32))  # rows in order
    shard = next(BatchLoader(FakeCache(), np.arange(400), targets, ignore, batch_size=400, shard=(0, 2),
                             **common).iterate())
    assert np.array_equal(shard.index, whole.index[:200]) and set(shard.index // 100) == {0, 1, 2, 3}


def test_balanced_pos_weight():
    targets = np.array([[1, 0], [0, 0], [0, 0], [0, 1]] * 50 + [[1, 0]] * 0, dtype=np.float32)
    targets[:, 1] = 0
    targets[0, 1] = 1                           # 1 positive in 200 → clipped
    w = balanced_pos_weight(targets, np.zeros_like(targets, bool))
    assert w[0].item() == 150 / 50 and w[1].item() == MAX_POS_WEIGHT


# --- oversampling: targets, cap, label counts ---------------------------------------------------

def synthetic_table(seed=0):
    """600 rows, 4 labels of very different frequency; the rare ones co-occur with the frequent one."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((600, 4), dtype=np.float32)
    targets[:, 0] = rng.random(600) < 0.5            # frequent: ~300
    targets[:60, 1] = 1                              # 60
    targets[60:72, 2] = 1                            # 12
    targets[72:75, 3] = 1                            # 3
    return targets, np.zeros_like(targets, dtype=bool)


def epoch_label_counts(rows, repeats, targets, epochs=60):
    counts = [targets[epoch_rows(rows, repeats, torch.Generator().manual_seed(e))].sum(0) for e in range(epochs)]
    return np.mean(counts, 0)


def test_oversampling_reaches_its_targets():
    targets, ignore = synthetic_table()
    repeats = repeat_factors(targets, ignore, target_per_class=120)          # no cap
    before, after = label_counts(targets, ignore, repeats)
    assert before.tolist() == targets.sum(0).tolist()
    assert (after >= 120 - 1e-9).all()                                      # every label reaches the target
    measured = epoch_label_counts(np.arange(600), repeats, targets)
    assert np.allclose(measured, after, rtol=0.03)                          # what epochs really show
    assert after[3] == 120 and repeats[72:75].tolist() == [40.0] * 3       # the rarest label: ×40


def test_oversampling_cap_holds():
    targets, ignore = synthetic_table()
    repeats = repeat_factors(targets, ignore, target_per_class=120, max_repeat=10)
    after = label_counts(targets, ignore, repeats)[1]
    assert repeats.max() == 10 and repeats.min() == 1
    assert after[3] == 30 and after[2] == 120 and after[1] == 120          # 3 × 10 stops short; 12 × 10 reaches
    uncapped = label_counts(targets, ignore, repeat_factors(targets, ignore, 120))[1]
    assert after[0] < uncapped[0]                                           # the co-occurring label grows less
    with pytest.raises(UserError, match="oversample_max_repeat"):
        repeat_factors(targets, ignore, 120, max_repeat=0.5)


def test_describe_oversampling_lists_the_rarest_labels():
    targets, ignore = synthetic_table()
    repeats = repeat_factors(targets, ignore, 120, max_repeat=10)
    text = describe_oversampling(["common", "mid", "rare", "rarest"], *label_counts(targets, ignore, repeats), repeats)
    first, second = text.splitlines()
    assert first.startswith(f"oversampling: 600 → {repeats.sum():.0f} train images per epoch")
    assert second.strip().startswith("per label, before → after: rarest 3→30, rare 12→120, mid 60→120")


# --- augmentation presets -----------------------------------------------------------------------

def test_every_preset_sets_every_field():
    fields = {f.name for f in dataclasses.fields(AugConfig)} - {"preset"}
    for name, values in AUG_PRESETS.items():
        assert set(values) == fields, name
        resolved = resolve_aug(AugConfig(preset=name))
        assert all(getattr(resolved, f) is not None for f in fields)
    # "light", the default, is what multitag did before presets: flip + crop 0.7-1, nothing else
    light = resolve_aug(AugConfig())
    assert (light.hflip, light.scale, light.rotate, light.color_jitter, light.trivial_augment) == (
        True, (0.7, 1.0), 0.0, 0.0, False)


def test_explicit_fields_override_the_preset():
    a = resolve_aug(AugConfig(preset="strong", scale=(1.0, 1.0), erasing=0.0))
    assert a.scale == (1.0, 1.0) and a.erasing == 0.0 and a.trivial_augment is True and a.hflip is True
    # a value equal to another preset's default still wins: "none" with hflip=true flips
    assert resolve_aug(AugConfig(preset="none", hflip=True)).hflip is True
    # recipe fields survive a preset chosen on the command line; null resets a field to the preset
    cfg = load_config("demo", ["aug.preset=strong"])          # demo.yaml sets hflip false, scale 0.85-1
    a = resolve_aug(cfg.aug)
    assert (a.hflip, a.scale, a.trivial_augment, a.erasing) == (False, (0.85, 1.0), True, 0.25)
    a = resolve_aug(load_config("demo", ["aug.preset=strong", "aug.hflip=null"]).aug)
    assert a.hflip is True
    with pytest.raises(UserError, match='did you mean "strong"'):
        resolve_aug(AugConfig(preset="strnog"))


def test_trivial_augment_is_reproducible_uint8_and_runs_every_op():
    x = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = trivial_augment(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, trivial_augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, trivial_augment(x, torch.Generator().manual_seed(2)))
    for name, largest, signed in TRIVIAL_OPS:
        for m in (largest, -largest if signed else largest):
            assert _trivial_op(x[0], name, m).shape == x[0].shape, name
    strong = BatchAugment(AugConfig(preset="strong"), (0.5,) * 3, (0.25,) * 3)
    assert "TrivialAugment" in strong.describe()
    y = strong(x, torch.Generator().manual_seed(3))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
