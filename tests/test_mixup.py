"""MixUp / CutMix (data/mixing.py): the λ and box arithmetic, soft targets and ignore masks, the losses
on soft targets, determinism across processes and micro-batches, the config checks, and training."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multitag.api import lr_find, train
from multitag.checkpoint import MODEL_META
from multitag.config import AUG_PRESETS, AugConfig, list_recipes, load_config
from multitag.config_checks import check_config
from multitag.data.loader import BatchLoader, shard_bounds
from multitag.data.mixing import BatchMix, MixDraw, cutmix_box, mix_labels, partners
from multitag.engine import accumulate_gradients
from multitag.errors import UserError
from multitag.losses import AsymmetricLoss, FocalLoss, MaskedBCE, SmoothedCE, loss_count
from multitag.runtime import Runtime

MIX = AugConfig(mixup=0.4, cutmix=1.0)


def test_cutmix_box_and_its_lambda_by_hand():
    # λ 0.75 on 32×32: sides int(32·√0.25) = 16, centred on (16, 16): rows/cols 8..24, area 256 of 1024.
    assert cutmix_box(0.75, 32, 32, 16, 16) == MixDraw(0.75, (8, 24, 8, 24))
    # Centred near a corner, the box is clipped to rows 0..10 and cols 22..32: 100 px pasted, λ = 1 - 100/1024.
    assert cutmix_box(0.75, 32, 32, 2, 30) == MixDraw(1 - 100 / 1024, (0, 10, 22, 32))
    # Odd sides: λ 0.5 on 10×12 gives int(10·0.7071) = 7 rows (5-3 .. 5+4) × int(12·0.7071) = 8 cols (6-4 .. 6+4).
    assert cutmix_box(0.5, 10, 12, 5, 6) == MixDraw(1 - 56 / 120, (2, 9, 2, 10))


def test_partners_are_neighbours_within_each_part():
    assert partners([(0, 6)]).tolist() == [1, 0, 3, 2, 5, 4]
    assert partners([(0, 4), (4, 8)]).tolist() == partners([(0, 8)]).tolist()     # even parts: the same pairs
    assert partners([(0, 3), (3, 6)]).tolist() == [1, 0, 2, 4, 3, 5]             # odd parts: last one alone


def test_images_and_labels_are_mixed_with_the_partner():
    x = torch.arange(4 * 3 * 4 * 4, dtype=torch.float32).view(4, 3, 4, 4)
    partner = partners([(0, 4)])
    mixed = BatchMix.images(x, MixDraw(0.7, None), partner)
    torch.testing.assert_close(mixed[2], 0.7 * x[2] + 0.3 * x[3])
    cut = BatchMix.images(x, MixDraw(0.75, (1, 3, 0, 2)), partner)
    assert torch.equal(cut[0, :, 1:3, 0:2], x[1, :, 1:3, 0:2])                   # the box: the partner's
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[1:3, 0:2] = False
    assert torch.equal(cut[:, :, outside], x[:, :, outside])                      # the rest: its own
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    ignore = torch.tensor([[False, True], [False, False], [False, False], [True, False]])
    y, ign = mix_labels(targets, ignore, 0.7, partner)
    torch.testing.assert_close(y, torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.7, 0.7], [0.3, 0.3]]))
    # ignored in either image of a pair → ignored in both mixes
    assert ign.tolist() == [[False, True], [False, True], [True, False], [True, False]]


def test_draws_are_seeded_and_take_one_number_per_batch():
    mix = BatchMix(MIX)
    a = [mix.draw(torch.Generator().manual_seed(3), 32, 32) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(3)
    draws = [mix.draw(g, 32, 32) for _ in range(200)]
    reference = torch.Generator().manual_seed(3)
    torch.randint(2**62, (200,), generator=reference)
    assert torch.rand(1, generator=g) == torch.rand(1, generator=reference)      # the stream stayed in step
    assert {d.box is None for d in draws} == {True, False}                        # both kinds, switch 0.5
    assert all(0 < d.lam < 1 for d in draws)
    never = BatchMix(AugConfig(mixup=0.4, mix_prob=0.0))
    assert all(never.draw(g, 32, 32) is None for _ in range(20))


def test_mixing_is_off_in_every_preset_and_recipe():
    assert all(BatchMix.of(AugConfig(preset=name)) is None for name in AUG_PRESETS)
    assert all(BatchMix.of(load_config(name).aug) is None for name in list_recipes())


class _Cache:
    """Images whose pixels tell the row: row r is all r (uint8), 4×4."""
    def get_batch(self, index):
        return torch.as_tensor(np.asarray(index), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def _loader(shard, mix=BatchMix(MIX), n=24):
    rng = np.random.default_rng(0)
    targets = (rng.random((n, 5)) < 0.4).astype(np.float32)
    ignore = rng.random((n, 5)) < 0.2
    return BatchLoader(_Cache(), np.arange(n), targets, ignore, batch_size=8, mean=(0,) * 3, std=(1,) * 3,
                       shuffle=True, drop_last=True, shard=shard, mix=mix,
                       augment=lambda x, g, part=None, flip=None: x.float() / 255)


def test_process_shards_make_up_the_one_process_mixed_batch():
    """Mixed images, soft targets and ignore masks of 2 or 4 processes' parts are the 1-process batch's."""
    single = list(_loader((0, 1)).iterate(epoch=2, seed=1))
    assert any(not torch.equal(b.targets, b.targets.round()) for b in single)     # some batches were mixed
    for world in (2, 4):
        ranks = [list(_loader((r, world)).iterate(epoch=2, seed=1)) for r in range(world)]
        for k, batch in enumerate(single):
            for field in ("images", "targets", "ignore"):
                assert torch.equal(torch.cat([getattr(r[k], field) for r in ranks]), getattr(batch, field))
            for r in ranks:
                whole_t, whole_i = r[k].whole_labels()
                assert torch.equal(whole_t, batch.targets) and torch.equal(whole_i, batch.ignore)


def test_without_mixing_the_batches_are_the_augmented_ones():
    plain = list(_loader((0, 1), mix=None).iterate(epoch=2, seed=1))
    assert all(torch.equal(b.targets, _loader((0, 1), mix=None).targets[torch.from_numpy(b.index)]) for b in plain)
    assert all(torch.equal(b.images, b.images[:, :1].expand_as(b.images)) for b in plain)    # unmixed rows


def test_accumulated_micro_batches_give_the_batch_gradient():
    """Two micro-batches of a mixed batch (unevenly ignored pairs) sum to the one-step gradient."""
    batch = next(b for b in _loader((0, 1)).iterate(epoch=2, seed=1)
                 if not torch.equal(b.targets, b.targets.round()) and b.ignore[:4].sum() != b.ignore[4:].sum())
    rt = Runtime(torch.device("cpu"), "fp32", False)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))

    whole = model()
    MaskedBCE()(whole(batch.images), batch.targets, batch.ignore).backward()     # the mixed batch's gradient
    for steps in (1, 2):
        net = model()
        accumulate_gradients(net, None, MaskedBCE(), batch, rt, steps, (0, 0))
        for a, b in zip(net.parameters(), whole.parameters()):
            torch.testing.assert_close(a.grad, b.grad)


def test_process_losses_weighted_by_their_counts_give_the_mixed_batch_loss():
    """DDP's weighting (engine.accumulate_gradients): each process's mixed loss × its count / the whole
    batch's count (of the mixed ignore mask, which every process knows) sums to the 1-process loss."""
    loss, model = MaskedBCE(), torch.nn.Identity()
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    single = list(_loader((0, 1)).iterate(epoch=2, seed=1))
    ranks = [list(_loader((r, 2)).iterate(epoch=2, seed=1)) for r in range(2)]
    for k, batch in enumerate(single):
        parts = [(r[k], logits[lo:lo + len(r[k].index)]) for r, lo in zip(ranks, (0, 4))]
        total = sum(loss_count(model, loss, b.targets, b.ignore) / loss_count(model, loss, *b.whole_labels())
                    * loss(x, b.targets, b.ignore) for b, x in parts)
        torch.testing.assert_close(total, loss(logits, batch.targets, batch.ignore))


