"""Typed run configuration: dataclasses with working defaults, YAML recipes, ``--set a.b=v`` overrides.

A recipe YAML mirrors these sections (data, model, optim, sched, train, aug). Any key that is
not a field is a user error naming the closest valid key; values are converted to the
field's declared type, so ``--set train.epochs=3`` gives an int and a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitag.errors import UserError, did_you_mean

RECIPE_DIR = Path(__file__).parent / "configs"


PRUNE_AFTER_DAYS = 30      # `multitag cache prune`'s default: image caches unused this many days go

# The choices of the enumerated fields below (config_checks.py checks them before any work).
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "triangle", "cosine", "plateau", "none")
DEVICES = ("auto", "cpu", "cuda")           # and cuda:N
PRECISIONS = ("auto", "fp32", "bf16")


def cache_root() -> Path:
    """Where multitag keeps derived files (image caches, precision choices, demo data):
    $MULTITAG_CACHE, else $XDG_CACHE_HOME/multitag, else ~/.cache/multitag."""
    if os.environ.get("MULTITAG_CACHE"):
        return Path(os.environ["MULTITAG_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multitag"


@dataclass
class DataConfig:
    path: str = ""                    # CSV / JSON / folder; see data/formats.py for the formats
    format: str = "auto"              # auto | csv | csv_onehot | folder | coco | voc | yolo
    image_size: int = 64              # working size: images are squashed to size×size once, in the cache
    image_root: str = ""              # folder that relative image paths are relative to, tried before the
                                      # annotation file's own folder (empty = only the format's own places)
    cache_dir: str = ""               # empty = <cache root>/images; root = $MULTITAG_CACHE or ~/.cache/multitag
    on_bad_image: str = "error"       # error | skip (skipped images are listed, never silent)
    oversample_to: int = 0            # repeat train images with rare labels until each label has ~this many (0 = off)
    oversample_max_repeat: float = 10.0  # cap of one image's repeats per epoch, so labels that co-occur with
                                      # rare ones do not explode (0 = no cap)
    split_seed: int = 0               # seed of the 70/15/15 iterative stratification
    split_fractions: tuple = (0.7, 0.15, 0.15)  # train/val/test of data without a split; data with train
                                      # (and test) but no val rows: val = val/(train+val) of the train rows
    mean: tuple = ()                  # normalisation; empty = the model's own (ImageNet stats unless the
    std: tuple = ()                   # model's weights expect others); stored in model.json with the weights


@dataclass
class ModelConfig:
    name: str = "simple_cnn"          # `multitag models` lists the names; timm/<arch> for any timm model, timm/<arch>.<tag>
                                      # with that pretrained tag's mean/std (e.g. timm/resnet18.a1_in1k)
    args: dict = field(default_factory=dict)  # extra keyword arguments of the model builder
    weights: str = ""                 # local .safetensors / .pth / .pth.tar / .ckpt file to initialise from (no downloads)
    weights_prefix: str = ""          # take only the file's keys under this prefix (e.g. "student." of a file that
                                      # holds several models); empty = automatic (a shared module./model. is dropped)


@dataclass
class OptimConfig:
    name: str = "adamw"               # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    wd_bn_bias: bool = False          # also decay biases and normalisation weights (1-D tensors); off as in
                                      # timm/fastai, on for airbench (which decays its BN shifts and biases)
    momentum: float = 0.9             # sgd only
    betas: tuple = (0.9, 0.999)       # adam/adamw only


@dataclass
class SchedConfig:
    name: str = "onecycle"            # onecycle | triangle | cosine | plateau | none
    warmup_epochs: float = 1.0        # cosine: linear warm-up length
    pct_start: float = 0.25           # onecycle, triangle: fraction of steps spent warming up
    start_factor: float = 0.2         # triangle: LR at step 0 as a fraction of the peak
    end_factor: float = 0.0           # triangle: LR at the last step as a fraction of the peak
    factor: float = 0.5               # plateau: LR multiplier on a plateau
    patience: int = 2                 # plateau: epochs without improvement before cutting the LR
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    loss: str = "auto"                # auto (bce for multi-label, ce for single-label) | bce | focal | asl | ce
    label_smoothing: float = 0.0      # ce only
    class_weights: str = "none"       # none | balanced: pos_weight_c = negatives_c / positives_c on the train
                                      # rows, clipped to [1, 50], multiplies the positive term (bce, focal, asl)
    focal_gamma: float = 2.0          # focal (Lin et al. 2017): focusing γ; 0 = BCE
    focal_alpha: float | None = None  # focal: weight α of positives, 1-α of negatives; null = unweighted
                                      # (the paper's detection setting is 0.25)
    asl_gamma_neg: float = 4.0        # asl (Ridnik et al. 2021): focusing γ- of negatives
    asl_gamma_pos: float = 0.0        # asl: focusing γ+ of positives (4 / 0 / 0.05: the authors' COCO setting)
    asl_clip: float = 0.05            # asl: probability margin m; negatives with p < m cost nothing
    grad_clip: float = 0.0            # max gradient norm; 0 = off
    early_stop_patience: int = 0      # epochs without val improvement before stopping; 0 = off
    seed: int = 0
    device: str = "auto"              # auto (cuda if present) | cpu | cuda
    precision: str = "auto"           # auto (measured per machine) | fp32 | bf16
    channels_last: str = "auto"       # auto (measured with precision) | true | false
    compile: bool = False             # torch.compile the model
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    eval_batch_size: int = 0          # val/test scoring batch; 0 = train.batch_size (on a CPU, scoring at
                                      # 32 ran 1.2-1.8x the img/s of 256 for 128-224 px ResNet-18 / Lite0)
    report: bool = True               # write RUN_DIR/report/index.html (test split, else val) after training
    ema: float = 0.0                  # decay of an exponential moving average of the weights (e.g. 0.999);
                                      # the average is what is evaluated and saved; 0 = off
    lookahead: float = 0.0            # airbench's lookahead (lookahead.py): every lookahead_every steps from epoch
                                      # lookahead_from_epoch on, the weights are pulled back to a slow average whose
                                      # decay rises as base^every · progress³ (airbench: 0.95); 0 = off
    lookahead_every: int = 5
    lookahead_from_epoch: int = 3     # 0-based epoch of the stage where it starts
    track_test: bool = False          # benchmarks only: also score the test split after every epoch into
                                      # metrics.jsonl (test_<metric>); never used to pick the epoch or stop
    # Gradient accumulation and distributed training (torchrun / --nproc). batch_size is the global
    # batch of one optimizer step whatever the process count: each process computes
    # batch_size / (processes × accumulate) images per forward pass, so results and the LR stay put.
    accumulate: int = 1               # micro-batches per optimizer step (per process)
    sync_bn: bool = False             # distributed on CUDA: BatchNorm statistics over the whole global batch
    dist_timeout_s: float = 600.0     # distributed: a collective waiting longer (hung/lost process) fails the job
    dist_setup_timeout_s: float = 3600.0  # distributed: how long ranks wait while rank 0 reads the data, builds
                                      # the image cache and measures the runtime


@dataclass
class AugConfig:
    """Training augmentation. A field left unset (null) takes the value of ``preset``; a field you set
    — in the recipe, with --set or in Python, even to the preset's own value — always wins.
    ``resolve_aug`` applies this rule; AUG_PRESETS below lists each preset's values."""
    preset: str = "light"             # none | light (flip + mild crop) | standard | strong (+ TrivialAugment)
    hflip: bool | None = None
    scale: tuple | None = None        # random-resized-crop area range; (1, 1) = no crop
    ratio: tuple | None = None        # random-resized-crop aspect range
    rotate: float | None = None       # max degrees of random rotation
    translate: float | None = None    # max shift as a fraction of the side (CIFAR's pad-4 crop ≈ 0.125);
                                      # whole pixels (reflect pad + crop) when no crop/rotation is set
    color_jitter: float | None = None  # brightness/contrast/saturation strength (0 = off)
    erasing: float | None = None      # probability of random erasing per image
    trivial_augment: bool | None = None  # one random TrivialAugmentWide op per image (uint8, before the rest)
    alternate_flip: bool | None = None  # with hflip: each image mirrored on every other epoch (airbench) rather
                                      # than by a fresh coin each epoch
    # Batch mixing, as timm's Mixup in "batch" mode (data/mixing.py): after the augmentations above, a
    # batch is mixed with probability mix_prob, image i with a partner, by one λ for the whole batch; the
    # targets mix by the same λ (soft targets). Off in every preset.
    mixup: float | None = None        # MixUp (Zhang et al. 2018): Beta(α, α) for λ; x = λ·x + (1-λ)·x_partner; 0 = off
    cutmix: float | None = None       # CutMix (Yun et al. 2019): Beta(α, α); a box of area 1-λ pasted from the
                                      # partner, λ then recomputed from the box clipped to the image; 0 = off
    mix_prob: float | None = None     # chance that a batch is mixed (with mixup or cutmix on)
    mix_switch_prob: float | None = None  # with both on: chance of CutMix for a mixed batch, else MixUp


