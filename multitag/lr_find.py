"""`multitag lr-find`: the learning-rate range test (Smith 2017; fastai's ``lr_find``).

Train from the recipe's starting weights for ``steps`` batches while the learning rate grows
geometrically from ``start`` to ``end``, record the loss of every batch, and suggest the rate where
the loss falls fastest, before it blows up. Nothing is kept of the trained weights: the sweep
costs ``steps`` training batches and answers "what optim.lr (or stages.N.lr) should I use?".

Decisions
- Same data, split, cache, model, loss, freezing, optimizer and runtime as `multitag train` of the
  same config (engine.setup_job, build_optimizer and train_step are reused), so the suggestion is
  for exactly that training. A staged recipe sweeps one stage (``stage``, default the first), with
  its freezing and its head/backbone learning-rate ratio kept: every parameter group's rate is
  scaled together and the rate reported is the stage's (the head's) one.
- Stopping: the sweep ends early when an exponential moving average of the loss (beta 0.9,
  bias-corrected) passes 4x its minimum, or a loss is not finite: past that point the curve says
  nothing more.
- Suggestion: a tenth of the rate at the lowest loss (fastai's ``lr_min``; Smith's and Howard's rule of
  thumb), the loss smoothed by a centred moving average over a tenth of the steps (a causal average
  lags: with fastai's beta 0.98 its minimum sits ~50 steps, several decades, late). Checked on the
  demo recipe: the suggestion is 2-3e-3 from sweeps with 5-15-step windows, the recipe trains at 3e-3.
  fastai's newer "valley" rule (half-way along the longest decreasing stretch) was tried and
  dropped here: the flat start of the sweep counts as part of the stretch, and on the demo it
  said 7e-5 to 5e-4 depending on the window.
- Output folder: lr_find.csv (lr, loss, smoothed loss per step) and lr_find.png (the curve with the
  suggestion marked). It holds split.csv as a run does, but never model weights, so it is not a run.
"""
from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multitag import distributed
from multitag.config import Config
from multitag.errors import UserError

SMOOTHING = 0.9           # EMA weight of the previous smoothed loss (the early stop's average)
BLOW_UP = 4.0             # stop once the smoothed loss exceeds this multiple of its minimum
MIN_STEPS = 5


@dataclass
class LrFindResult:
    suggested_lr: float        # a tenth of min_loss_lr (see the module doc)
    min_loss_lr: float         # where the smoothed loss is lowest (too high to train at)
    steps: int                 # batches run
    stopped_early: bool        # the loss blew up before the last rate
    setting: str               # what to pass: --set optim.lr=... or --set stages.N.lr=...
    csv: str
    plot: str


def lr_find(cfg: Config, out_dir: str | Path, *, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            stage_index: int = 0, log=print) -> LrFindResult:
    """Run the range test for ``cfg`` (its data in cfg.data.path) into ``out_dir``; see the module doc."""
    from multitag.config_checks import check_config
    from multitag.data.prepare import require_data
    from multitag.engine import TrainingDiverged, build_optimizer, resolved_config, setup_job, train_step
    from multitag.finetune import apply_freeze, frozen_batchnorm_to_eval, resolve_stages
    from multitag.plots import lr_curve
    from multitag.progress import track

    check_sweep(start, end, steps)
    check_config(cfg)
    require_data(cfg.data)          # before out_dir is made
    if distributed.launched():
        raise UserError("lr-find runs in one process; start it without torchrun.")
    stages = resolve_stages(cfg)
    if not 0 <= stage_index < len(stages):
        raise UserError(f"--stage {stage_index}: the recipe has {len(stages)} stage"
                        f"{'s' if len(stages) > 1 else ''} (0 to {len(stages) - 1}).")
    stage = stages[stage_index]
    if stage.cache_features:
        raise UserError(f'stage {stage_index} ("{stage.name}") trains the head on cached features; sweep it with '
                        f"--set stages.{stage_index}.cache_features=false (the rate found holds for it too).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolved_config(cfg)
    job = setup_job(cfg, out, None, log)
    model, loader = job.model, job.train_loader
    apply_freeze(model, stage.freeze)
    optimizer = build_optimizer(cfg, model, stage)
    ratios = [g["lr"] / stage.lr for g in optimizer.param_groups]     # head/backbone ratios, kept
    lrs = np.geomspace(start, end, steps)
    losses: list[float] = []
    average, best = 0.0, math.inf
    model.train()
    frozen_batchnorm_to_eval(model)
    torch.manual_seed(cfg.train.seed)
    batches = track(_endless(loader, cfg.train.seed), steps, "lr-find")
    for step, (lr, batch) in enumerate(zip(lrs, batches)):
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        try:
            losses.append(train_step(model, None, job.loss_fn, batch, job.rt, cfg, optimizer, (0, step)))
        except TrainingDiverged:               # a non-finite loss: the curve ends here
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * losses[-1]
        smoothed = average / (1 - SMOOTHING ** len(losses))        # bias-corrected: no pull towards 0 at first
        best = min(best, smoothed)
        if len(losses) >= MIN_STEPS and smoothed > BLOW_UP * best:
            break
    if len(losses) < MIN_STEPS:
        raise UserError(f"the loss was not finite within {len(losses) + 1} steps from lr {start:g}; "
                        "lower the start rate (--start).")
    lrs = lrs[:len(losses)]
    smoothed = centred_mean(np.asarray(losses), max(3, steps // 10))
    lowest = float(lrs[int(np.argmin(smoothed))])
    suggested = lowest / 10
    key = f"stages.{stage_index}.lr" if cfg.stages else "optim.lr"
    result = LrFindResult(suggested, lowest, len(losses), len(losses) < steps,
                          f"{key}={suggested:.2g}", str(out / "lr_find.csv"), str(out / "lr_find.png"))
    _write_csv(out / "lr_find.csv", lrs, losses, smoothed)
    lr_curve(lrs, np.asarray(losses), smoothed, suggested, out / "lr_find.png")
    return result


def check_sweep(start: float, end: float, steps: int) -> None:
    if not (0 < start < end and math.isfinite(end)):
        raise UserError(f"the sweep needs 0 < --start < --end, got start {start:g} and end {end:g}.")
    if steps < MIN_STEPS:
        raise UserError(f"--steps must be at least {MIN_STEPS}, got {steps}.")


def _endless(loader, seed: int):
    """The training loader's batches, epoch after epoch (a short dataset is swept over several)."""
    for epoch in itertools.count():
        yield from loader.iterate(epoch, seed)


def centred_mean(losses: np.ndarray, window: int) -> np.ndarray:
    """Moving average over ``window`` steps centred on each (odd window; the ends padded with their
    own value), (n,): no lag, so the minimum stays at the rate where it happened."""
    half = window // 2
    padded = np.pad(losses, half, mode="edge")
    return np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid")


def _write_csv(path: Path, lrs: np.ndarray, losses: list[float], smoothed: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, (lr, loss, s) in enumerate(zip(lrs, losses, smoothed)):
            writer.writerow([i + 1, f"{lr:.6g}", f"{loss:.6g}", f"{s:.6g}"])
