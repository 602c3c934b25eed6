"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically. Nothing is pickled.

A run directory holds
  model.safetensors   best weights            model.json      how to rebuild and use them
  checkpoint.safetensors / checkpoint.json    last epoch's full training state, for --resume
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from multitag.errors import UserError
from multitag.fileio import atomic_write, atomic_write_text, json_safe

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
TRAIN_STATE = "checkpoint.safetensors"
TRAIN_META = "checkpoint.json"


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; point to a run directory made by `multitag train`.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}); restore it from the run or retrain.") from None
    except UnicodeDecodeError:      # binary garbage where JSON should be
        raise UserError(f"{path} is not UTF-8 JSON text; restore it from the run or retrain.") from None
    except OSError as e:            # a directory, no permission, an I/O error
        raise UserError(f"cannot read {path} ({e.strerror}); check it is the run's file and readable.") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write ``tensors`` atomically; ``meta`` (JSON-able) travels in the same file's header, so the
    two are replaced together by one rename (see read_embedded_meta)."""
    # safetensors wants contiguous, non-shared CPU tensors.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {EMBEDDED_META: json.dumps(json_safe(meta))} if meta is not None else None
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


# The training checkpoint is tensors + JSON state. Written as two files, a kill between the two
# renames left epoch N's tensors beside epoch N-1's state, and --resume then trained epoch N twice
# (found by the kill campaign of benchmarks/reliability_report.py). The state therefore also lives
# in the tensors file's header, and --resume reads it from there: checkpoint.json is a readable copy.
EMBEDDED_META = "multitag_checkpoint"


def read_embedded_meta(path: Path) -> dict | None:
    """The JSON state saved inside a safetensors file by save_tensors(meta=...), or None when the file
    has none (written by an older version). A damaged header is a one-line UserError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(EMBEDDED_META)
        return None if text is None else json.loads(text)
    except (SafetensorError, OSError, ValueError) as e:     # ValueError: a header that is not JSON
        raise _unreadable(path, e) from None


def read_checkpoint_meta(run: Path) -> dict | None:
    """The training state of RUN's last checkpoint (None without one): the copy inside
    checkpoint.safetensors, which always matches its tensors; checkpoint.json for older runs."""
    run = Path(run)
    if (run / TRAIN_STATE).exists():
        meta = read_embedded_meta(run / TRAIN_STATE)
        if meta is not None:
            return meta
    return read_json(run / TRAIN_META) if (run / TRAIN_META).exists() else None


def load_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a format that cannot run code on load; nothing is unpickled);
    with ``prefix``, only those whose names start with it are read (e.g. "optim." of a checkpoint).

    A missing, truncated or tampered file is a one-line UserError, not safetensors' own exception.
    """
    if not Path(path).exists():
        raise UserError(f"{path} does not exist; point to a run directory made by `multitag train`.")
    try:
        if not prefix:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError) as e:   # OSError: a directory, no permission, an I/O error
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> UserError:
    reason = " ".join(str(e).split())
    return UserError(f"{path} is not a readable safetensors file ({reason}); it is truncated or was "
                     "changed: restore it from a copy of the run or train again.")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a (possibly torch.compile-wrapped) model, with plain key names."""
    model = getattr(model, "_orig_mod", model)
    return dict(model.state_dict())


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    model = getattr(model, "_orig_mod", model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{source} does not match the model: {len(missing)} missing keys "
                        f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
                        "use weights saved for this architecture.")


# --- optimizer state: tensors into safetensors, the rest into JSON -------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            elif value is not None:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        for k, v in group.items():   # JSON turned tuples (betas) into lists; torch accepts either
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                group[k] = float(v)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _match_parameter_layouts(optimizer)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments, SGD's momentum) its parameter's memory
    layout. The file stores them contiguous (NCHW) while a channels_last model's conv weights are
    NHWC, and torch's fused AdamW (engine._fused) walks the two buffers in memory order without
    checking their strides: a resumed channels_last run then paired each weight with another weight's
    moments (seen as a resume that left the unbroken run from its first step on)."""
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                slots[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