_NO_AUG = {"hflip": False, "scale": (1.0, 1.0), "ratio": (0.75, 1.3333), "rotate": 0.0, "translate": 0.0,
           "color_jitter": 0.0, "erasing": 0.0, "trivial_augment": False, "alternate_flip": False,
           "mixup": 0.0, "cutmix": 0.0, "mix_prob": 1.0, "mix_switch_prob": 0.5}
# Named augmentation recipes: every AugConfig field except `preset`. "light" is what multitag did
# before presets existed; "standard" is the Inception-ResNet reference's flip/crop/±15°/jitter;
# "strong" is timm-style crop + flip + TrivialAugment + erasing (TA has its own colour and rotation ops).
AUG_PRESETS: dict[str, dict] = {
    "none": _NO_AUG,
    "light": {**_NO_AUG, "hflip": True, "scale": (0.7, 1.0)},
    "standard": {**_NO_AUG, "hflip": True, "scale": (0.6, 1.0), "rotate": 15.0, "color_jitter": 0.3},
    "strong": {**_NO_AUG, "hflip": True, "scale": (0.5, 1.0), "trivial_augment": True, "erasing": 0.25},
}


def resolve_aug(aug: AugConfig) -> AugConfig:
    """The augmentation that runs: unset (None) fields filled from ``aug.preset``, set fields kept."""
    if aug.preset not in AUG_PRESETS:
        raise UserError(f'unknown aug.preset "{aug.preset}"{did_you_mean(aug.preset, AUG_PRESETS)}.')
    preset = AUG_PRESETS[aug.preset]
    return dataclasses.replace(aug, **{k: v for k, v in preset.items() if getattr(aug, k) is None})


