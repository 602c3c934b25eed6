"""The stem max-pool kernel (multitag/max_pool.py) against ATen's values and a float64 gradient."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from multitag import cpu_kernels
from multitag.layer_tweaks import apply_tweaks
from multitag.max_pool import _MaxPool3x3s2, selects

if cpu_kernels.unavailable_reason():
    pytest.skip(f"multitag's CPU kernels not built here: {cpu_kernels.unavailable_reason()}", allow_module_level=True)

CL = torch.channels_last


def tricky_map(shape, seed=0) -> torch.Tensor:
    """bf16 channels_last values with ties (few distinct values), -inf and a NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float() / 2          # many equal values: ties everywhere
    x[0, 0, 0, 0] = float("-inf")
    x[-1, -1, -1, -1] = float("nan")
    return x.to(torch.bfloat16).contiguous(memory_format=CL)


@pytest.mark.parametrize("shape", [(2, 16, 9, 7), (2, 24, 8, 8), (1, 8, 2, 3), (2, 64, 16, 15)])
def test_values_and_gradient(shape):
    x = tricky_map(shape)
    ours = x.clone().requires_grad_()
    y = _MaxPool3x3s2.apply(ours)
    want, indices = F.max_pool2d(x.float(), 3, 2, 1, return_indices=True)
    assert y.is_contiguous(memory_format=CL)
    assert torch.equal(y.float().nan_to_num(7.0), want.nan_to_num(7.0))             # same winner, same value
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y.backward(dy.contiguous(memory_format=CL))
    # float64 reference: every output's gradient onto PyTorch's argmax of its window, summed exactly
    ref = torch.zeros(shape[0], shape[1], shape[2] * shape[3], dtype=torch.float64)
    ref.scatter_add_(2, indices.flatten(2), dy.double().flatten(2))
    ref = ref.view(shape)
    assert ours.grad.is_contiguous(memory_format=CL)
    assert ((ours.grad.double() - ref).abs() <= 2.0 ** -8 * ref.abs()).all()      # one rounding of the exact sum


@pytest.mark.parametrize("shape", [(2, 16, 9, 7), (2, 64, 16, 15)])
def test_fp32_values_and_gradient_are_atens(shape):
    """fp32 channels_last (the runtime's fp32 candidates): ATen's values and, since the kernel sums the
    windows in ATen's order from zero, ATen's gradient bitwise."""
    x = tricky_map(shape).float().contiguous(memory_format=CL)
    x[0, 1, 2, 3] = 0.1                                            # values bf16 cannot hold
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = _MaxPool3x3s2.apply(mine), F.max_pool2d(theirs, 3, 2, 1)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    assert torch.equal(y.nan_to_num(7.0), want.nan_to_num(7.0))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=CL)
    y.backward(dy), want.backward(dy)
    assert mine.grad.dtype == torch.float32 and torch.equal(mine.grad, theirs.grad)


def test_selects_only_the_stem_pool():
    assert selects(nn.MaxPool2d(3, 2, 1)) and selects(nn.MaxPool2d((3, 3), (2, 2), (1, 1)))
    for other in [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, return_indices=True),
                  nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(3, 2, 1, dilation=2), nn.AvgPool2d(3, 2, 1)]:
        assert not selects(other), other


def test_tweaked_resnet_stem_pools_exactly_and_falls_back_outside_training():
    torch.manual_seed(2)
    plain = timm.create_model("resnet18", num_classes=4).to(memory_format=CL).train()
    kept = copy.deepcopy(plain)
    assert apply_tweaks(kept, ("max_pool_kernel",)) == 1
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    outs = []
    for model in (plain, kept):
        with torch.autocast("cpu", torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])                 # the forward is exact, so the whole model's is
    got, want = kept.conv1.weight.grad, plain.conv1.weight.grad
    assert (got - want).norm() <= 0.01 * want.norm()     # ATen sums two windows' share in bf16, the kernel in fp32
    plain.eval(), kept.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(plain(x), kept(x))
    nchw = torch.randn(2, 8, 6, 6, requires_grad=True)                 # not channels_last: ATen's own
    assert torch.equal(kept.maxpool(nchw), F.max_pool2d(nchw, 3, 2, 1))
