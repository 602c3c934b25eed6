"""Staged fine-tuning: stage LRs as configured, freezing, frozen BatchNorm, best across stages, resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

import multitag.engine as engine
from multitag.api import train
from multitag.config import StageConfig
from multitag.errors import UserError
from multitag.finetune import apply_freeze, frozen_batchnorm_to_eval, head_parameter_names, param_groups
from multitag.models import build_model

BASE = ["train.batch_size=16", "train.precision=fp32", "train.channels_last=false", "optim.name=adamw"]
STAGES = ("stages=[{name: head, epochs: 1, lr: 0.01, sched: onecycle, freeze: [backbone]},"
          " {name: all, epochs: 2, lr: 0.002, sched: cosine, backbone_lr_mult: 0.1},"
          " {name: polish, epochs: 1, lr: 0.0003, sched: none}]")


def test_head_and_freeze_patterns():
    model = build_model("simple_cnn", 5)
    assert head_parameter_names(model) == {"fc.weight", "fc.bias"}
    n = apply_freeze(model, ["backbone"])
    assert n == sum(1 for _ in model.parameters()) - 2
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    apply_freeze(model, ["features.0.*"])
    assert not model.features[0][0].weight.requires_grad and model.features[1][0].weight.requires_grad
    with pytest.raises(UserError, match='freeze pattern "layer9.*" matches no parameter'):
        apply_freeze(model, ["layer9.*"])


def test_frozen_batchnorm_stays_in_eval():
    model = build_model("simple_cnn", 5)
    apply_freeze(model, ["features.0.*"])
    model.train()
    frozen_batchnorm_to_eval(model)
    bn0, bn1 = model.features[0][1], model.features[1][1]
    assert not bn0.training and bn1.training
    before = bn0.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, bn0.running_mean)


def test_param_groups_discriminative_lr_and_no_decay_on_1d():
    model = build_model("simple_cnn", 5)
    groups = param_groups(model, StageConfig(lr=0.01, backbone_lr_mult=0.1), weight_decay=0.05)
    by = {(g["name"], g["weight_decay"]): g for g in groups}
    assert by[("head", 0.05)]["lr"] == 0.01 and by[("backbone", 0.05)]["lr"] == pytest.approx(0.001)
    assert all(p.ndim == 1 for p in by[("backbone", 0.0)]["params"])
    every = param_groups(model, StageConfig(lr=0.01), weight_decay=0.05, wd_bn_bias=True)     # airbench
    assert all(g["weight_decay"] == 0.05 for g in every)
    assert sum(p.numel() for g in every for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_staged_run_applies_each_stage_lr_and_keeps_best(digits_csv, tmp_path, monkeypatch):
    seen = []   # (stage index, head lr, backbone lr or None, trainable count) at the first batch of each epoch
    real = engine.train_one_epoch

    def spy(model, loader, loss_fn, optimizer, scheduler, per_batch, rt, cfg, epoch, **kwargs):
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
        peaks = {g["name"]: g.get("max_lr") for g in optimizer.param_groups}   # OneCycle's peak per group
        trainable = sum(p.requires_grad for p in model.parameters())
        seen.append((epoch, groups.get("head"), groups.get("backbone"), trainable, peaks))
        return real(model, loader, loss_fn, optimizer, scheduler, per_batch, rt, cfg, epoch, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    run = train("demo", data=digits_csv, out=tmp_path / "staged", overrides=BASE + [STAGES], log=lambda *a: None)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["head", "all", "all", "polish"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    n_all = sum(1 for _ in build_model("simple_cnn", 10).parameters())
    # stage 1: head only; OneCycle peaks at the stage's LR and starts at peak / 25 (torch's div_factor)
    assert seen[0][4] == {"head": 0.01}
    assert seen[0][1] == pytest.approx(0.01 / 25) and seen[0][2] is None and seen[0][3] == 2
    # stage 2: cosine warm-up from the stage's own LR, backbone at a tenth of the head
    assert seen[1][3] == n_all and seen[1][2] == pytest.approx(seen[1][1] * 0.1)
    assert seen[1][1] <= 0.002
    # stage 3 ("polish", no scheduler): exactly the configured LR for every batch, head and backbone
    assert seen[3][1] == pytest.approx(0.0003) and seen[3][2] == pytest.approx(0.0003)
    assert rows[3]["lr"] == pytest.approx(0.0003)
    meta = json.loads((run / "model.json").read_text())
    best = max(rows, key=lambda r: r["val_mAP"])
    assert meta["best_epoch"] == best["epoch"]


def test_head_stage_leaves_backbone_untouched(digits_csv, tmp_path):
    over = BASE + ["stages=[{name: head, epochs: 1, lr: 0.01, freeze: [backbone]}]"]
    run = train("demo", data=digits_csv, out=tmp_path / "head", overrides=over, log=lambda *a: None)
    torch.manual_seed(0)
    init = build_model("simple_cnn", 10).state_dict()   # the engine builds the model after seeding with 0 too
    trained = load_file(str(run / "checkpoint.safetensors"))
    assert torch.equal(trained["model.features.0.0.weight"], init["features.0.0.weight"])
    assert torch.equal(trained["model.features.0.1.running_mean"], init["features.0.1.running_mean"])
    assert not torch.equal(trained["model.fc.weight"], init["fc.weight"])


def test_resume_across_stage_boundary(digits_csv, tmp_path, monkeypatch):
    full = train("demo", data=digits_csv, out=tmp_path / "full", overrides=BASE + [STAGES], log=lambda *a: None)
    real_save = engine._save_checkpoint

    def die_after_epoch_2(run, model, optimizer, scheduler, state, rt, *ema):
        real_save(run, model, optimizer, scheduler, state, rt, *ema)
        if state.epoch == 2:             # inside stage "all", after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_save_checkpoint", die_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=digits_csv, out=tmp_path / "killed", overrides=BASE + [STAGES], log=lambda *a: None)
    monkeypatch.setattr(engine, "_save_checkpoint", real_save)
    resumed = train(resume=tmp_path / "killed", log=lambda *a: None)
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(resumed / "checkpoint.safetensors"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


@pytest.mark.parametrize("tta", [[], ["model.args.tta_flip=true"]], ids=["one view", "flip TTA"])
def test_cached_feature_head_stage_matches_full_model(digits_csv, tmp_path, tta):
    """Training the head on features computed once is the same model: the val mAP measured on
    features during training equals the full network's on images afterwards (with flip TTA too: the
    val features are the mean of each image's and its mirror's, which the linear head turns into the
    flip-averaged logits; the train features are each image's own, as its training forward sees it)."""
    over = BASE + tta + ["stages=[{name: probe, epochs: 3, lr: 0.01, freeze: [backbone], cache_features: true}]"]
    logs = []
    run = train("demo", data=digits_csv, out=tmp_path / "probe", overrides=over, log=logs.append)
    assert any("computed once" in line for line in logs)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((run / "model.json").read_text())
    assert meta["metrics"]["val"]["mAP"] == pytest.approx(max(r["val_mAP"] for r in rows), abs=1e-5)
    torch.manual_seed(0)
    init = build_model("simple_cnn", 10).state_dict()
    trained = load_file(str(run / "model.safetensors"))
    assert torch.equal(trained["features.2.0.weight"], init["features.2.0.weight"])
    assert not torch.equal(trained["fc.weight"], init["fc.weight"])


