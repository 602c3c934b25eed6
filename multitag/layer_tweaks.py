"""Per-layer exceptions to the runtime's precision and memory format, measured rather than assumed.

Some kernels of oneDNN/ATen on this project's AVX-512 + AMX CPUs are far slower than their neighbours
or than what the memory allows (benchmarks/RESULTS.md, runs I, J, O and S), so the runtime measures each
model with and without these:

- ``fp32_depthwise`` (bf16 only; the name is older than the function, kept for cached choices):
  depthwise convs run their backward in fp32 inside bf16 autocast, their forward in bf16 (as fast as
  fp32 or faster), output handed on in bf16. A bf16 depthwise forward + backward was 3-4x slower than
  fp32 (EfficientNet-Lite0 at batch 32, 224 px, channels_last, 2 threads: 172 vs 56 ms for 96 ch
  3x3/2 on 113², 80 vs 20 for 240 ch 5x5 on 28²), while the pointwise convs are fastest in bf16.
- ``nchw_odd_batchnorm`` (channels_last only): BatchNorm layers whose channel count is not a multiple
  of 16 run on an NCHW copy. With 2 threads channels_last BatchNorm backward was 5-25x slower than
  NCHW at such widths (batch 32 at 64², bf16: 8 ch 5.96 vs 0.36 ms, 17 ch 11.2 vs 0.65, 24 ch 5.0 vs
  1.1) and only 1.5x at multiples of 16 (32 ch 1.8 vs 1.2), where the two copies would cost more than
  they save; with 1 thread 2-4x (8 ch 1.97 vs 0.52), where the copies can eat the gain — which is
  why it is a measured candidate, not a rule.
- ``matmul_weight_grad`` (bf16 and fp32; named before it took the input gradient and fp32 too): ungrouped
  convs with large weights, on output maps of at most 8x8 positions, compute their weight gradient as one
  GEMM over the k*k shifted views of the input, and their input gradient as one GEMM and a col2im, each
  where that was measured faster than oneDNN's kernel for the conv's shape and dtype on this machine
  (matmul_conv.py: 2-6x on the bf16 weight gradient of the AMX machine, ~2x in fp32 on the Intel machine
  without bf16, slower on some shapes of others). ResNet-18's last two stages at 128 px: training step
  1.12x with the weight gradient, 1.01-1.06x more with the input gradient on 4x4 maps (AMX machine).

- ``fused_batchnorm`` (channels_last only, bf16 and fp32): BatchNorm, the residual add and the ReLU of ResNet blocks
  (and plain BatchNorm layers) as one C++ kernel each way (fused_batchnorm.py): ATen's separate kernels
  took ~8 passes over the activation where it takes 4; ResNet-18's training step 1.12-1.17x at 128 px,
  1.20x at 224, EfficientNet-Lite0's 1.29x. Listed first, so that the BatchNorms it takes at odd widths are
  fused rather than copied to NCHW (tweaks_for then leaves out a tweak with no layer left).
- ``max_pool_kernel`` (channels_last only, bf16 and fp32): the ResNet stem's 3x3/2 max-pool by multitag's kernel
  (max_pool.py), whose backward gathers per input position where ATen's scatters.

All swap the layer's class for a subclass with another forward, so parameters, buffers and
state-dict keys are unchanged (checkpoints, EMA copies, exports are unaffected). They act only where
a backward follows (training); ``fp32_depthwise`` does nothing outside autocast, ``matmul_weight_grad``
nothing outside bf16 autocast or fp32, ``nchw_odd_batchnorm`` nothing to NCHW inputs, ``fused_batchnorm``
and ``max_pool_kernel`` nothing in eval mode or off channels_last CPU tensors of their dtypes, so scoring
and the fp32 predictor compute exactly what they computed before.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from multitag import cpu_kernels, fused_batchnorm, matmul_conv, max_pool

_SWAPPED: dict[tuple[str, type], type] = {}


def _is_plain_conv(m: nn.Module) -> bool:
    """A conv the conv tweaks can compute themselves: zero-padded by numbers, a plain nn.Conv2d or timm's
    Conv2dSame (other subclasses may compute something else in their forward)."""
    return (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and (type(m) is nn.Conv2d or _pads_in_forward(type(m))))


def _is_depthwise(m: nn.Module) -> bool:
    """A plain conv (_is_plain_conv) with one input channel per group."""
    return _is_plain_conv(m) and m.groups > 1 and m.groups == m.in_channels


def _is_odd_batchnorm(m: nn.Module) -> bool:
    """A 2-d BatchNorm (timm's BatchNormAct2d included) whose width is not a multiple of 16."""
    return isinstance(m, nn.BatchNorm2d) and m.num_features % 16 != 0


def _backward_follows(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd records this layer: the tweaks are for its backward, and its forward alone is
    slower with them (EfficientNet-Lite0 scoring at batch 32: 54 img/s tweaked vs 105 plain bf16), so
    scoring, a frozen stage's frozen layers and no_grad blocks run the layer as it was."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters(False)))


class _Bf16ForwardFp32Backward(torch.autograd.Function):
    """conv2d computed in bf16 forward and in fp32 backward. For depthwise convs oneDNN's bf16 forward
    is as fast as fp32 or faster (96 ch 3x3/2 on 113², batch 32: 4.0 vs 7.1 ms) while its bf16 backward
    is 4-8x slower (141 vs 25 ms). Saves the bf16 input, half the bytes an fp32 copy would take."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        # x (B, C, H, W) bf16, already padded when the layer pads in its forward; weight (C, 1, k, k) fp32
        ctx.save_for_backward(x, weight)
        ctx.conv = (list(stride), list(padding), list(dilation), groups, bias is not None)
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        needs = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight, [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
        return (None if gx is None else gx.to(x.dtype)), gw, gb, None, None, None, None


def _pads_in_forward(cls: type) -> bool:
    """timm's Conv2dSame (TF "same" padding, EfficientNet-Lite's strided convs) pads in its forward."""
    from timm.layers.conv2d_same import Conv2dSame
    return issubclass(cls, Conv2dSame)


def _same_padder(base: type) -> Callable | None:
    """timm's pad_same when layers of class ``base`` pad in their forward, else None: decided once per
    layer class when the swapped class is made, not in every forward."""
    if not _pads_in_forward(base):
        return None
    from timm.layers.padding import pad_same
    return pad_same


def _padded(layer: nn.Conv2d, x: torch.Tensor, pad_same: Callable | None) -> tuple[torch.Tensor, tuple]:
    """``x`` padded as the layer's own forward pads it, and the padding left for conv2d to apply."""
    if pad_same is None:
        return x, layer.padding
    return pad_same(x, layer.weight.shape[-2:], layer.stride, layer.dilation), (0, 0)


def _is_dense_conv(m: nn.Module) -> bool:
    """An ungrouped plain conv (_is_plain_conv) whose weight is large enough for GEMM gradients to pay."""
    return _is_plain_conv(m) and m.groups == 1 and m.weight.numel() >= matmul_conv.MIN_WEIGHT


def _conv_out_positions(conv: nn.Conv2d, x: torch.Tensor, padding) -> int:
    """Ho * Wo of ``conv`` on ``x`` (already padded when the layer pads in its forward)."""
    return math.prod((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                     zip(x.shape[-2:], conv.weight.shape[-2:], conv.stride, padding, conv.dilation))


def _matmul_wgrad_forward(base: type) -> Callable:
    pad_same = _same_padder(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _matmul_conv_dtype(x)
        if dtype is None or not _backward_follows(self, x):
            return base.forward(self, x)
        x, padding = _padded(self, x, pad_same)
        if _conv_out_positions(self, x, padding) > matmul_conv.MAX_POSITIONS:   # the conv as before
            return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return matmul_conv.MatmulConv.apply(x.to(dtype), self.weight, self.bias, self.stride, padding, self.dilation)
    return forward


def _matmul_conv_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the matmul conv computes in: bf16 under bf16 autocast, fp32 for fp32 inputs with autocast
    off (the runtime's fp32 candidates), None (the layer's own forward) otherwise."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.bfloat16 if torch.get_autocast_dtype(x.device.type) == torch.bfloat16 else None
    return torch.float32 if x.dtype == torch.float32 else None


def _fp32_backward_forward(base: type) -> Callable:
    pad_same = _same_padder(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type) or not _backward_follows(self, x):
            return base.forward(self, x)
        x, padding = _padded(self, x.to(torch.get_autocast_dtype(x.device.type)), pad_same)
        # handed on in bf16, as autocast's convs hand theirs: the BatchNorm and ReLU6 after it run on bf16
        return _Bf16ForwardFp32Backward.apply(x, self.weight, self.bias, self.stride, padding, self.dilation,
                                              self.groups)
    return forward


def _nchw_forward(base: type) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)
                or not _backward_follows(self, x)):
            return base.forward(self, x)
        return base.forward(self, x.contiguous()).contiguous(memory_format=torch.channels_last)
    return forward


class Tweak(NamedTuple):
    selects: Callable[[nn.Module], bool]          # which layers
    make_forward: Callable[[type], Callable]      # their new forward, given the layer's class
    label: str                                    # as Runtime.describe shows it
    precisions: frozenset                         # the runtime precisions it is for
    channels_last: frozenset                      # the memory formats it is for (channels_last True/False)
    unavailable: Callable[[], str] = lambda: ""   # why it cannot run on this machine ("" when it can)


TWEAKS = {
    # before nchw_odd_batchnorm: the plain BatchNorms it takes are then fused instead of copied to NCHW
    "fused_batchnorm": Tweak(fused_batchnorm.selects, fused_batchnorm.make_forward,
                             "BatchNorm + residual + ReLU(6) fused", frozenset({"fp32", "bf16"}), frozenset({True}),
                             cpu_kernels.unavailable_reason),
    "max_pool_kernel": Tweak(max_pool.selects, max_pool.make_forward, "3×3/2 max-pool by multitag's kernel",
                             frozenset({"fp32", "bf16"}), frozenset({True}), cpu_kernels.unavailable_reason),
    "fp32_depthwise": Tweak(_is_depthwise, _fp32_backward_forward, "depthwise backward in fp32", frozenset({"bf16"}),
                            frozenset({False, True})),
    "nchw_odd_batchnorm": Tweak(_is_odd_batchnorm, _nchw_forward, "NCHW BatchNorm at widths not ÷16",
                                frozenset({"fp32", "bf16"}), frozenset({True})),
    "matmul_weight_grad": Tweak(_is_dense_conv, _matmul_wgrad_forward, "conv gradients by matmul where measured faster on maps ≤ 8×8",
                                frozenset({"fp32", "bf16"}), frozenset({False, True})),
}


def available_tweaks(model: nn.Module, device: torch.device = torch.device("cpu")) -> tuple[str, ...]:
    """The tweaks ``model`` has layers for, in TWEAKS order. None off the CPU: they remedy CPU kernels
    (two are no-ops on CUDA tensors, the others work around oneDNN slow spots cuDNN does not have), and
    measuring them cost a CUDA start-up twice the candidates and a CPU-kernel build."""
    if device.type != "cpu":
        return ()
    return tuple(name for name, t in TWEAKS.items()
                 if any(t.selects(m) for m in model.modules()) and not t.unavailable())


def tweaks_for(available: tuple[str, ...], precision: str, channels_last: bool,
               model: nn.Module | None = None) -> tuple[str, ...]:
    """Of ``available``, those that mean something at this precision and memory format — and, given the
    model, that would still change a layer when applied in this order (fused_batchnorm takes the plain
    BatchNorms nchw_odd_batchnorm would otherwise copy; a tweak left with none is not listed)."""
    own = tuple(t for t in available if precision in TWEAKS[t].precisions and channels_last in TWEAKS[t].channels_last)
    if model is None:
        return own
    taken: set[int] = set()
    kept = []
    for name in own:                            # as apply_tweaks goes: a layer is swapped by one tweak only
        mine = {id(m) for m in model.modules() if id(m) not in taken and TWEAKS[name].selects(m)}
        if mine:
            kept.append(name)
            taken |= mine
    return tuple(kept)


def label(tweak: str) -> str:
    return TWEAKS[tweak].label


def apply_tweaks(model: nn.Module, tweaks: tuple[str, ...]) -> int:
    """Swap the classes of the layers each tweak selects (in place, idempotent); returns how many."""
    n = 0
    for name in tweaks:
        for m in model.modules():
            base = type(m)
            if TWEAKS[name].selects(m) and base not in _SWAPPED.values():        # not swapped already
                m.__class__ = _swapped_class(name, base)
                n += 1
    return n


def _swapped_class(name: str, base: type) -> type:
    if (name, base) not in _SWAPPED:
        _SWAPPED[(name, base)] = type(f"{base.__name__}_{name}", (base,),
                                      {"forward": TWEAKS[name].make_forward(base), "__module__": __name__})
    return _SWAPPED[(name, base)]
