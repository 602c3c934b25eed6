"""One exception to bf16 autocast, measured rather than assumed: depthwise convolutions kept in fp32.

On this project's AMX CPUs, oneDNN's bf16 depthwise-conv backward is 3-4x slower than its fp32 one
(EfficientNet-Lite0's layers at batch 32, 224 px, channels_last, 2 threads: 172 vs 56 ms for
96 ch 3x3/2 on 113², 151 vs 38 for 144 ch 5x5/2 on 59², 80 vs 20 for 240 ch 5x5 on 28²), while its
pointwise 1x1 convs are fastest in bf16. So runtime.candidates adds "bf16 autocast, depthwise convs
in fp32" for models that have them, and the start-up measurement decides (benchmarks/RESULTS.md).

It is done by swapping each depthwise conv's class for a subclass whose forward leaves autocast for
the conv alone (input cast up to fp32, output fp32; the next layer casts down again). Parameters,
buffers and state-dict keys are unchanged, so checkpoints, EMA copies and exports are unaffected;
outside autocast (fp32 training, the predictor) the forward is the original one.
"""
from __future__ import annotations

import torch
from torch import nn

_FP32_CLASSES: dict[type, type] = {}


def is_depthwise(m: nn.Module) -> bool:
    """A grouped conv with one input channel per group (timm's Conv2dSame included)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def has_depthwise(model: nn.Module) -> bool:
    return any(is_depthwise(m) for m in model.modules())


def _fp32_class(base: type) -> type:
    if base not in _FP32_CLASSES:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_autocast_enabled(x.device.type):
                return base.forward(self, x)
            with torch.autocast(x.device.type, enabled=False):
                return base.forward(self, x.float())           # (B, C, H, W) fp32 in, fp32 out

        _FP32_CLASSES[base] = type(f"Fp32{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    return _FP32_CLASSES[base]


def keep_depthwise_fp32(model: nn.Module) -> int:
    """Make every depthwise conv of ``model`` run in fp32 under autocast (in place); returns how many."""
    n = 0
    for m in model.modules():
        if is_depthwise(m) and type(m) not in _FP32_CLASSES.values():
            m.__class__ = _fp32_class(type(m))
            n += 1
    return n
