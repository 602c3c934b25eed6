"""Layer tweaks: depthwise convs in fp32 under bf16 autocast, BatchNorm at widths not ÷16 on an NCHW
copy, dense convs on small maps taking their gradients from GEMMs where measured faster per shape. Only the selected layers
change, nothing else does (outputs outside autocast, state-dict keys, copies), and the runtime measures them as candidates and keeps the choice across a resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from multitag import layer_tweaks, matmul_conv, runtime
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


def runs_of(monkeypatch, function: type) -> list[int]:
    """Grows by one each time a layer runs through the tweak's autograd ``function``."""
    real, runs = function.apply, []
    monkeypatch.setattr(function, "apply", staticmethod(lambda *a: runs.append(1) or real(*a)))
    return runs


def tweak_runs(monkeypatch) -> list[int]:
    """Depthwise convs through the bf16-forward / fp32-backward function."""
    return runs_of(monkeypatch, layer_tweaks._Bf16ForwardFp32Backward)


def test_depthwise_convs_alone_run_their_backward_in_fp32_under_autocast(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    plain, kept = tiny_net(), tiny_net()
    assert apply_tweaks(kept, ("fp32_depthwise",)) == 1 and apply_tweaks(kept, ("fp32_depthwise",)) == 0
    runs = tweak_runs(monkeypatch)
    assert [o.dtype for o in seen_by(plain, nn.Conv2d, x, True)] == [torch.bfloat16] * 3 and not runs
    inputs = []
    kept[3].register_forward_pre_hook(lambda m, i: inputs.append(i[0]))
    grads = []
    kept[3].register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    outs = seen_by(kept, nn.Conv2d, x, True)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 3 and runs == [1]   # handed on in bf16 like the others
    # the weight gradient is the fp32 one of the bf16 input and output gradient (what the fp32 kernel gives)
    ref = torch.ops.aten.convolution_backward(grads[0].float(), inputs[0].float(), kept[3].weight, [8], [1, 1], [1, 1],
                                              [1, 1], False, [0, 0], 8, [False, True, True])
    assert kept[3].weight.grad.dtype == torch.float32 and kept[3].weight.grad.abs().sum() > 0
    assert torch.equal(kept[3].weight.grad, ref[1]) and torch.equal(kept[3].bias.grad, ref[2])
    # outside autocast the forward is the original one; the parameters and their names are unchanged
    fresh, fresh_kept = tiny_net(), tiny_net()
    apply_tweaks(fresh_kept, ("fp32_depthwise",))
    assert torch.equal(fresh(x), fresh_kept(x))
    assert list(plain.state_dict()) == list(kept.state_dict())
    assert type(copy.deepcopy(kept)[3]) is type(kept[3])                      # EMA copies keep it


def test_a_tf_same_padded_depthwise_conv_computes_what_it_computed(monkeypatch):
    """timm's Conv2dSame (EfficientNet-Lite's strided convs) pads in its forward, odd sizes asymmetrically:
    the tweak pads the same way, its forward equals the plain layer's under autocast and its gradients
    are the fp32 ones. Convs it cannot vouch for are not selected."""
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    plain = Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False)
    kept = copy.deepcopy(plain)
    assert apply_tweaks(kept, ("fp32_depthwise",)) == 1
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    runs = tweak_runs(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y_kept = plain(xs[0]), kept(xs[1])
    assert runs == [1] and y_kept.shape == y_plain.shape == (2, 8, 5, 5) and torch.equal(y_kept, y_plain)
    g = torch.randn(y_kept.shape)
    y_kept.backward(g)
    # the fp32 reference: the same conv on the bf16-rounded input, all in fp32
    ref = copy.deepcopy(plain)
    ref(xs[2].to(torch.bfloat16).float()).backward(g.to(torch.bfloat16).float())
    torch.testing.assert_close(kept.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[1].grad, xs[2].grad.to(torch.bfloat16).float(), rtol=0, atol=0)
    class Odd(nn.Conv2d):                       # a subclass with its own forward: left alone
        def forward(self, x):
            return super().forward(x) * 2
    assert apply_tweaks(nn.Sequential(Odd(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=8, padding="same"),
                                      nn.Conv2d(8, 8, 3, groups=8, padding=1, padding_mode="reflect")),
                        ("fp32_depthwise",)) == 0


def matmul_runs(monkeypatch) -> list[int]:
    """Convs through the GEMM-gradient conv function."""
    return runs_of(monkeypatch, matmul_conv.MatmulConv)


def plan_as(monkeypatch, input_grad: bool, weight_grad: bool) -> None:
    """Every conv shape's gradients planned so (by matmul where True), instead of measured."""
    monkeypatch.setattr(matmul_conv, "plan_for", lambda *a: matmul_conv.Plan(input_grad, weight_grad))


SMALL_MAP_CONVS = pytest.mark.parametrize("width,kernel,stride,padding,dilation,size,bias", [
    (128, 3, 1, 1, 1, 4, False),          # ResNet-18's last stage at 128 px (narrower)
    (128, 3, 2, 1, 1, 8, True),           # its strided entry, 8² -> 4²
    (256, 1, 2, 0, 1, 8, False),          # the 1x1 downsample
    (128, 3, 1, 2, 2, 7, False),          # dilated, odd size
    (128, 3, (2, 1), (1, 0), 1, 7, True),  # unequal strides and padding
])


@SMALL_MAP_CONVS
def test_small_map_convs_take_their_weight_gradient_from_one_matmul(monkeypatch, width, kernel, stride, padding,
                                                                     dilation, size, bias):
    """The forward is autocast's own; by matmul the weight (and bias) gradient is the fp32 sum over the
    bf16 input and output gradient, rounded once to bf16 (what oneDNN's bf16 kernel gives), the input
    gradient the same sum over bf16 per-tap shares (planned so here on output maps of at most 4x4, by
    oneDNN on larger ones: autocast's own values)."""
    torch.manual_seed(0)
    plain = nn.Conv2d(width, 2 * width, kernel, stride, padding, dilation, bias=bias).to(memory_format=CL)
    kept = copy.deepcopy(plain)
    assert apply_tweaks(kept, ("matmul_weight_grad",)) == 1 and apply_tweaks(kept, ("matmul_weight_grad",)) == 0
    x = torch.randn(3, width, size, size).contiguous(memory_format=CL)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    runs = matmul_runs(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y_kept = plain(xs[0]), kept(xs[1])
    assert runs == [1] and y_kept.dtype == torch.bfloat16 and torch.equal(y_kept, y_plain)
    g = torch.randn(y_kept.shape).to(torch.bfloat16)
    input_by_matmul = g.shape[2] * g.shape[3] <= 16
    plan_as(monkeypatch, input_by_matmul, True)
    y_plain.backward(g), y_kept.backward(g)
    ref = copy.deepcopy(plain).double()
    ref.weight.data.copy_(plain.weight.to(torch.bfloat16))         # the weight the bf16 kernels multiply by
    x_ref = xs[2].detach().to(torch.bfloat16).double().requires_grad_(True)
    ref(x_ref).backward(g.double())
    if not input_by_matmul:
        assert torch.equal(xs[1].grad, xs[0].grad)
    else:
        assert xs[1].grad.dtype == torch.float32 and xs[1].grad.shape == x.shape
        # each of the k*k taps' shares leaves the GEMM rounded to bf16 before the fp32 sum (measured worst
        # 2.1e-3 of the largest gradient), where oneDNN rounds the sum once
        scale = x_ref.grad.abs().max().item()
        torch.testing.assert_close(xs[1].grad.double(), x_ref.grad, rtol=2 ** -7, atol=4e-3 * scale)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=2 ** -6, atol=4e-3 * scale)
    assert kept.weight.grad.dtype == torch.float32 and kept.weight.grad.shape == plain.weight.shape
    for got, want in [(kept.weight.grad, ref.weight.grad)] + ([(kept.bias.grad, ref.bias.grad)] if bias else []):
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-3 * want.abs().max().item())
    torch.testing.assert_close(kept.weight.grad, plain.weight.grad, rtol=2 ** -6, atol=2e-3 * plain.weight.grad.abs().max().item())


