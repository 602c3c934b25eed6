"""Training-mode BatchNorm, residual add and ReLU(6) in one C++ kernel each way, for channels_last CPU training.

Eager PyTorch runs a ResNet block's tail — BatchNorm, ``x += shortcut``, ReLU — as separate ATen kernels,
each reading and writing the whole activation, and its channels_last bf16 BatchNorm takes an extra pass
for the variance and for the backward's sums. On the AMX machine those memory-bound ops were 25-35 % of
a ResNet-18 training step (benchmarks/RESULTS.md, run R) while its convs' forward ran near the bf16 peak; inductor's
generated kernels for the same ops were slower than ATen's there, fused or not. The kernel here
(kernels/batchnorm_act.cpp) takes two passes each way: forward + backward ran 1.5-1.9x faster than ATen's
for BN alone and 1.8-2.2x for BN + (add +) ReLU on every ResNet-18 map at batch 32 (run S).

It is the layer tweak ``fused_batchnorm`` (layer_tweaks.py): measured at start-up like the others and kept
only where the step is faster. It acts on plain ``nn.BatchNorm2d`` layers (the stem's, the downsample
paths'), on timm's ``BasicBlock``/``Bottleneck`` without attention, anti-aliasing, DropBlock or drop-path,
on the Inception-ResNet recipe's conv units, and on timm's ``BatchNormAct2d`` with ReLU, ReLU6 or no
activation (EfficientNet-Lite: its training step 1.29x at 224 px, run S). Everything else — eval mode, no
autograd, NCHW inputs, other devices, torch.compile tracing — runs the layers' own forward, so scoring,
exports and the fp32 predictor compute exactly what they did. The kernel takes bf16 maps (autocast's, the
runtime's usual choice) and fp32 ones (the fp32 channels_last candidate, chosen on CPUs without fast bf16).

The kernel is compiled on first use for this machine with the others (cpu_kernels.py); without a C++
compiler the tweak is unavailable, and multitag says so once.

Numerics (tests/test_fused_batchnorm.py): the forward matches ATen's mixed bf16/fp32 kernel (BN output
rounded to bf16 before the residual is added, as ``x += shortcut`` does), batch statistics from fp32
block sums gathered in fp64 around a per-channel pivot; running statistics and ``num_batches_tracked`` are
updated as ``nn.BatchNorm2d`` does. The activation's mask is the one the forward's rounded output implies.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from multitag.cpu_kernels import kernels, takes

# The maps' dtypes the kernel has: bf16 (under autocast) and fp32 (the fp32 channels_last candidate).
MAP_DTYPES = (torch.bfloat16, torch.float32)
# The activations the kernel applies after BN (+ residual), by its codes, and as the layers compute them.
ACTS = {"none": 0, "relu": 1, "relu6": 2}
_LAYER_ACT = {"none": lambda y: y, "relu": torch.relu, "relu6": F.relu6}


class _BatchNormAct(torch.autograd.Function):
    """y = act(round(BN(x)) + residual?) with batch statistics; x, residual, y: (N, C, H, W) channels_last,
    bf16 (round: to bf16) or fp32; weight, bias, running stats: (C,) fp32; act: an ACTS code."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, residual, act):
        y, mean, invstd, scale, shift = kernels().batchnorm_act_forward(
            x, weight, bias, running_mean, running_var, momentum, eps, residual, act)
        # y only where the backward reads it (the activation's mask after a residual): a plain BN's output
        # may be changed in place next (timm's stem: bn1, then an in-place ReLU)
        ctx.save_for_backward(x, y if residual is not None and act else None, weight, mean, invstd, scale, shift)
        ctx.has_residual, ctx.act = residual is not None, act
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, y, weight, mean, invstd, scale, shift = ctx.saved_tensors
        grads = kernels().batchnorm_act_backward(
            dy.contiguous(memory_format=torch.channels_last), x, x if y is None else y, weight, mean, invstd, scale,
            shift, ctx.has_residual, ctx.act)
        dres = grads[3] if ctx.has_residual else None
        return grads[0], grads[1], grads[2], None, None, None, None, dres, None


def _fusable(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether the kernel computes what ``bn`` (+ residual) (+ activation) would, and a backward follows."""
    return (bn.training and bn.track_running_stats and bn.affine and bn.running_mean is not None
            and bn.weight.dtype == torch.float32 and torch.is_grad_enabled()
            and (x.requires_grad or bn.weight.requires_grad or bn.bias.requires_grad)
            and takes(x, MAP_DTYPES) and x.size(1) == bn.num_features
            and x.numel() > x.size(1)          # one value per channel: BatchNorm's own error is raised
            and (residual is None or (takes(residual, (x.dtype,)) and residual.shape == x.shape)))


def _momentum(bn: nn.BatchNorm2d) -> float:
    """The new batch's weight in the running statistics, counting the batch as nn.BatchNorm2d does."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:                 # cumulative average
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _fused(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None, act: str) -> torch.Tensor:
    return _BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, _momentum(bn), bn.eps,
                               residual, ACTS[act])


