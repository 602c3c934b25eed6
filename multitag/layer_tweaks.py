"""Per-layer exceptions to the runtime's precision and memory format, measured rather than assumed.

Two kernels of oneDNN/ATen on this project's AVX-512 + AMX CPUs are far slower than their neighbours
(benchmarks/RESULTS.md, runs I and J), so the runtime measures each model with and without these:

- ``fp32_depthwise`` (bf16 only): depthwise convs run in fp32 inside bf16 autocast. bf16 depthwise
  backward was 3-4x slower than fp32 (EfficientNet-Lite0 at batch 32, 224 px, channels_last, 2 threads:
  172 vs 56 ms for 96 ch 3x3/2 on 113², 80 vs 20 for 240 ch 5x5 on 28²), while the pointwise convs
  are fastest in bf16.
- ``nchw_odd_batchnorm`` (channels_last only): BatchNorm layers whose channel count is not a multiple
  of 16 run on an NCHW copy. With 2 threads channels_last BatchNorm backward was 5-25x slower than
  NCHW at such widths (batch 32 at 64², bf16: 8 ch 5.96 vs 0.36 ms, 17 ch 11.2 vs 0.65, 24 ch 5.0 vs
  1.1) and only 1.5x at multiples of 16 (32 ch 1.8 vs 1.2), where the two copies would cost more than
  they save; with 1 thread 2-4x (8 ch 1.97 vs 0.52), where the copies can eat the gain — which is
  why it is a measured candidate, not a rule.

Both swap the layer's class for a subclass with another forward, so parameters, buffers and
state-dict keys are unchanged (checkpoints, EMA copies, exports are unaffected). They act only where
a backward follows (training); ``fp32_depthwise`` does nothing outside autocast and
``nchw_odd_batchnorm`` nothing to NCHW inputs, so scoring and the fp32 predictor compute exactly
what they computed before.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

_SWAPPED: dict[tuple[str, type], type] = {}


def _is_depthwise(m: nn.Module) -> bool:
    """A grouped conv with one input channel per group (timm's Conv2dSame included)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _is_odd_batchnorm(m: nn.Module) -> bool:
    """A 2-d BatchNorm (timm's BatchNormAct2d included) whose width is not a multiple of 16."""
    return isinstance(m, nn.BatchNorm2d) and m.num_features % 16 != 0


def _backward_follows(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd records this layer: the tweaks are for its backward, and its forward alone is
    slower with them (EfficientNet-Lite0 scoring at batch 32: 54 img/s tweaked vs 105 plain bf16), so
    scoring, a frozen stage's frozen layers and no_grad blocks run the layer as it was."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters(False)))


def _fp32_forward(base: type) -> Callable:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type) or not _backward_follows(self, x):
            return base.forward(self, x)
        with torch.autocast(x.device.type, enabled=False):
            return base.forward(self, x.float())               # (B, C, H, W) fp32 in, fp32 out
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


TWEAKS = {
    "fp32_depthwise": Tweak(_is_depthwise, _fp32_forward, "fp32 depthwise", frozenset({"bf16"}),
                            frozenset({False, True})),
    "nchw_odd_batchnorm": Tweak(_is_odd_batchnorm, _nchw_forward, "NCHW BatchNorm at widths not ÷16",
                                frozenset({"fp32", "bf16"}), frozenset({True})),
}


def available_tweaks(model: nn.Module) -> tuple[str, ...]:
    """The tweaks ``model`` has layers for, in TWEAKS order."""
    return tuple(name for name, t in TWEAKS.items() if any(t.selects(m) for m in model.modules()))


def tweaks_for(available: tuple[str, ...], precision: str, channels_last: bool) -> tuple[str, ...]:
    """Of ``available``, those that mean something at this precision and memory format."""
    return tuple(t for t in available if precision in TWEAKS[t].precisions and channels_last in TWEAKS[t].channels_last)


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
