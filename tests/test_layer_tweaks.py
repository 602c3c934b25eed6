"""Layer tweaks: depthwise convs in fp32 under bf16 autocast, BatchNorm at widths not ÷16 on an NCHW
copy. Only the selected layers change, nothing else does (outputs outside autocast, state-dict keys,
copies), and the runtime measures them as candidates and keeps the choice across a resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from multitag import runtime
from multitag.layer_tweaks import apply_tweaks, available_tweaks, tweaks_for
from multitag.losses import MaskedBCE
from multitag.models import build_model

CL = torch.channels_last


def tiny_net(width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def seen_by(net: nn.Module, kind: type, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """The outputs of ``net``'s ``kind`` layers in one training forward + backward."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in net if isinstance(m, kind)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        net(x).float().sum().backward()
    for h in hooks:
        h.remove()
    return seen


def test_depthwise_convs_alone_run_in_fp32_under_autocast():
    x = torch.randn(2, 3, 8, 8)
    plain, kept = tiny_net(), tiny_net()
    assert apply_tweaks(kept, ("fp32_depthwise",)) == 1 and apply_tweaks(kept, ("fp32_depthwise",)) == 0
    assert [o.dtype for o in seen_by(plain, nn.Conv2d, x, True)] == [torch.bfloat16] * 3
    assert [o.dtype for o in seen_by(kept, nn.Conv2d, x, True)] == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert kept[3].weight.grad.dtype == torch.float32 and kept[3].weight.grad.abs().sum() > 0
    # outside autocast the forward is the original one; the parameters and their names are unchanged
    fresh, fresh_kept = tiny_net(), tiny_net()
    apply_tweaks(fresh_kept, ("fp32_depthwise",))
    assert torch.equal(fresh(x), fresh_kept(x))
    assert list(plain.state_dict()) == list(kept.state_dict())
    assert type(copy.deepcopy(kept)[3]) is type(kept[3])                      # EMA copies keep it


def test_odd_width_batchnorm_runs_on_an_nchw_copy_and_gives_the_same_values(monkeypatch):
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CL)
    plain, kept = tiny_net(8).to(memory_format=CL), tiny_net(8).to(memory_format=CL)
    assert apply_tweaks(kept, ("nchw_odd_batchnorm",)) == 2
    real, formats = torch.nn.functional.batch_norm, []
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda t, *a, **k: formats.append(t.is_contiguous(memory_format=CL)) or real(t, *a, **k))
    a = seen_by(plain, nn.BatchNorm2d, x, False)
    assert formats == [True, True]
    b = seen_by(kept, nn.BatchNorm2d, x, False)
    assert formats[2:] == [False, False]                                     # the kernel saw NCHW
    assert all(o.is_contiguous(memory_format=CL) for o in b)                   # the model stays channels_last
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    for p, q in zip(plain.parameters(), kept.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(plain[1].running_var, kept[1].running_var)
    assert available_tweaks(tiny_net(16)) == ("fp32_depthwise",)              # 16 wide: BatchNorm left alone


def test_which_models_have_which_tweaks():
    assert available_tweaks(build_model("efficientnet_lite0", 3, pretrained=False)) == \
        ("fp32_depthwise", "nchw_odd_batchnorm")                                # 24 and 40 wide stages
    assert available_tweaks(build_model("inception_resnet_v1_small", 3)) == ("nchw_odd_batchnorm",)
    assert available_tweaks(build_model("advanced_cnn", 3)) == () == available_tweaks(build_model("simple_cnn", 3))
    both = ("fp32_depthwise", "nchw_odd_batchnorm")
    assert tweaks_for(both, "fp32", False) == () and tweaks_for(both, "fp32", True) == ("nchw_odd_batchnorm",)
    assert tweaks_for(both, "bf16", True) == both


def test_candidates_add_a_tweaked_variant_where_tweaks_apply():
    both = ("fp32_depthwise", "nchw_odd_batchnorm")
    cands = runtime.candidates(torch.device("cpu"), threads=1, tweaks=both)
    assert cands == [("fp32", False, 1, ()), ("fp32", True, 1, ()), ("fp32", True, 1, ("nchw_odd_batchnorm",)),
                     ("bf16", True, 1, ()), ("bf16", True, 1, both)]
    assert len(runtime.candidates(torch.device("cpu"), threads=1)) == 3


def test_the_runtime_measures_tweaks_only_for_models_that_have_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    measured = []

    def fake_time(model, loss_fn, x, y, rt, **kw):
        measured.append(rt.layer_tweaks)
        return {"fp32": 0.3, "bf16": 0.2}[rt.precision] / (1 + len(rt.layer_tweaks))

    monkeypatch.setattr(runtime, "time_train_step", fake_time)
    args = (MaskedBCE(), torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 4)).float())
    rt = runtime.choose_runtime(tiny_net(), *args, threads=1, log=lambda *a: None)
    assert rt.precision == "bf16" and rt.layer_tweaks == ("fp32_depthwise", "nchw_odd_batchnorm")
    assert "fp32 depthwise" in rt.describe()
    saved = json.loads((tmp_path / "precision.json").read_text()).popitem()[1]
    assert saved["layer_tweaks"] == ["fp32_depthwise", "nchw_odd_batchnorm"]
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: pytest.fail("measured twice"))
    assert runtime.choose_runtime(tiny_net(), *args, threads=1, log=lambda *a: None) == rt    # from the cache

    monkeypatch.setattr(runtime, "time_train_step", fake_time)
    measured.clear()
    plain = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert runtime.choose_runtime(plain, *args, threads=1, log=lambda *a: None).layer_tweaks == ()
    assert measured and not any(measured)