@SMALL_MAP_CONVS
def test_fp32_small_map_convs_take_their_gradients_from_matmuls_to_fp32_rounding(monkeypatch, width, kernel, stride,
                                                                                 padding, dilation, size, bias):
    """Without autocast (the runtime's fp32 candidates) the forward is the plain fp32 conv, bitwise; by
    matmul both gradients are fp32 sums in another order than oneDNN's (fp32 rounding apart, checked
    against fp64), and planned for oneDNN they are oneDNN's own, bitwise."""
    torch.manual_seed(0)
    plain = nn.Conv2d(width, 2 * width, kernel, stride, padding, dilation, bias=bias).to(memory_format=CL)
    x = torch.randn(3, width, size, size).contiguous(memory_format=CL)
    ref = copy.deepcopy(plain).double()
    x_ref = x.double().requires_grad_(True)
    y_ref = ref(x_ref)
    g = torch.randn(y_ref.shape)
    y_ref.backward(g.double())
    runs = matmul_runs(monkeypatch)
    for by_matmul in (True, False):
        nets = [copy.deepcopy(plain) for _ in range(2)]
        apply_tweaks(nets[1], ("matmul_weight_grad",))
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        plan_as(monkeypatch, by_matmul, by_matmul)
        ys = [net(xi) for net, xi in zip(nets, xs)]
        assert ys[1].dtype == torch.float32 and torch.equal(ys[1], ys[0])
        for y in ys:
            y.backward(g)
        gx, gw = xs[1].grad, nets[1].weight.grad
        assert gx.dtype == gw.dtype == torch.float32 and gx.shape == x.shape and gw.shape == plain.weight.shape
        if by_matmul:
            for mine, want in [(gx, x_ref.grad), (gw, ref.weight.grad)]:
                torch.testing.assert_close(mine.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        else:
            assert torch.equal(gx, xs[0].grad) and torch.equal(gw, nets[0].weight.grad)
        if bias:
            torch.testing.assert_close(nets[1].bias.grad.double(), ref.bias.grad, rtol=1e-5, atol=1e-4)
    assert runs == [1, 1]


def test_the_matmul_weight_gradient_is_only_for_small_maps_and_large_layers(monkeypatch):
    """Larger maps run autocast's conv as before; layers with small weights and grouped or self-padding
    subclasses are not selected; outside bf16 autocast and fp32 the layer is the original, and on large
    maps in fp32 too. timm's Conv2dSame pads as it did."""
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    conv = nn.Conv2d(128, 96, 3, padding=1)
    apply_tweaks(conv, ("matmul_weight_grad",))
    runs = matmul_runs(monkeypatch)
    big = torch.randn(2, 128, 9, 9, requires_grad=True)                      # 81 positions > 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(big).float().sum().backward()
        conv(big[:, :, :8, :8]).float().sum().backward()                     # 64: the matmul's
    assert runs == [1]
    plain = copy.deepcopy(conv)
    plain.__class__ = nn.Conv2d
    assert torch.equal(conv(big), plain(big)) and runs == [1]                # fp32 on 81 positions: the original's
    small = big[:, :, :4, :4].double()
    assert torch.equal(conv.double()(small), plain.double()(small)) and runs == [1]     # fp64: the original layer
    conv.float(), plain.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(big[:, :, :4, :4])
    assert runs == [1]                                                       # scoring: no backward follows
    class Odd(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2
    assert apply_tweaks(nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(128, 128, 3, groups=2), Odd(128, 128, 3),
                                      nn.Conv2d(128, 128, 3, padding="same")), ("matmul_weight_grad",)) == 0
    same = Conv2dSame(128, 96, 3, stride=2, bias=False)
    kept = copy.deepcopy(same)
    assert apply_tweaks(kept, ("matmul_weight_grad",)) == 1
    xs = [torch.randn(2, 128, 7, 7).requires_grad_(True) for _ in range(2)]
    xs[1].data.copy_(xs[0].data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_same, y_kept = same(xs[0]), kept(xs[1])
    assert runs == [1, 1] and y_kept.shape == y_same.shape == (2, 96, 4, 4) and torch.equal(y_kept, y_same)
    plan_as(monkeypatch, True, True)
    y_same.float().sum().backward(), y_kept.float().sum().backward()
    # both gradients from GEMMs, the input's back through timm's own padding
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=2 ** -6, atol=2e-3 * xs[0].grad.abs().max().item())
    torch.testing.assert_close(kept.weight.grad, same.weight.grad, rtol=2 ** -6, atol=2e-3 * same.weight.grad.abs().max().item())


def test_convs_planned_for_onednn_give_autocasts_own_gradients(monkeypatch):
    """A shape where both of oneDNN's kernels were measured faster: the tweaked conv's input and weight
    gradients are bitwise those of plain autocast (one oneDNN call for both); the bias gradient is the
    fp32 sum, which autocast's rounds to bf16."""
    torch.manual_seed(0)
    plain = nn.Conv2d(128, 256, 3, 2, 1).to(memory_format=CL)
    kept = copy.deepcopy(plain)
    apply_tweaks(kept, ("matmul_weight_grad",))
    plan_as(monkeypatch, False, False)
    xs = [torch.randn(4, 128, 8, 8).contiguous(memory_format=CL).requires_grad_(True) for _ in range(2)]
    xs[1].data.copy_(xs[0].data)
    runs = matmul_runs(monkeypatch)
    for net, x in zip((plain, kept), xs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x).float().square().sum().backward()
    assert runs == [1]
    for got, want in [(xs[1].grad, xs[0].grad), (kept.weight.grad, plain.weight.grad)]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    torch.testing.assert_close(kept.bias.grad.to(torch.bfloat16).float(), plain.bias.grad, rtol=2 ** -8, atol=0)


def test_each_conv_shape_is_planned_by_measuring_once_per_machine(tmp_path, monkeypatch):
    """Each gradient goes to whichever of oneDNN and the GEMM was timed faster for the conv's shape; the
    plan is kept in the cache, so the next run (a new process: the file read afresh) measures nothing;
    another thread count or dtype is another shape."""
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    times = iter([2.0, 1.0,      # input gradient: oneDNN 2 s, GEMM 1 s -> GEMM
                  1.0, 2.0])     # weight gradient: oneDNN 1 s, GEMM 2 s -> oneDNN
    order = []

    def fake_best_seconds(fn, reps, device=None, warmup=2):
        order.append(fn)
        return next(times)
    monkeypatch.setattr(matmul_conv, "best_seconds", fake_best_seconds)
    used = {"input": 0, "weight": 0}
    for name in used:
        real = getattr(matmul_conv, f"{name}_grad_by_matmul")
        monkeypatch.setattr(matmul_conv, f"{name}_grad_by_matmul",
                            lambda *a, real=real, name=name: used.__setitem__(name, used[name] + 1) or real(*a))
    conv = nn.Conv2d(128, 256, 3, 2, 1, bias=False).to(memory_format=CL)
    apply_tweaks(conv, ("matmul_weight_grad",))
    x = torch.randn(2, 128, 8, 8).contiguous(memory_format=CL).requires_grad_(True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().sum().backward()
    step()
    assert len(order) == 4 and used == {"input": 1, "weight": 0}      # timed fns are not called by the fake
    saved = json.loads((tmp_path / "conv_grad_plans.json").read_text())
    assert list(saved.values()) == [[True, False]]
    matmul_conv._known.cache_clear()                                    # as a new process would
    step()
    assert len(order) == 4 and used == {"input": 2, "weight": 0}
    other_threads = 2 if torch.get_num_threads() == 1 else 1
    with runtime.Runtime(torch.device("cpu"), "bf16", True, other_threads).thread_count():
        times = iter([1.0, 2.0, 2.0, 1.0])                               # measured the other way round
        step()
    assert len(order) == 8 and used == {"input": 2, "weight": 1}
    assert sorted(map(tuple, json.loads((tmp_path / "conv_grad_plans.json").read_text()).values())) == \
        [(False, True), (True, False)]
    times = iter([2.0, 1.0, 2.0, 1.0])                                   # fp32, the same shape: planned afresh
    conv(x).sum().backward()
    assert len(order) == 12 and used == {"input": 3, "weight": 2}


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
    assert available_tweaks(tiny_net(16)) == ("fused_batchnorm", "fp32_depthwise")   # 16 wide: no NCHW copy


def test_which_models_have_which_tweaks():
    assert available_tweaks(build_model("efficientnet_lite0", 3, pretrained=False)) == \
        ("fused_batchnorm", "fp32_depthwise", "nchw_odd_batchnorm", "matmul_weight_grad")   # 24 and 40 wide stages
    assert available_tweaks(build_model("inception_resnet_v1_small", 3)) == ("fused_batchnorm", "nchw_odd_batchnorm")
    assert available_tweaks(build_model("advanced_cnn", 3)) == ("fused_batchnorm", "max_pool_kernel", "matmul_weight_grad")
    assert available_tweaks(build_model("simple_cnn", 3)) == ("fused_batchnorm",)
    # CPU remedies: a CUDA run measures none of them (nor builds the CPU kernels to find out)
    assert available_tweaks(build_model("advanced_cnn", 3), torch.device("cuda")) == ()
    both = ("fp32_depthwise", "nchw_odd_batchnorm")
    assert tweaks_for(both, "fp32", False) == () and tweaks_for(both, "fp32", True) == ("nchw_odd_batchnorm",)
    assert tweaks_for(both, "bf16", True) == both


def test_candidates_add_a_tweaked_variant_where_tweaks_apply():
    both = ("fp32_depthwise", "nchw_odd_batchnorm")
    cands = runtime.candidates(torch.device("cpu"), threads=1, tweaks=both)
    assert cands == [("fp32", False, 1, ()), ("fp32", True, 1, ()), ("fp32", True, 1, ("nchw_odd_batchnorm",)),
                     ("bf16", True, 1, ()), ("bf16", True, 1, both)]
    assert len(runtime.candidates(torch.device("cpu"), threads=1)) == 3


def test_the_runtime_measures_tweaks_only_for_models_that_have_them(tmp_path, monkeypatch, steady_load):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    measured = []

    def fake_time(model, loss_fn, x, y, rt, **kw):
        measured.append(rt.layer_tweaks)
        return {"fp32": 0.3, "bf16": 0.2}[rt.precision] / (1 + len(rt.layer_tweaks))

    monkeypatch.setattr(runtime, "time_train_step", fake_time)
    args = (MaskedBCE(), torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 4)).float())
    rt = runtime.choose_runtime(tiny_net(), *args, threads=1, log=lambda *a: None)
    # (its plain BatchNorms are fused under bf16, so nchw_odd_batchnorm has none left there)
    assert rt.precision == "bf16" and rt.layer_tweaks == ("fused_batchnorm", "fp32_depthwise")
    assert "depthwise backward in fp32" in rt.describe()
    saved = json.loads((tmp_path / "precision.json").read_text()).popitem()[1]
    assert saved["layer_tweaks"] == ["fused_batchnorm", "fp32_depthwise"]
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: pytest.fail("measured twice"))
    assert runtime.choose_runtime(tiny_net(), *args, threads=1, log=lambda *a: None) == rt    # from the cache

    monkeypatch.setattr(runtime, "time_train_step", fake_time)
    measured.clear()
    plain = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())   # no BatchNorm
    assert runtime.choose_runtime(plain, *args, threads=1, log=lambda *a: None).layer_tweaks == ()
    assert measured and not any(measured)