@dataclass
class StageConfig:
    """One stage of a staged fine-tune (e.g. head only → all layers → polish at a lower LR).

    Optimizer type, weight decay and schedule shape (pct_start, warm-up) come from optim/sched;
    the stage sets its own length, LR and schedule, and the LR is exactly the one given here.
    """
    name: str = ""
    epochs: int = 1
    lr: float = 1e-3                  # head LR (and the backbone's, times backbone_lr_mult)
    sched: str = "onecycle"           # onecycle | triangle | cosine | plateau | none (constant LR)
    freeze: tuple = ()                # parameter-name patterns to freeze (fnmatch); "backbone" = all but the head
    backbone_lr_mult: float = 1.0     # discriminative LR: backbone LR = lr × this
    cache_features: bool = False      # frozen backbone: compute the head's input features once (no
                                      # augmentation) and train only the linear head on them — seconds per epoch


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty = one stage from train/optim/sched
    recipe: str = ""                  # name of the recipe this config came from
    notes: str = ""                   # free text: what the recipe reproduces, its published numbers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or say why not."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise UserError(f'"{key}" is a section; give its fields, e.g. {key}.<field>=value.')
        return _build(typ, value, prefix=key + ".")
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise UserError(f'"{key}" must be a list; write it as a YAML list of entries.')
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        if value is None:            # an optional field set to null: unset (e.g. an aug field → its preset)
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
        if typ is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
            return tuple(value)
        if typ is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        name = getattr(typ, "__name__", str(typ))
        raise UserError(f'"{key}" must be a {name}, got {value!r}; fix the value in the recipe or --set.') from None
    return value