def test_prepare_model_applies_them_and_a_real_step_runs():
    rt = runtime.Runtime(torch.device("cpu"), "bf16", True, 1, ("fp32_depthwise", "nchw_odd_batchnorm"))
    net = rt.prepare_model(tiny_net())
    assert net[3].weight.is_contiguous(memory_format=CL)
    assert [o.dtype for o in seen_by(net, nn.Conv2d, torch.randn(2, 3, 8, 8).contiguous(memory_format=CL),
                                     True)][1] == torch.float32
    assert runtime.time_train_step(tiny_net(), MaskedBCE(), torch.randn(4, 3, 8, 8),
                                   torch.randint(0, 2, (4, 4)).float(), rt) > 0


def test_the_choice_is_kept_in_the_checkpoint_and_on_resume(digits_csv, tmp_path, monkeypatch, stop_after_checkpoint):
    from multitag import engine
    from multitag.api import train
    from multitag.checkpoint import MODEL_META, TRAIN_META

    chosen = runtime.Runtime(torch.device("cpu"), "bf16", True, 1, ("nchw_odd_batchnorm",))
    monkeypatch.setattr(engine, "choose_runtime", lambda *a, **k: chosen)
    over = ["train.epochs=2", "train.batch_size=32", "data.image_size=32", "train.report=false"]
    undo = stop_after_checkpoint(1)
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=digits_csv, out=tmp_path / "run", overrides=over, log=lambda *a: None)
    assert json.loads((tmp_path / "run" / TRAIN_META).read_text())["runtime"]["layer_tweaks"] == ["nchw_odd_batchnorm"]
    undo()
    monkeypatch.setattr(engine, "choose_runtime", lambda *a, **k: pytest.fail("a resume measures nothing"))
    run = train(resume=tmp_path / "run", log=lambda *a: None)
    assert json.loads((run / MODEL_META).read_text())["runtime"] == chosen.describe()


def test_tweaks_act_only_where_a_backward_follows(monkeypatch):
    """Scoring (no_grad) and frozen layers run as they were: the tweaks only pay off in the backward."""
    net = tiny_net().to(memory_format=CL)
    apply_tweaks(net, ("fp32_depthwise", "nchw_odd_batchnorm"))
    real, formats = torch.nn.functional.batch_norm, []
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda t, *a, **k: formats.append(t.is_contiguous(memory_format=CL)) or real(t, *a, **k))
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=CL)
    dtypes = []
    net[3].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert dtypes == [torch.bfloat16] and formats == [True, True]
    for p in net[:6].parameters():                # a frozen stage: the backbone's layers have no backward
        p.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    assert dtypes[1] == torch.bfloat16 and formats[2:] == [True, True]
    for p in net.parameters():
        p.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    assert dtypes[2] == torch.float32 and formats[4:] == [False, False]
