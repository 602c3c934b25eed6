"""The ResNet stem's 3x3/2 max-pool by multitag's kernel in bf16 or fp32 channels_last training
(kernels/max_pool.cpp).

ATen's channels_last max-pool backward scatters every output's gradient onto its argmax; on the stem's map
(B, 64, H/2, W/2) forward + backward took as long as two stages' BatchNorms in bf16 (RESULTS run S), and
~31 ms of a ~620 ms fp32 step on the Intel machine without bf16 (run U). The kernel stores the winning tap
per output value (one byte) and gathers the backward per input position — the same values (PyTorch's
winner: first strictly larger in (kh, kw) order, NaN winning), the gradient summed in fp32 (rounded once
in bf16) where two windows chose the same input, in ATen's order.

The layer tweak ``max_pool_kernel`` (layer_tweaks.py): plain ``nn.MaxPool2d(3, 2, 1)`` layers only; eval mode,
no autograd, other dtypes, layouts or devices and torch.compile tracing run nn.MaxPool2d's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from multitag.cpu_kernels import kernels, takes


class _MaxPool3x3s2(torch.autograd.Function):
    """(B, C, H, W) bf16 or fp32 channels_last → (B, C, ⌊(H-1)/2⌋+1, ⌊(W-1)/2⌋+1), same dtype."""

    @staticmethod
    def forward(ctx, x):
        y, argmax = kernels().max_pool_forward(x)
        ctx.save_for_backward(argmax)
        ctx.size = x.shape[2:]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (argmax,) = ctx.saved_tensors
        return kernels().max_pool_backward(dy.contiguous(memory_format=torch.channels_last), argmax, *ctx.size)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def selects(m: nn.Module) -> bool:
    """nn.MaxPool2d(3, stride=2, padding=1) with nothing else set: the kernel's only shape."""
    return (type(m) is nn.MaxPool2d and _pair(m.kernel_size) == (3, 3) and _pair(m.stride) == (2, 2)
            and _pair(m.padding) == (1, 1) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def _forward(self: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    if (torch.is_grad_enabled() and x.requires_grad and takes(x, (torch.bfloat16, torch.float32))
            and min(x.shape[2:]) >= 2):
        return _MaxPool3x3s2.apply(x)
    return nn.MaxPool2d.forward(self, x)


def make_forward(base: type):
    return _forward
