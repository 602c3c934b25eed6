"""airbench model family, patch whitening, weight EMA, lookahead, flip/translate TTA, whole-pixel translate,
alternating flips, the triangle schedule and the cifar10_speed recipe."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from model_checks import assert_training_sees_one_view
from multitag.api import evaluate, train
from multitag.checkpoint import MODEL_WEIGHTS, TRAIN_META
from multitag.config import AugConfig
from multitag.data.loader import BatchLoader
from multitag.data.transforms import BatchAugment
from multitag.ema import ModelEMA
from multitag.engine import build_scheduler
from multitag.config import Config, StageConfig
from multitag.lookahead import Lookahead
from multitag.models import build_model, count_parameters
from multitag.models.airbench import Whiten
from multitag.predict import load


def test_size_shapes_and_features_head_split():
    torch.manual_seed(0)
    model = build_model("airbench", 10).eval()
    assert 1.9e6 < count_parameters(model) < 2.05e6            # airbench94: ≈ 2.0 M
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 256, 3, 3)                          # 32 → 31 (whiten) → 15 → 7 → 3
    assert torch.allclose(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (3, 256)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)     # any size ≥ 16 px


def test_whitening_init_decorrelates_patches():
    g = torch.Generator().manual_seed(0)
    # Correlated synthetic images: mixed colour channels, smoothed so neighbouring pixels agree.
    x = torch.randn(500, 3, 12, 12, generator=g)
    x = torch.einsum("ij,bjhw->bihw", torch.tensor([[1.0, 0.8, 0.5], [0.0, 0.6, 0.3], [0.0, 0.0, 0.2]]), x)
    x = (x + x.roll(1, 2) + x.roll(1, 3)) / 3
    w = Whiten(eps=1e-6)
    w.init_from_data(x)
    with torch.no_grad():
        out = nn.functional.conv2d(x, w.weight)                   # (N, 24, 11, 11), no bias
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)        # the + half; the - half mirrors it
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12), atol=1e-3)
    assert torch.equal(w.weight[12:], -w.weight[:12])


def test_ema_update_math_and_restore():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    nn.init.constant_(model[0].weight, 1.0)
    ema = ModelEMA(model, decay=0.5)
    nn.init.constant_(model[0].weight, 3.0)
    model[1].num_batches_tracked.fill_(7)
    d = ema.current_decay()
    assert d == pytest.approx(0.1)                                # warm-up (1 + 0) / (10 + 0) < 0.5
    ema.update()
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), d * 1.0 + (1 - d) * 3.0))
    assert ema.module[1].num_batches_tracked.item() == 7          # integer buffers are copied
    for _ in range(20):
        ema.update()
    assert ema.current_decay() == 0.5                             # capped at the configured decay
    other = ModelEMA(model, decay=0.5)
    other.restore(ema.tensors(), ema.updates)
    assert torch.equal(other.module[0].weight, ema.module[0].weight) and other.updates == 21
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_flip_tta_averages_the_image_and_its_mirror_in_eval_only():
    torch.manual_seed(0)
    plain = build_model("airbench", 5)
    tta = build_model("airbench", 5, tta_flip=True)
    tta.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), tta.eval()
    with torch.no_grad():
        assert torch.allclose(tta(x), (plain(x) + plain(x.flip(3))) / 2, atol=1e-5)
    plain.train(), tta.train()
    torch.manual_seed(1)
    a = plain(x)
    torch.manual_seed(1)
    assert torch.allclose(tta(x), a)


def test_translate_alone_shifts_by_whole_pixels():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    aug = BatchAugment(AugConfig(preset="none", hflip=True, translate=0.25), mean=(0, 0, 0), std=(1, 1, 1))
    out = aug(x, torch.Generator().manual_seed(0))                 # (16, 3, 8, 8) in [0, 1]
    src = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(16):
        hits = [(dy, dx, f) for f in (False, True) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], (src[i].flip(2) if f else src[i])[:, dy:dy + 8, dx:dx + 8])]
        assert hits, f"image {i} is not a whole-pixel crop of the padded input"
        shifts.add(hits[0][:2])
    assert len(shifts) > 3                                        # the shifts vary per image


FAST = ["train.batch_size=16", "train.eval_batch_size=32", "train.precision=fp32", "train.channels_last=false",
        "train.ema=0.9", "train.track_test=true", "optim.lr=0.2"]


def test_recipe_runs_one_epoch_with_ema_tta_and_test_tracking(tiny_cifar, tmp_path):
    run = train("cifar10_speed", data=str(tiny_cifar), out=tmp_path / "run", overrides=FAST + ["train.epochs=1"],
                log=lambda *a: None)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val_accuracy", "test_accuracy", "test_seconds", "seconds"} <= row.keys()
    assert (run / "split.csv").read_text().count(",val") == 9     # 10 % of the 90 train images
    model = load(run, backend="torch")
    assert model.network.tta_flip and len(model.predict([str(next((tiny_cifar / "test").rglob("*.png")))])) == 1
    assert evaluate(run, split="test", log=lambda *a: None)["accuracy"] == pytest.approx(row["test_accuracy"])


def test_resume_with_ema_lookahead_and_bias_freeze_reproduces_an_unbroken_run(tiny_cifar, tmp_path,
                                                                               stop_after_checkpoint):
    over = FAST + ["train.epochs=2", "train.lookahead_from_epoch=0", "train.lookahead_every=2",
                   "model.args.whiten_bias_epochs=1"]
    full = train("cifar10_speed", data=str(tiny_cifar), out=tmp_path / "full", overrides=over, log=lambda *a: None)
    undo = stop_after_checkpoint(1)
    with pytest.raises(KeyboardInterrupt):
        train("cifar10_speed", data=str(tiny_cifar), out=tmp_path / "killed", overrides=over, log=lambda *a: None)
    assert json.loads((tmp_path / "killed" / TRAIN_META).read_text())["ema_updates"] > 0
    # The whitening bias trained in epoch 1 (it starts at 0) and stayed frozen through epoch 2.
    after_one = load_file(str(tmp_path / "killed" / "checkpoint.safetensors"))["model.whiten.bias"]
    assert after_one.abs().max() > 0
    assert torch.equal(load_file(str(full / "checkpoint.safetensors"))["model.whiten.bias"], after_one)
    undo()
    resumed = train(resume=tmp_path / "killed", log=lambda *a: None)
    for name in ("checkpoint.safetensors", MODEL_WEIGHTS):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) == (name != MODEL_WEIGHTS)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_shift_only_bn_steps_bias_scaler_times_the_lr():
    from multitag.models.airbench import ShiftOnlyBN

    bn = ShiftOnlyBN(4, bias_scaler=64.0)
    assert bn.weight is None and [n for n, _ in bn.named_parameters()] == ["shift"]
    x = torch.randn(8, 4, 3, 3)
    target = torch.randn(8, 4, 3, 3)
    shift = lambda: bn.shift.detach() * bn.root                       # the shift the layer adds  # noqa: E731
    before = shift()
    loss = ((bn(x) - target) ** 2).mean()
    loss.backward()
    # the gradient with respect to the added shift itself: d loss / d (x̂ + shift) summed per channel
    grad = (2 * (bn(x).detach() - target) / target.numel()).sum((0, 2, 3))
    torch.optim.SGD([bn.shift], lr=0.01).step()
    assert torch.allclose(shift() - before, -0.01 * 64.0 * grad, atol=1e-6)


def test_translate_tta_weighs_the_unshifted_and_two_one_pixel_shifted_views():
    torch.manual_seed(0)
    flip = build_model("airbench", 5, tta_flip=True).eval()
    both = build_model("airbench", 5, tta_flip=True, tta_translate=True).eval()
    both.load_state_dict(flip.state_dict())
    x = torch.randn(3, 3, 32, 32)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():
        want = flip(x) / 2 + flip(padded[..., :32, :32]) / 4 + flip(padded[..., 2:, 2:]) / 4
        assert torch.allclose(both(x), want, atol=1e-5)
        assert not torch.allclose(both(x), flip(x), atol=1e-3)
    assert_training_sees_one_view(flip, both, x)


def test_lookahead_pulls_back_every_k_steps_with_a_rising_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)
    la = Lookahead(model, base=0.9, every=2, from_epoch=1, steps_per_epoch=4, epochs=2)
    la.begin_epoch(0)                                             # before from_epoch: off
    model.weight.data.fill_(1.0)
    la.after_step(), la.after_step()
    assert model.weight.item() == 1.0
    la.end_epoch()
    assert model.weight.item() == 1.0
    la.begin_epoch(1)                                             # average restarts at the live weights (1.0)
    model.weight.data.fill_(3.0)
    la.after_step()                                               # global step 5: not a multiple of 2
    assert model.weight.item() == 3.0
    la.after_step()                                               # step 6: ρ = 0.9² · (6/8)³
    rho = 0.81 * 0.75 ** 3
    assert la.decay(6) == pytest.approx(rho) and la.decay(8) == pytest.approx(0.81)
    assert model.weight.item() == pytest.approx(rho * 1.0 + (1 - rho) * 3.0)
    pulled = model.weight.item()
    model.weight.data.fill_(10.0)
    la.after_step()                                               # step 7: no update; the epoch end folds it in
    assert model.weight.item() == 10.0
    la.end_epoch()
    rho = 0.81 * (7 / 8) ** 3
    assert model.weight.item() == pytest.approx(rho * pulled + (1 - rho) * 10.0)
    la.begin_epoch(1)
    model.weight.data.fill_(5.0)
    la.after_step(), la.after_step()                              # steps 5, 6: the update at 6 ends on a multiple
    at_six = model.weight.item()
    la.end_epoch()                                                # nothing since the last update: no extra one
    assert model.weight.item() == at_six
    with pytest.raises(Exception, match="train.lookahead must be"):
        Lookahead(model, base=1.5, every=5, from_epoch=0, steps_per_epoch=4, epochs=1)


def test_whiten_bias_freezes_from_its_epoch_and_stage_freezes_win():
    model = build_model("airbench", 3, whiten_bias_epochs=2)
    assert [model.set_epoch(e) for e in range(4)] == [False, False, True, False]   # True: what trains changed
    assert not model.whiten.bias.requires_grad
    never = build_model("airbench", 3)                            # 0: always trained
    assert not any(never.set_epoch(e) for e in range(5)) and never.whiten.bias.requires_grad
    staged = build_model("airbench", 3, whiten_bias_epochs=2)
    staged.whiten.bias.requires_grad_(False)                      # frozen by a stage: set_epoch never unfreezes
    assert not staged.set_epoch(0) and not staged.whiten.bias.requires_grad


def test_triangle_schedule_is_linear_with_the_momentum_left_alone():
    cfg = Config()
    cfg.sched.pct_start, cfg.sched.start_factor, cfg.sched.end_factor = 0.25, 0.2, 0.1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0, momentum=0.85)
    sched, per_batch = build_scheduler(cfg, opt, StageConfig(name="s", epochs=2, lr=2.0, sched="triangle"), 10)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["momentum"] == 0.85
        opt.step(), sched.step()
    assert per_batch and lrs[0] == pytest.approx(0.4) and lrs[5] == pytest.approx(2.0)
    assert lrs[20] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.4 + 1.6 * 3 / 5)
    assert lrs[12] == pytest.approx(2.0 - 1.8 * 7 / 15)


def test_alternating_flip_mirrors_each_image_on_every_other_epoch():
    class Tagged:        # image i is a constant ramp so its mirror is recognisable, tagged by its value
        def get_batch(self, index):
            ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(len(index), 3, 8, 8)
            return (ramp + torch.as_tensor(index, dtype=torch.uint8).view(-1, 1, 1, 1) * 8).contiguous()

    aug = BatchAugment(AugConfig(preset="none", hflip=True, alternate_flip=True), mean=(0, 0, 0), std=(1, 1, 1))
    n = 24
    loader = BatchLoader(Tagged(), np.arange(n), np.zeros((n, 2)), np.zeros((n, 2), bool), batch_size=6,
                         mean=(0, 0, 0), std=(1, 1, 1), augment=aug, shuffle=True)
    flipped = []
    for epoch in range(4):
        seen = {}
        for b in loader.iterate(epoch, seed=3):
            for i, img in zip(b.index, b.images):
                seen[int(i)] = bool(img[0, 0, 0] > img[0, 0, -1])     # a mirrored ramp decreases
        flipped.append([seen[i] for i in range(n)])
    assert all(a != b for a, b in zip(flipped[0], flipped[1]))      # every image switches each epoch
    assert flipped[0] == flipped[2] and flipped[1] == flipped[3]
    assert 0 < sum(flipped[0]) < n                                  # which epochs: a coin per image
    assert "hflip on alternate epochs" in aug.describe()
    with pytest.raises(Exception, match="aug.hflip is off"):
        BatchAugment(AugConfig(preset="none", hflip=False, alternate_flip=True), mean=(0, 0, 0), std=(1, 1, 1))