def test_sigmoid_losses_of_soft_targets_are_the_mixed_losses():
    """Every sigmoid loss is linear in y: L(λ·y_a + (1-λ)·y_b) = λ·L(y_a) + (1-λ)·L(y_b), Zhang et al.'s mix."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 3
    y_a, y_b = (torch.rand(6, 4, generator=g) < 0.5).float(), (torch.rand(6, 4, generator=g) < 0.5).float()
    ignore = torch.rand(6, 4, generator=g) < 0.2
    for loss in (MaskedBCE(torch.tensor([1.0, 3.0, 1.0, 7.0])), FocalLoss(2.0, 0.25), AsymmetricLoss(4.0, 1.0, 0.05)):
        mixed = loss(logits, 0.3 * y_a + 0.7 * y_b, ignore)
        torch.testing.assert_close(mixed, 0.3 * loss(logits, y_a, ignore) + 0.7 * loss(logits, y_b, ignore))


def test_soft_cross_entropy_smooths_as_timm_mixes():
    from timm.data.mixup import mixup_target

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 5, generator=g), torch.randint(5, (8,), generator=g)
    one_hot = F.one_hot(labels, 5).float()
    mixed = mix_labels(one_hot, torch.zeros(8, 5, dtype=torch.bool), 0.6, torch.arange(8).flip(0))[0]
    timm_target = mixup_target(labels, 5, lam=0.6, smoothing=0.1)           # partner = the batch reversed
    expected = -(timm_target * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(SmoothedCE(0.1, soft_targets=True)(logits, mixed, None), expected)
    torch.testing.assert_close(SmoothedCE(0.1, soft_targets=True)(logits, one_hot, None),
                               SmoothedCE(0.1)(logits, one_hot, None))


@pytest.mark.parametrize("sets, message", [
    (["aug.mixup=-1"], "aug.mixup must be 0 \\(off\\) or a Beta α"),
    (["aug.cutmix=1", "aug.mix_prob=1.5"], "aug.mix_prob must be in \\[0, 1\\]"),
    (["aug.mix_prob=0.5"], "aug.mix_prob applies only when aug.mixup or aug.cutmix is on"),
    (["aug.mixup=0.2", "aug.mix_switch_prob=0.3"], "applies only when both aug.mixup and aug.cutmix are on"),
    (["aug.cutmix=1", "train.batch_size=33"], "train.batch_size=33 must be a multiple of 2 × 1 process"),
    (["model.name=cnn_rnn", "aug.mixup=0.2"], "do not apply to cnn_rnn"),
])
def test_mixing_settings_are_checked(sets, message):
    with pytest.raises(UserError, match=message):
        check_config(load_config("demo", sets))


def test_each_process_needs_an_even_share(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="multiple of 2 × 2 process.*use e.g. 36"):
        check_config(load_config("demo", ["aug.mixup=0.2", "train.batch_size=34", "train.accumulate=3"]))
    assert shard_bounds(36, 1, 2) == (18, 36)       # 36 = lcm(2·2, 2·3): even shares of 3 micro-batches each


def test_training_with_mixup_and_cutmix(digits_csv, tmp_path):
    logs = []
    run = train("demo", data=str(digits_csv), out=tmp_path / "run", log=logs.append,
                overrides=["train.epochs=2", "train.batch_size=32", "data.image_size=32", "train.precision=fp32",
                           "train.report=false", "aug.mixup=0.2", "aug.cutmix=1.0"])
    assert "mixing: MixUp α 0.2 + CutMix α 1 on 100% of the batches (CutMix for 50% of them)" in "\n".join(logs)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite([r["train_loss"], r["val_loss"], r["val_mAP"]]).all() for r in rows)
    meta = json.loads((run / MODEL_META).read_text())
    assert meta["recipe"]["aug"]["mixup"] == 0.2 and meta["recipe"]["aug"]["cutmix"] == 1.0


def test_single_label_training_with_mixup_and_label_smoothing(tiny_cifar, tmp_path):
    run = train("simple_cnn", data=str(tiny_cifar), out=tmp_path / "run", log=lambda *a: None,
                overrides=["train.epochs=1", "train.batch_size=16", "train.precision=fp32", "train.report=false",
                           "aug.mixup=0.2", "train.label_smoothing=0.1"])
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite([row["train_loss"], row["val_loss"]]).all()


def test_lr_find_mixes_like_training(digits_csv, tmp_path, monkeypatch):
    calls = []
    real = BatchMix.images
    monkeypatch.setattr(BatchMix, "images", staticmethod(lambda *a: calls.append(1) or real(*a)))
    lr_find("demo", data=str(digits_csv), out=tmp_path / "lr", steps=6, start=1e-4, end=1e-2,
            overrides=["train.batch_size=32", "train.precision=fp32", "aug.mixup=0.2"], log=lambda *a: None)
    assert calls


def test_the_mixing_line_names_the_stages_it_does_not_reach(digits_csv, tmp_path):
    """A cache_features stage trains its head on features computed once from unmixed images: said up front."""
    logs = []
    train("demo", data=str(digits_csv), out=tmp_path / "run", log=logs.append,
          overrides=["train.batch_size=16", "train.precision=fp32", "train.report=false", "aug.mixup=0.2",
                     "stages=[{name: probe, epochs: 1, lr: 0.01, freeze: [backbone], cache_features: true},"
                     " {name: all, epochs: 1, lr: 0.001}]"])
    (line,) = [line for line in logs if line.startswith("mixing: ")]
    assert line.endswith("(not in stage probe: cached features are not mixed)")
