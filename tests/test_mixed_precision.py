"""Depthwise convs kept in fp32 under bf16 autocast: only those layers change precision, nothing else
changes (outputs outside autocast, state-dict keys, copies), and the runtime measures it as a candidate."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from multitag import runtime
from multitag.losses import MaskedBCE
from multitag.mixed_precision import has_depthwise, keep_depthwise_fp32
from multitag.models import build_model


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),   # depthwise
                         nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def output_dtypes(net: nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    """The dtype each conv of ``net`` outputs under CPU bf16 autocast."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in net if isinstance(m, nn.Conv2d)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    for h in hooks:
        h.remove()
    return seen


def test_only_depthwise_convs_run_in_fp32_under_autocast():
    x = torch.randn(2, 3, 8, 8)
    plain, kept = tiny_net(), tiny_net()
    assert keep_depthwise_fp32(kept) == 1 and keep_depthwise_fp32(kept) == 0        # idempotent
    assert output_dtypes(plain, x) == [torch.bfloat16] * 3
    assert output_dtypes(kept, x) == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert kept[3].weight.grad.dtype == torch.float32 and kept[3].weight.grad.abs().sum() > 0
    # outside autocast the forward is the original one; the parameters and their names are unchanged
    fresh, fresh_kept = tiny_net(), tiny_net()
    keep_depthwise_fp32(fresh_kept)
    assert torch.equal(fresh(x), fresh_kept(x))
    assert list(plain.state_dict()) == list(kept.state_dict())
    assert type(copy.deepcopy(kept)[3]) is type(kept[3])                      # EMA copies keep it


def test_timm_same_padding_depthwise_convs_are_found():
    model = build_model("efficientnet_lite0", 3, pretrained=False)
    assert has_depthwise(model) and not has_depthwise(build_model("simple_cnn", 3))
    assert keep_depthwise_fp32(model) == 16             # one per MBConv block of EfficientNet-Lite0


def test_the_runtime_measures_fp32_depthwise_only_for_models_that_have_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    measured = []

    def fake_time(model, loss_fn, x, y, rt, **kw):
        measured.append(rt.fp32_depthwise)
        return 0.05 if rt.fp32_depthwise else {"fp32": 0.3, "bf16": 0.2}[rt.precision]

    monkeypatch.setattr(runtime, "time_train_step", fake_time)
    args = (MaskedBCE(), torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 4)).float())
    rt = runtime.choose_runtime(tiny_net(), *args, threads=1, log=lambda *a: None)
    assert rt.fp32_depthwise and rt.precision == "bf16" and "fp32 depthwise" in rt.describe()
    assert json.loads((tmp_path / "precision.json").read_text()).popitem()[1]["fp32_depthwise"] is True
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: pytest.fail("measured twice"))
    assert runtime.choose_runtime(tiny_net(), *args, threads=1, log=lambda *a: None) == rt    # from the cache

    monkeypatch.setattr(runtime, "time_train_step", fake_time)
    measured.clear()
    no_depthwise = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert not runtime.choose_runtime(no_depthwise, *args, threads=1, log=lambda *a: None).fp32_depthwise
    assert measured and not any(measured)


def test_prepare_model_applies_it_and_a_real_step_runs():
    rt = runtime.Runtime(torch.device("cpu"), "bf16", True, 1, fp32_depthwise=True)
    net = rt.prepare_model(tiny_net())
    assert net[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert output_dtypes(net, torch.randn(2, 3, 8, 8))[1] == torch.float32
    seconds = runtime.time_train_step(tiny_net(), MaskedBCE(), torch.randn(4, 3, 8, 8),
                                      torch.randint(0, 2, (4, 4)).float(), rt)
    assert seconds > 0


def test_the_choice_is_kept_in_the_checkpoint_and_on_resume(digits_csv, tmp_path, monkeypatch, stop_after_checkpoint):
    from multitag import engine
    from multitag.api import train
    from multitag.checkpoint import MODEL_META, TRAIN_META

    chosen = runtime.Runtime(torch.device("cpu"), "bf16", True, 1, fp32_depthwise=True)
    monkeypatch.setattr(engine, "choose_runtime", lambda *a, **k: chosen)
    over = ["train.epochs=2", "train.batch_size=32", "data.image_size=32", "train.report=false"]
    undo = stop_after_checkpoint(1)
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=digits_csv, out=tmp_path / "run", overrides=over, log=lambda *a: None)
    assert json.loads((tmp_path / "run" / TRAIN_META).read_text())["runtime"]["fp32_depthwise"] is True
    undo()
    monkeypatch.setattr(engine, "choose_runtime", lambda *a, **k: pytest.fail("a resume measures nothing"))
    run = train(resume=tmp_path / "run", log=lambda *a: None)
    assert json.loads((run / MODEL_META).read_text())["runtime"] == chosen.describe()