def _build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a (possibly partial) dict, rejecting unknown keys."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise UserError(f'unknown config key "{prefix}{key}"{did_you_mean(key, types_)}.')
        kwargs[key] = _convert(value, types_[key], prefix + key)
    return cls(**kwargs)


def data_config_from_dict(values: dict) -> DataConfig:
    return _build(DataConfig, values or {}, prefix="data.")


def config_from_dict(values: dict) -> Config:
    return _build(Config, values or {})


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. ``train.epochs``."""
    keys = []
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, prefix + name + ".")
        elif typing.get_origin(typ) is list and dataclasses.is_dataclass(typing.get_args(typ)[0]):
            keys.append(prefix + name)                                          # the whole list, as YAML
            keys += all_keys(typing.get_args(typ)[0], prefix + name + ".N.")   # N = list index
        else:
            keys.append(prefix + name)
    return keys


def _closest_key(pattern: str, valid: list[str]) -> str:
    """The did-you-mean suffix for an unknown key: the same field in another section first (train.lr ->
    optim.lr, as fastai and timm put the LR with the training settings), else the closest spelling."""
    leaf = pattern.split(".")[-1]
    same_field = [k for k in valid if k.split(".")[-1] == leaf]
    if same_field:
        return " (did you mean " + " or ".join(f'"{k}"' for k in same_field) + "?)"
    return did_you_mean(pattern, valid)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; unknown keys name the closest valid key."""
    values = cfg.to_dict()
    valid = all_keys()
    for item in overrides:
        if "=" not in item:
            raise UserError(f'--set expects key=value, got "{item}"; e.g. --set train.epochs=3.')
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        pattern = ".".join("N" if p.isdigit() else p for p in parts)    # stages.1.lr → stages.N.lr
        if pattern not in valid:
            # model.args.<anything> is free-form: it is passed to the model builder.
            if not (len(parts) >= 3 and parts[:2] == ["model", "args"]):
                raise UserError(f'unknown config key "{key}"{_closest_key(pattern, valid)}.')
        node = values
        for p in parts[:-1]:
            if isinstance(node, list):
                if int(p) >= len(node):
                    raise UserError(f'"{key}": there are only {len(node)} entries; indices start at 0.')
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return config_from_dict(values)


def list_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """A recipe name (see `multitag recipes`), a YAML path, or None for the defaults; then overrides."""
    values: dict = {}
    if source:
        recipes = list_recipes()
        path = Path(source)
        if source in recipes:
            path = recipes[source]
        elif not path.exists():
            raise UserError(f'no recipe or config file "{source}"{did_you_mean(source, recipes)}.')
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
            raise UserError(f"{path} is not valid YAML (line {line}); fix the syntax.") from None
        if not isinstance(values, dict):
            raise UserError(f"{path} must hold a mapping of sections (data:, model:, train:, ...).")
        values.setdefault("recipe", path.stem)
    cfg = config_from_dict(values)
    return apply_overrides(cfg, overrides or [])


def describe_recipes() -> list[dict]:
    """Name, file and notes (what it reproduces) of each bundled recipe."""
    out = []
    for name, path in list_recipes().items():
        values = yaml.safe_load(path.read_text()) or {}
        out.append({"name": name, "path": str(path), "notes": " ".join(str(values.get("notes", "")).split())})
    return out