def test_prepare_model_applies_them_and_a_real_step_runs(monkeypatch):
    rt = runtime.Runtime(torch.device("cpu"), "bf16", True, 1, ("fp32_depthwise", "nchw_odd_batchnorm"))
    net = rt.prepare_model(tiny_net())
    assert net[3].weight.is_contiguous(memory_format=CL)
    runs = tweak_runs(monkeypatch)
    seen_by(net, nn.Conv2d, torch.randn(2, 3, 8, 8).contiguous(memory_format=CL), True)
    assert runs == [1]
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
    runs = tweak_runs(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert not runs and formats == [True, True]
    for p in net[:6].parameters():                # a frozen stage: the backbone's layers have no backward
        p.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    assert not runs and formats[2:] == [True, True]
    for p in net.parameters():
        p.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    assert runs == [1] and formats[4:] == [False, False]


def test_a_tweak_left_without_layers_by_an_earlier_one_is_not_a_candidate():
    """EfficientNet-Lite0's BatchNorms are all fused under channels_last, so nchw_odd_batchnorm has none
    left there (and would only mislabel the runtime); without the fused tweak it keeps its own."""
    model = build_model("efficientnet_lite0", 3, pretrained=False)
    tweaks = available_tweaks(model)
    assert tweaks == ("fused_batchnorm", "fp32_depthwise", "nchw_odd_batchnorm", "matmul_weight_grad")
    assert tweaks_for(tweaks, "bf16", True, model) == ("fused_batchnorm", "fp32_depthwise", "matmul_weight_grad")
    assert tweaks_for(tweaks, "fp32", True, model) == ("fused_batchnorm", "matmul_weight_grad")
    assert tweaks_for(("nchw_odd_batchnorm",), "fp32", True, model) == ("nchw_odd_batchnorm",)
    cands = runtime.candidates(torch.device("cpu"), threads=1, tweaks=tweaks, model=model)
    assert ("bf16", True, 1, ("fused_batchnorm", "fp32_depthwise", "matmul_weight_grad")) in cands