def test_cached_features_need_a_frozen_backbone(digits_csv, tmp_path):
    over = BASE + ["stages=[{name: bad, epochs: 1, cache_features: true}]"]
    with pytest.raises(UserError, match="cache_features needs a frozen backbone"):
        train("demo", data=digits_csv, out=tmp_path / "bad", overrides=over, log=lambda *a: None)


def test_head_inputs_of_test_time_views():
    """The cached val features of airbench's own tta_flip give its flip-averaged logits through the head, and
    its train features are each image's own; the unequally weighted tta_translate views cannot be cached,
    which is said rather than averaged wrongly."""
    from multitag.finetune import head_inputs
    from multitag.runtime import Runtime

    rt, x = Runtime(torch.device("cpu"), "fp32", False), torch.randn(3, 3, 32, 32)
    net = build_model("airbench", 4, tta_flip=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(net.fc(head_inputs(net, [x], rt)) * net.logit_scale, net(x))
        own = head_inputs(net, [x], rt, own_view=True)
        net.tta_flip = False
        torch.testing.assert_close(own, head_inputs(net, [x], rt))
    net.tta_translate = True
    with pytest.raises(UserError, match="3 test-time views"):
        head_inputs(net, [x], rt)


def test_head_inputs_keep_their_shape():
    """A linear head applied per token gets (B, T, F): cached as such, not flattened."""
    from torch import nn

    from multitag.finetune import head_inputs
    from multitag.runtime import Runtime

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):                                   # (B, 3, H, W) → (B, 4, 3) tokens → (B, 4, 2)
            return self.fc(x.flatten(2)[..., :4].transpose(1, 2))

    x = torch.randn(5, 3, 8, 8)
    assert head_inputs(Tokens(), [x], Runtime(torch.device("cpu"), "fp32", False)).shape == (5, 4, 3)
