"""Fine-tuning parts: stages, freezing by name pattern, discriminative learning rates, frozen BatchNorm.

A run is a list of stages (a plain run is one stage built from train/optim/sched). Each stage
freezes what it says, builds its own optimizer with a head group at ``lr`` and a backbone group
at ``lr × backbone_lr_mult``, and its own schedule whose peak/constant LR is exactly ``lr``.
"""
from __future__ import annotations

from fnmatch import fnmatch

import numpy as np
import torch
from torch import nn

from multitag.config import Config, StageConfig
from multitag.errors import UserError

BACKBONE = "backbone"


def resolve_stages(cfg: Config) -> list[StageConfig]:
    """The configured stages, or one stage equivalent to the flat train/optim/sched settings."""
    if cfg.stages:       # their epochs and schedules are checked before training (config_checks.py)
        return [s if s.name else StageConfig(**{**vars(s), "name": f"stage{i + 1}"}) for i, s in enumerate(cfg.stages)]
    return [StageConfig(name="train", epochs=cfg.train.epochs, lr=cfg.optim.lr, sched=cfg.sched.name)]


def head_module(model: nn.Module) -> nn.Module:
    """The classifier head: timm's get_classifier() where available, else the last nn.Linear."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot find the classifier head of {type(model).__name__}; freeze by name patterns instead.")
    return linears[-1]


def head_parameter_names(model: nn.Module) -> set[str]:
    head = head_module(model)
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in getattr(model, "_orig_mod", model).named_parameters() if id(p) in ids}


def apply_freeze(model: nn.Module, patterns) -> int:
    """Set requires_grad from the stage's freeze patterns; returns the number of frozen tensors.

    "backbone" freezes everything except the head. A pattern that matches nothing is an error
    (a typo would otherwise silently train everything).
    """
    frozen = frozen_names(model, patterns)
    for n, p in getattr(model, "_orig_mod", model).named_parameters():
        p.requires_grad_(n not in frozen)
    return len(frozen)


def frozen_names(model: nn.Module, patterns) -> set[str]:
    """The parameter names the patterns freeze; a pattern that matches nothing is a UserError."""
    names = [n for n, _ in getattr(model, "_orig_mod", model).named_parameters()]
    frozen: set[str] = set()
    for pat in patterns:
        if pat == BACKBONE:
            head = head_parameter_names(model)
            hits = {n for n in names if n not in head}
        else:
            hits = {n for n in names if fnmatch(n, pat)}
        if not hits:
            raise UserError(f'freeze pattern "{pat}" matches no parameter (e.g. {names[0]}, {names[-1]}); '
                            'use fnmatch patterns such as "layer1.*" or "backbone".')
        frozen |= hits
    return frozen


def frozen_batchnorm_to_eval(model: nn.Module) -> None:
    """Keep BatchNorm layers whose parameters are all frozen in eval mode (call after model.train()).

    A frozen layer must not drift: in train mode BN would keep updating its running statistics
    from the new data even though its affine weights are fixed.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def param_groups(model: nn.Module, stage: StageConfig, weight_decay: float, wd_bn_bias: bool = False) -> list[dict]:
    """Trainable parameters in two groups: head at stage.lr, backbone at stage.lr × backbone_lr_mult.

    Biases and normalisation weights (1-D tensors) get no weight decay, as in timm/fastai, unless
    ``wd_bn_bias`` (fastai's name; airbench decays them like the weights).
    """
    base = getattr(model, "_orig_mod", model)
    head = head_parameter_names(model)
    groups: dict[tuple[str, bool], list] = {}
    for n, p in base.named_parameters():
        if p.requires_grad:
            groups.setdefault(("head" if n in head else "backbone", wd_bn_bias or p.ndim > 1), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        lr = stage.lr if part == "head" else stage.lr * stage.backbone_lr_mult
        out.append({"params": params, "lr": lr, "weight_decay": weight_decay if decay else 0.0, "name": part})
    if not out:
        raise UserError(f'stage "{stage.name}" freezes every parameter; leave something to train.')
    return out


class FeatureTable:
    """Head-input features of some table rows, served like the image cache (``get_batch``)."""

    def __init__(self, rows: np.ndarray, features: torch.Tensor):
        self.features = features                                   # (N, F) float32, one per row
        self.position = {int(r): i for i, r in enumerate(rows)}
        self.valid = None

    def get_batch(self, index) -> torch.Tensor:
        return self.features[[self.position[int(r)] for r in index]]   # (B, F)


@torch.no_grad()
def head_inputs(model: nn.Module, batches, rt, own_view: bool = False) -> torch.Tensor:
    """(N, F) float32: what the classifier head receives, for eval-mode forward passes of the batches.

    A model with flip TTA (model.args.tta_flip) runs its head on the images, then on their mirrors
    ((2B, F) per batch): the mean of the two is returned, on which the linear head gives exactly the
    flip-averaged logits that validation scores; ``own_view``: each image's own features instead, as
    its training forward (no flip) sees them.
    """
    head = head_module(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    model.eval()
    features = []
    try:
        for x in batches:
            with rt.autocast():
                model(rt.prepare_input(x))
            f = torch.cat(captured)            # (V·B, F): V views of the batch, the images' own first
            captured.clear()
            features.append(f[:len(x)] if own_view else _views_mean(f, len(x)))
    finally:
        hook.remove()
    return torch.cat(features)


def _views_mean(f: torch.Tensor, b: int) -> torch.Tensor:
    """(B, F) mean of the (V·B, F) head inputs of V equally weighted views: one view, or an image and its mirror."""
    views = len(f) // b
    if views > 2:      # airbench's tta_translate (3 views, 6 with the flip) weighs them unequally: no mean fits
        raise UserError(f"cache_features cannot score this model's {views} test-time views on cached features "
                        "(only an image and its mirror); set model.args.tta_translate=false or cache_features: false.")
    return f.view(views, b, *f.shape[1:]).mean(0)


def check_feature_cache(model: nn.Module, stage: StageConfig) -> nn.Linear:
    """The linear head a cache_features stage trains; a clear error when the stage cannot cache."""
    head = head_module(model)
    if not isinstance(head, nn.Linear):
        raise UserError(f'stage "{stage.name}": cache_features needs a linear classifier head, and '
                        f"{type(head).__name__} is not one; set cache_features: false.")
    head_ids = {id(p) for p in head.parameters()}
    base = getattr(model, "_orig_mod", model)
    if any(p.requires_grad and id(p) not in head_ids for p in base.parameters()):
        raise UserError(f'stage "{stage.name}": cache_features needs a frozen backbone; add freeze: [backbone].')
    return head