def batchnorm_act(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None,
                  act: str = "none") -> torch.Tensor:
    """act(bn(x) + residual?), act one of ACTS: by the fused kernel where it applies, else by the layers'
    own ops."""
    if _fusable(bn, x, residual):
        return _fused(bn, x, residual, act)
    y = nn.BatchNorm2d.forward(bn, x)
    if residual is not None:
        y += residual           # in place as timm's blocks add: the sum keeps y's dtype (bf16 under autocast)
    return _LAYER_ACT[act](y)


# -- the layers the tweak rewrites ------------------------------------------------------------------------

def _batchnorm_forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return batchnorm_act(self, x)


# timm's BatchNormAct2d (EfficientNet-Lite's BN + ReLU6, BN alone) by the activation it carries
_BN_ACT2D_ACTS = {nn.Identity: "none", nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _batchnorm_act2d_forward(self: BatchNormAct2d, x: torch.Tensor) -> torch.Tensor:
    if _fusable(self, x, None):
        return _fused(self, x, None, _BN_ACT2D_ACTS[type(self.act)])
    return BatchNormAct2d.forward(self, x)


def _plain_bn(m: nn.Module) -> bool:
    """A BatchNorm2d that computes only BatchNorm (not timm's BatchNormAct2d, airbench's ShiftOnlyBN, ...)."""
    return isinstance(m, nn.BatchNorm2d) and type(m).forward in (nn.BatchNorm2d.forward, _batchnorm_forward)


def _relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def _identity(m: nn.Module | None) -> bool:
    return m is None or type(m) is nn.Identity


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's BasicBlock.forward with its two BN(+add)+ReLU tails fused."""
    shortcut = x
    x = batchnorm_act(self.bn1, self.conv1(x), act="relu")
    x = self.conv2(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return batchnorm_act(self.bn2, x, residual=shortcut, act="relu")


def _bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's Bottleneck.forward with its three BN(+add)+ReLU tails fused."""
    shortcut = x
    x = batchnorm_act(self.bn1, self.conv1(x), act="relu")
    x = batchnorm_act(self.bn2, self.conv2(x), act="relu")
    x = self.conv3(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return batchnorm_act(self.bn3, x, residual=shortcut, act="relu")


def _conv_bn_relu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """multitag's Inception-ResNet conv unit (conv → BN → ReLU), fused."""
    return batchnorm_act(self.bn, self.conv(x), act="relu")


@lru_cache(maxsize=None)
def _block_kinds() -> dict[type, tuple]:
    """Block class → (its fused forward, its BatchNorms, its ReLUs, the parts that must be absent/identity)."""
    from timm.models.resnet import BasicBlock, Bottleneck
    from multitag.models.inception_resnet import ConvBNReLU
    return {
        BasicBlock: (_basic_block_forward, ("bn1", "bn2"), ("act1", "act2"), ("drop_block", "aa", "se", "drop_path")),
        Bottleneck: (_bottleneck_forward, ("bn1", "bn2", "bn3"), ("act1", "act2", "act3"),
                     ("drop_block", "aa", "se", "drop_path")),
        ConvBNReLU: (_conv_bn_relu_forward, ("bn",), ("act",), ()),
    }


def selects(m: nn.Module) -> bool:
    """The layers the tweak rewrites: plain BatchNorm2d, BatchNormAct2d with an activation the kernel has,
    and the blocks above in their plain form."""
    if type(m) is nn.BatchNorm2d:
        return True
    if type(m) is BatchNormAct2d:
        return _identity(m.drop) and type(m.act) in _BN_ACT2D_ACTS
    kind = _block_kinds().get(type(m))
    if kind is None:
        return False
    _, bns, acts, absent = kind
    return (all(_plain_bn(getattr(m, n)) for n in bns) and all(_relu(getattr(m, n)) for n in acts)
            and all(_identity(getattr(m, n, None)) for n in absent))


def make_forward(base: type):
    """The fused forward for a class ``selects`` accepts."""
    if base is nn.BatchNorm2d:
        return _batchnorm_forward
    return _batchnorm_act2d_forward if base is BatchNormAct2d else _block_kinds()[base][0]
