"""Checks of a run's settings before any work: every choice a known name, every number in its range.

``check_config`` runs first in training, before the run directory, the image cache or the runtime
measurement, so a typo (``sched.name=cosin``) or an impossible value (``train.batch_size=0``) is
one sentence naming the key, what it must be and how to set it, instead of a traceback minutes in,
and nothing is written that a fixed ``--resume`` would have to undo.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from multitag.config import (AUG_PRESETS, DEVICES, OPTIMIZERS, PRECISIONS, SCHEDULES, Config, OptimConfig,
                             SchedConfig, TrainConfig)
from multitag.errors import UserError, did_you_mean


def check_config(cfg: Config) -> None:
    """Raise a UserError for the first setting that is not a valid choice or is out of range."""
    from multitag.data.cache import ON_BAD_IMAGE
    from multitag.data.formats import FORMATS
    from multitag.data.split import check_fractions
    from multitag.losses import CLASS_WEIGHTS, LOSSES, SIGMOID_LOSSES
    from multitag.models.registry import check_tta_flip, get_spec, too_small
    from multitag.runtime import parse_switch

    spec = get_spec(cfg.model.name)
    choices = {
        "data.format": ("auto", *FORMATS), "data.on_bad_image": ON_BAD_IMAGE, "optim.name": OPTIMIZERS,
        "sched.name": SCHEDULES, "train.loss": LOSSES, "train.class_weights": CLASS_WEIGHTS,
        "train.precision": PRECISIONS, "aug.preset": tuple(AUG_PRESETS),
    }
    for key, valid in choices.items():
        _check_choice(key, _get(cfg, key), valid)
    device = cfg.train.device
    if not (device.startswith("cuda:") and device[5:].isdigit()):
        _check_choice("train.device", device, DEVICES, shown="auto, cpu, cuda or cuda:N")
    for key, test, must in RANGES:
        value = _get(cfg, key)
        if not _holds(test, value):
            raise _out_of_range(key, value, must)
    for key, size in (("data.mean", 3), ("data.std", 3), ("optim.betas", 2)):
        _check_tuple(key, _get(cfg, key), size, allow_empty=key.startswith("data."))
    if any(v <= 0 for v in cfg.data.std):
        raise _out_of_range("data.std", list(cfg.data.std), "positive per channel (pixels are divided by it)")
    if any(not 0 <= b < 1 for b in cfg.optim.betas):
        raise _out_of_range("optim.betas", list(cfg.optim.betas), "two numbers in [0, 1)")
    _check_ranges_of_aug(cfg)
    _check_mixing(cfg, spec)
    check_fractions(cfg.data.split_fractions)
    parse_switch(cfg.train.channels_last, "train.channels_last")
    if not cfg.stages and cfg.train.epochs < 1:
        raise _out_of_range("train.epochs", cfg.train.epochs, "at least 1")
    _check_settings_that_apply(cfg, spec, SIGMOID_LOSSES)
    for i, stage in enumerate(cfg.stages):
        _check_choice(f"stages.{i}.sched", stage.sched, SCHEDULES)
        for field, test, must in STAGE_RANGES:
            if not _holds(test, getattr(stage, field)):
                raise _out_of_range(f"stages.{i}.{field}", getattr(stage, field), must)
    _check_freeze_patterns(cfg)
    if not spec.own_tta:                           # airbench takes its tta_flip itself
        check_tta_flip(spec, cfg.model.args.get("tta_flip", False))
    if 0 < cfg.data.image_size < spec.min_size:    # the built model's probe would say it after caching
        raise too_small(cfg.model.name, cfg.data.image_size, spec.min_size)
    _check_weights(cfg)


def _check_weights(cfg: Config) -> None:
    """The weights settings, before minutes of image decoding: the file exists, a prefix comes with a file,
    and model.args.pretrained=true has weights to load (nothing is downloaded)."""
    from multitag.models.registry import configured_args
    from multitag.models.weights import check_weights_file

    m = cfg.model
    if m.weights:
        check_weights_file(m.weights)
    elif m.weights_prefix:
        raise UserError("model.weights_prefix selects keys of model.weights, which is not set; give the file with "
                        "--set model.weights=FILE or leave the prefix empty.")
    configured_args(m.name, m.args, pretrained=not m.weights)


def _check_freeze_patterns(cfg: Config) -> None:
    """Name patterns (other than "backbone") match parameters of the model: checked on an untrained
    copy with two classes (the names do not depend on the class count), not minutes later."""
    from multitag.finetune import BACKBONE, frozen_names
    from multitag.models.registry import build_model, configured_args

    patterns = [(i, p) for i, s in enumerate(cfg.stages) for p in s.freeze if p != BACKBONE]
    if not patterns:
        return
    args = {k: v for k, v in cfg.model.args.items() if k != "label_counts"}
    model = build_model(cfg.model.name, 2, **configured_args(cfg.model.name, args, False))
    for i, pattern in patterns:
        try:
            frozen_names(model, [pattern])
        except UserError as e:
            raise UserError(f"stages.{i}.freeze: {e}") from None


def _check_settings_that_apply(cfg: Config, spec, sigmoid_losses) -> None:
    """Settings that would be accepted and do nothing are refused, naming what does apply."""
    t = cfg.train
    if spec.own_loss:
        for key, unset in (("train.loss", "auto"), ("train.class_weights", "none"), ("train.label_smoothing", 0.0)):
            if _get(cfg, key) != unset:
                raise UserError(f"{key} does not apply to {cfg.model.name}, which trains on its own label-sequence "
                                f"loss; leave it at {unset}.")
    elif t.label_smoothing and t.loss in sigmoid_losses:
        raise UserError(f"train.label_smoothing applies to train.loss=ce (single-label), not {t.loss}; set it to 0 "
                        "or use ce.")


def unused_settings(cfg: Config) -> list[str]:
    """Notes on settings a run accepts but does not use: a staged run takes its length, LR and schedule
    from its stages, so train.epochs, optim.lr and sched.name away from their defaults do nothing.
    (Notes, not errors: a flat recipe given stages with --set keeps its own train.epochs.)"""
    if not cfg.stages:
        return []
    unused = [(key, field) for key, default, field in (("train.epochs", TrainConfig.epochs, "epochs"),
                                                        ("optim.lr", OptimConfig.lr, "lr"),
                                                        ("sched.name", SchedConfig.name, "sched"))
              if _get(cfg, key) != default]
    return [f"{key}={_get(cfg, key)} is not used: this run has {len(cfg.stages)} stage(s), which set their own "
            f"{field} (e.g. --set stages.0.{field}=...)" for key, field in unused]


def _check_choice(key: str, value, valid: tuple, shown: str = "") -> None:
    if value not in valid:
        raise UserError(f'{key} "{value}" is not a choice{did_you_mean(str(value), valid)}; '
                        f"set {shown or 'one of ' + ', '.join(valid)}.")


def _nonneg(v) -> bool:
    return v >= 0


def _positive(v) -> bool:
    return v > 0


def _fraction(v) -> bool:          # [0, 1)
    return 0 <= v < 1


# (key, test, what the value must be). Every float must also be finite (NaN fails every test).
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.image_size", _positive, "at least 1 (pixels per side)"),
    ("data.oversample_to", _nonneg, "0 (off) or more"),
    ("data.oversample_max_repeat", _nonneg, "0 (no cap) or more"),
    ("optim.lr", _nonneg, "0 or more"),
    ("optim.weight_decay", _nonneg, "0 or more"),
    ("optim.momentum", _fraction, "in [0, 1)"),
    ("sched.warmup_epochs", _nonneg, "0 or more"),
    ("sched.pct_start", _fraction, "in [0, 1) (the fraction of steps spent warming up)"),
    ("sched.start_factor", _nonneg, "0 or more"),
    ("sched.end_factor", _nonneg, "0 or more"),
    ("sched.factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("sched.patience", _nonneg, "0 or more"),
    ("sched.min_lr", _nonneg, "0 or more"),
    ("train.batch_size", _positive, "at least 1"),
    ("train.eval_batch_size", _nonneg, "0 (= train.batch_size) or more"),
    ("train.label_smoothing", _fraction, "in [0, 1)"),
    ("train.focal_gamma", _nonneg, "0 or more"),
    ("train.focal_alpha", lambda v: v is None or 0 <= v <= 1, "in [0, 1], or null for no weighting"),
    ("train.asl_gamma_neg", _nonneg, "0 or more"),
    ("train.asl_gamma_pos", _nonneg, "0 or more"),
    ("train.asl_clip", _fraction, "in [0, 1)"),
    ("train.grad_clip", _nonneg, "0 (off) or more"),
    ("train.early_stop_patience", _nonneg, "0 (off) or more"),
    ("train.threads", _nonneg, "0 (torch's default) or more"),
    ("train.ema", _fraction, "0 (off) or a decay in (0, 1), e.g. 0.999"),
    ("train.lookahead", _fraction, "0 (off) or a base in (0, 1), e.g. 0.95"),
    ("train.lookahead_every", _positive, "at least 1"),
    ("train.lookahead_from_epoch", _nonneg, "0 or more"),
    ("train.accumulate", _positive, "at least 1 (micro-batches per optimizer step)"),
    ("train.dist_timeout_s", _positive, "positive"),
    ("train.dist_setup_timeout_s", _positive, "positive"),
)
STAGE_RANGES = (
    ("epochs", _positive, "at least 1"),
    ("lr", _nonneg, "0 or more"),
    ("backbone_lr_mult", _nonneg, "0 or more"),
)


def _check_ranges_of_aug(cfg: Config) -> None:
    """The augmentation fields that are set (None = the preset's value, which is valid)."""
    aug = cfg.aug
    probability = (lambda v: 0 <= v <= 1, "in [0, 1]")
    for key, test, must in (("rotate", _nonneg, "0 or more degrees"), ("translate", _fraction, "in [0, 1)"),
                            ("color_jitter", _nonneg, "0 or more"), ("erasing", *probability),
                            ("mixup", _nonneg, "0 (off) or a Beta α above 0, e.g. 0.2"),
                            ("cutmix", _nonneg, "0 (off) or a Beta α above 0, e.g. 1.0"),
                            ("mix_prob", *probability), ("mix_switch_prob", *probability)):
        value = getattr(aug, key)
        if value is not None and not _holds(test, value):
            raise _out_of_range(f"aug.{key}", value, must)
    for key, lo_ok in (("scale", lambda lo: 0 < lo), ("ratio", lambda lo: lo > 0)):
        value = getattr(aug, key)
        if value is None:
            continue
        _check_tuple(f"aug.{key}", value, 2)
        lo, hi = value
        if not (lo_ok(lo) and lo <= hi and (key != "scale" or hi <= 1)):
            raise _out_of_range(f"aug.{key}", list(value), "[low, high] with 0 < low ≤ high"
                                + (" ≤ 1 (a fraction of the image area)" if key == "scale" else ""))


def _check_mixing(cfg: Config, spec) -> None:
    """aug.mixup / aug.cutmix: a model they can train, a batch they can pair, and their probabilities
    set only where they do something."""
    from multitag.config import resolve_aug
    from multitag.distributed import launched_world

    aug, resolved = cfg.aug, resolve_aug(cfg.aug)
    mixup, cutmix = resolved.mixup > 0, resolved.cutmix > 0
    for key, applies, needs in (("mix_prob", mixup or cutmix, "aug.mixup or aug.cutmix is on"),
                                ("mix_switch_prob", mixup and cutmix, "both aug.mixup and aug.cutmix are on")):
        if getattr(aug, key) is not None and not applies:
            raise UserError(f"aug.{key} applies only when {needs}; turn them on (e.g. aug.mixup=0.2 "
                            f"aug.cutmix=1.0) or leave aug.{key} unset.")
    if not (mixup or cutmix):
        return
    if spec.own_loss:
        raise UserError(f"aug.mixup and aug.cutmix do not apply to {cfg.model.name}, which trains on label sequences "
                        "(a mixed image has no sequence to emit); set both to 0.")
    procs, batch = launched_world().size, cfg.train.batch_size
    if batch % (2 * procs):
        step = math.lcm(2 * procs, procs * cfg.train.accumulate)     # pairs, and an even split (micro_batch_size)
        raise UserError(f"aug.mixup/aug.cutmix mix neighbouring images of each process's share of the batch, so "
                        f"train.batch_size={batch} must be a multiple of 2 × {procs} process(es); use e.g. "
                        f"{max(step, round(batch / step) * step)}.")


def _check_tuple(key: str, value: tuple, size: int, allow_empty: bool = False) -> None:
    if allow_empty and len(value) == 0:
        return
    if len(value) != size or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                     for v in value):
        raise _out_of_range(key, list(value), f"{size} numbers" + (" (one per RGB channel), or [] for the model's own"
                                                                   if allow_empty else ""))


def _holds(test: Callable[[Any], bool], value) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    try:
        return bool(test(value))
    except TypeError:          # e.g. a string where a number belongs (a Python-built Config)
        return False


def _out_of_range(key: str, value, must: str) -> UserError:
    return UserError(f"{key} must be {must}, got {value}; fix it in the recipe or with --set {key}=...")


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
