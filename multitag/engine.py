"""Training: fit() reads like the recipe — data, model, loss, optimizer, schedule; epochs of
train → evaluate on val → keep the best; then restore the best, calibrate on val, test.

Every epoch ends with an atomic checkpoint, and all randomness of an epoch derives from
(seed, epoch), so ``--resume`` after a kill reproduces the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from multitag import __version__, distributed
from multitag.calibration import fit_thresholds
from multitag.checkpoint import (MODEL_META, MODEL_WEIGHTS, TRAIN_META, TRAIN_STATE, load_model_state,
                                 load_tensors, model_state, optimizer_tensors, read_checkpoint_meta, read_json,
                                 restore_optimizer, save_tensors, write_json)
from multitag.config import OPTIMIZERS, SCHEDULES, Config, StageConfig, config_from_dict
from multitag.config_checks import check_config, unused_settings
from multitag.data.loader import BatchLoader, describe_oversampling, label_counts, repeat_factors, shard_bounds
from multitag.data.prepare import PreparedData, prepare, require_data
from multitag.data.mixing import BatchMix
from multitag.data.transforms import BatchAugment, normalize
from multitag.ema import ModelEMA
from multitag.errors import UserError, did_you_mean
from multitag.fileio import append_line, atomic_write_text, read_jsonl
from multitag.finetune import (FeatureTable, apply_freeze, check_feature_cache, frozen_batchnorm_to_eval,
                               head_inputs, param_groups, resolve_stages)
from multitag.inference import logits_of, scores_from_logits
from multitag.lookahead import Lookahead
from multitag.losses import build_loss, describe_pos_weight, loss_count, training_loss
from multitag.models import build_model, count_parameters, get_spec
from multitag.models.registry import check_input_size, configured_args
from multitag.models.weights import init_from_file
from multitag.progress import track
from multitag.summary import evaluate_scores, monitor_name
from multitag.runtime import Runtime, choose_device, choose_runtime

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """What an epoch boundary needs to continue: saved in checkpoint.json beside the tensors."""
    epoch: int = 0                 # epochs completed, counted across stages (seeds derive from it)
    stage: int = 0                 # index of the current stage
    stage_epoch: int = 0           # epochs completed in the current stage
    best_value: float = -math.inf  # best val metric across all stages so far
    best_epoch: int = -1
    bad_epochs: int = 0            # epochs since the last improvement (early stopping, per stage)
    stopped: bool = False          # the current stage stopped early


@dataclass
class Job:
    """The fixed parts of a training run that every step needs."""
    cfg: Config
    run: Path
    data: PreparedData
    train_loader: BatchLoader
    val_loader: BatchLoader
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    rt: Runtime
    n_params: int
    log: object = print
    ema: ModelEMA | None = None     # train.ema > 0: the weight average that is evaluated and saved


# --- building blocks --------------------------------------------------------------------------

def build_optimizer(cfg: Config, model: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the stage's trainable parameters (head / backbone LR groups)."""
    o = cfg.optim
    groups = param_groups(model, stage, o.weight_decay, o.wd_bn_bias)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=stage.lr, betas=o.betas, **_fused(groups))
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=stage.lr, betas=o.betas, **_fused(groups))
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=o.momentum, nesterov=True)
    raise UserError(f'unknown optimizer "{o.name}"{did_you_mean(o.name, OPTIMIZERS)}.')


def _fused(groups: list[dict]) -> dict:
    """{"fused": True} when every parameter is a float tensor on the CPU or a CUDA GPU: one fused kernel
    per step instead of torch's default Python loop over tensors on the CPU (AdamW step of ResNet-18,
    2 cores: 24 ms fused vs 114 ms; benchmarks/RESULTS.md, "Performance (issue 9)")."""
    params = [p for g in groups for p in g["params"]]
    fusable = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fusable else {}


def build_scheduler(cfg: Config, optimizer, stage: StageConfig, steps_per_epoch: int):
    """Returns (scheduler or None, steps_per_batch: bool). Per-batch schedules step every batch.

    Every schedule peaks at (or, for "none", stays at) each group's configured LR: OneCycle gets
    the groups' LRs as max_lr, so a stage's LR is never silently replaced by a scheduler default.
    """
    s, total = cfg.sched, stage.epochs * steps_per_epoch
    peak = [g["lr"] for g in optimizer.param_groups]
    if stage.sched == "none":
        return None, False
    if stage.sched == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=max(total, 1),
                                                   pct_start=onecycle_pct_start(s.pct_start, total)), True
    if stage.sched == "triangle":
        # Smith's linear one-cycle as airbench runs it: start_factor → 1 at pct_start → end_factor, the
        # momentum left as configured (torch's OneCycleLR also cycles it 0.95 → 0.85 → 0.95).
        top = max(1, int(s.pct_start * total))

        def triangle(step: int) -> float:
            if step < top:
                return s.start_factor + (1 - s.start_factor) * step / top
            return 1 + (s.end_factor - 1) * min(1.0, (step - top) / max(1, total - top))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, triangle), True
    if stage.sched == "cosine":
        warm = max(1, int(s.warmup_epochs * steps_per_epoch))
        floor = s.min_lr / stage.lr if stage.lr > 0 else 0.0

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if stage.sched == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=s.factor,
                                                          patience=s.patience, min_lr=s.min_lr), False
    raise UserError(f'unknown scheduler "{stage.sched}"'
                    f'{did_you_mean(stage.sched, SCHEDULES)}.')


def onecycle_pct_start(pct_start: float, total: int) -> float:
    """pct_start for torch's OneCycleLR over ``total`` steps. Its warm-up phase ends at step
    pct_start·total - 1 and it divides by that phase's length, so a warm-up of exactly one step
    (e.g. 0.25 of 4 steps) raises ZeroDivisionError: such a run warms up over two steps instead,
    or not at all when it has only two."""
    if pct_start * total != 1:
        return pct_start
    return 2 / total if total > 2 else 0.0


def make_loaders(cfg: Config, data: PreparedData, log=print) -> tuple[BatchLoader, BatchLoader]:
    """Train loader (oversampled when data.oversample_to > 0, augmented) and val loader; logs both choices."""
    t, mean, std = data.table, cfg.data.mean, cfg.data.std
    common = dict(targets=t.targets, ignore=t.ignore, mean=mean, std=std)
    rows = data.rows("train")
    repeats = None
    if cfg.data.oversample_to:
        targets, ignore = t.targets[rows], t.ignore[rows]
        repeats = repeat_factors(targets, ignore, cfg.data.oversample_to, cfg.data.oversample_max_repeat)
        log(describe_oversampling(t.class_names, *label_counts(targets, ignore, repeats), repeats))
    augment, mix = BatchAugment(cfg.aug, mean, std), BatchMix.of(cfg.aug)
    log(f"augmentation: {augment.describe()}")
    if mix is not None:
        cached = [st.name for st in cfg.stages if st.cache_features]       # heads trained on unmixed features
        log(f"mixing: {mix.describe()}" + (f" (not in stage {', '.join(cached)}: cached features are not mixed)"
                                            if cached else ""))
    micro_batch_size(cfg)                     # the global batch must split evenly over processes and steps
    shard = (distributed.world().rank, distributed.world().size)
    train = BatchLoader(data.cache, rows, batch_size=cfg.train.batch_size, shuffle=True, repeats=repeats,
                        augment=augment, mix=mix, drop_last=True, shard=shard, **common)
    val = BatchLoader(data.cache, data.rows("val"), batch_size=cfg.train.eval_batch_size, shard=shard, **common)
    return train, val


def micro_batch_size(cfg: Config) -> int:
    """Images per forward pass of one process: the global batch / (processes × accumulation steps)."""
    n, steps, batch = distributed.world().size, cfg.train.accumulate, cfg.train.batch_size
    if batch % (n * steps) or 0 < cfg.train.eval_batch_size < n:      # 0: the training batch (resolved_config)
        raise UserError(f"train.batch_size={batch} is the global batch and must split evenly into {n} process(es) × "
                        f"{steps} accumulation step(s); use a multiple of {n * steps}, such as "
                        f"{max(1, round(batch / (n * steps))) * n * steps}, and a train.eval_batch_size of at least {n}.")
    return batch // (n * steps)


def model_meta(cfg: Config, data: PreparedData, rt: Runtime, state: TrainState, n_params: int) -> dict:
    """model.json: everything needed to rebuild the model and its exact preprocessing, and its provenance."""
    t = data.table
    return {
        "format_version": 1,
        "multitag_version": __version__,
        "model": {"name": cfg.model.name, "args": cfg.model.args, "num_parameters": n_params},
        "class_names": t.class_names,
        "multi_label": t.multi_label,
        "input_size": cfg.data.image_size,
        "resize": "squash",
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "thresholds": None,
        "monitor": monitor_name(t.multi_label),
        "best_epoch": state.best_epoch,
        "best_value": state.best_value if math.isfinite(state.best_value) else None,   # None: no val split
        "runtime": rt.describe(),
        "data": {"path": str(Path(cfg.data.path).resolve()), "format": cfg.data.format,
                 "hash": data.data_hash, "num_images": len(t), "skipped": len(data.skipped)},
        "recipe": cfg.to_dict(),
    }


# --- one epoch, evaluation ----------------------------------------------------------------------

def train_one_epoch(model, loader: BatchLoader, loss_fn, optimizer, scheduler, per_batch: bool, rt: Runtime,
                    cfg: Config, epoch: int, ddp=None) -> tuple[float, float]:
    """One pass over the training rows; returns (mean loss, (head) learning rate of the last batch).

    ``ddp``: the DistributedDataParallel wrapper of ``model`` (distributed.wrap), None in one process.
    """
    model.train()
    frozen_batchnorm_to_eval(model)
    # dropout etc.: a function of (seed, epoch), and of the rank so processes drop different units
    torch.manual_seed(cfg.train.seed * 100_003 + epoch + 1_000_003 * distributed.world().rank)
    total, count = 0.0, 0
    batches = loader.iterate(epoch, cfg.train.seed)
    if distributed.is_main():
        batches = track(batches, len(loader), f"epoch {epoch + 1}")
    for i, batch in enumerate(batches):
        lr = max(g["lr"] for g in optimizer.param_groups)      # the head's LR when backbone LRs are lower
        loss = train_step(model, ddp, loss_fn, batch, rt, cfg, optimizer, (epoch, i))
        if scheduler is not None and per_batch:
            scheduler.step()
        size = len(batch.index if batch.whole is None else batch.whole)      # the global batch
        total += loss * size
        count += size
    return distributed.all_sum(total) / max(count, 1), lr


def train_step(model, ddp, loss_fn, batch, rt: Runtime, cfg: Config, optimizer,
               where: tuple[int, int]) -> float:
    """One optimizer step on one global batch (gradients accumulated, clipped); returns its loss share.
    ``where``: (epoch, batch) for the divergence message."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, ddp, loss_fn, batch, rt, cfg.train.accumulate, where)
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return loss


def accumulate_gradients(model, ddp, loss_fn, batch, rt: Runtime, steps: int,
                         where: tuple[int, int]) -> float:
    """Forward + backward of this process's part of one global batch, in ``steps`` micro-batches;
    returns this process's share of the global batch's loss (the shares sum to it over processes).

    Each micro-batch's loss is weighted by its share of what the whole batch's loss averages over
    (losses.loss_count), times the process count that DDP's gradient averaging divides by, so the
    summed gradient is exactly the global batch's; in one process with one step the weight is 1.
    Only the last micro-batch synchronises gradients (no_sync before it).
    """
    total = loss_count(model, loss_fn, *batch.whole_labels())
    n, procs, share = len(batch.index), distributed.world().size, 0.0
    for k in range(steps):
        lo, hi = shard_bounds(n, k, steps)
        x = rt.prepare_input(batch.images[lo:hi])
        y, ignore = batch.targets[lo:hi].to(rt.device), batch.ignore[lo:hi].to(rt.device)
        weight = loss_count(model, loss_fn, batch.targets[lo:hi], batch.ignore[lo:hi]) / total * procs
        sync = ddp is None or k == steps - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with rt.autocast():
                loss = training_loss(model, loss_fn, x, y, ignore) if ddp is None else ddp(x, y, ignore)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the training loss became {loss.item()} at epoch {where[0] + 1}, batch {where[1] + 1}; the last "
                    "good checkpoint is kept — lower optim.lr or set train.grad_clip=1.0 and train again.")
            (loss if weight == 1.0 else loss * weight).backward()
        share += loss.item() * weight / procs
    return share


def evaluate(model, loader: BatchLoader, loss_fn, rt: Runtime, data: PreparedData) -> dict:
    """Loss, scores and metrics on a split (thresholds 0.5 for multi-label). Distributed: each process
    scores its share of every batch; the logits are gathered and put back in ``loader.rows`` order."""
    index = []

    def images():
        for b in loader.iterate():
            if len(b.index):      # a short last batch may leave nothing for some processes
                index.append(b.index)
                yield b.images
    logits = logits_of(model, images(), rt)
    if loader.shard[1] > 1:     # every process scored its share: gather them (loaders made unsharded score all)
        logits = distributed.reassemble(logits, np.concatenate(index), loader.rows)
    rows = torch.from_numpy(loader.rows)
    if hasattr(getattr(model, "_orig_mod", model), "sequence_loss"):
        loss = own_objective_loss(model, loss_fn, loader, rt)      # what train_loss measures too
    else:
        loss = loss_fn(logits, loader.targets[rows], loader.ignore[rows]).item()
    scores = scores_from_logits(logits, data.table.multi_label).numpy()
    return {"loss": loss, "scores": scores, "rows": loader.rows}


@torch.no_grad()
def own_objective_loss(model, loss_fn, loader: BatchLoader, rt: Runtime) -> float:
    """The mean training objective on a split, for a model with its own (CNN-RNN: the teacher-forced
    label-sequence loss): val_loss then measures what train_loss does, not the configured loss on
    beam-search scores. Weighted like training (losses.loss_count); summed over processes."""
    model.eval()
    total, count = 0.0, 0.0
    for b in loader.iterate():
        if not len(b.index):
            continue
        n = loss_count(model, loss_fn, b.targets, b.ignore)
        with rt.autocast():
            loss = training_loss(model, loss_fn, rt.prepare_input(b.images), b.targets.to(rt.device),
                                 b.ignore.to(rt.device))
        total, count = total + loss.item() * n, count + n
    return distributed.all_sum(total) / max(distributed.all_sum(count), 1.0)


def init_pixels(data: PreparedData, rows, cfg: Config, n: int = 5000) -> torch.Tensor:
    """(≤ n, 3, S, S) normalised, unaugmented training images spread evenly over ``rows`` (tables are
    often sorted by class) for a model's data-dependent init; deterministic, so every rank agrees."""
    pick = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
    return normalize(data.cache.get_batch(np.unique(pick)), cfg.data.mean, cfg.data.std)


def test_score(job: Job, model, monitor: str) -> dict:
    """train.track_test (benchmarks): this epoch's test metric, timed apart from the epoch's seconds.
    Logged only: the epoch is picked, and training stopped, on val alone."""
    t, rows, start = job.data.table, job.data.rows("test"), time.perf_counter()
    if len(rows) == 0:
        return {}
    loader = BatchLoader(job.data.cache, rows, t.targets, t.ignore, batch_size=job.cfg.train.eval_batch_size,
                         mean=job.cfg.data.mean, std=job.cfg.data.std, shard=job.val_loader.shard)   # as val
    test = evaluate(model, loader, job.loss_fn, job.rt, job.data)
    value = evaluate_scores(test["scores"], t.targets[rows], t.ignore[rows], t.multi_label)[monitor]
    return {f"test_{monitor}": value, "test_seconds": time.perf_counter() - start}


# --- the recipe ---------------------------------------------------------------------------------

def fit(cfg: Config, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False, log=print,
        runtime: dict | None = None) -> Path:
    """Train per the config into ``out_dir``; with resume=True continue from its last checkpoint.
    A directory that already holds a run is refused unless ``overwrite`` (which deletes it first).
    ``runtime``: a checkpoint's runtime record to train with instead of measuring one (ablate).

    Under torchrun every process calls this; rank 0 alone reads and writes ``out_dir`` (distributed.py).
    """
    check_config(cfg)
    require_data(cfg.data)          # before config.yaml is written into a run that cannot start
    t = cfg.train
    with distributed.session(t.device, t.dist_timeout_s, t.dist_setup_timeout_s):
        return _fit(cfg, Path(out_dir), resume, overwrite, log, runtime)


def _fit(cfg: Config, run: Path, resume: bool, overwrite: bool, log, runtime: dict | None) -> Path:
    main = distributed.is_main()
    if main:
        if not resume:
            check_new_run(run, overwrite)
        run.mkdir(parents=True, exist_ok=True)
    cfg = resolved_config(cfg)
    for note in unused_settings(cfg) if main else []:
        log(f"note: {note}")
    if main:
        atomic_write_text(run / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if distributed.world().size > 1:     # the machine's cores shared among its processes
        torch.set_num_threads(distributed.cpu_threads(cfg.train.threads))
    elif cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    saved = read_checkpoint_meta(run) if main and resume else None
    saved = distributed.broadcast_object(saved)
    if resume and main:
        remove_write_leftovers(run, log)
        if saved is None:          # killed before its first checkpoint: epoch 1 again, its old line dropped
            _truncate_metrics(run / METRICS_FILE, 0)
            log(f"{run} has no checkpoint yet: training from epoch 1")

    job = setup_job(cfg, run, saved, log, runtime)
    state = TrainState(**saved["state"]) if saved else TrainState()
    if saved and main:
        _truncate_metrics(run / METRICS_FILE, state.epoch)
        log(f"resuming {run} after epoch {state.epoch} (stage {state.stage + 1})")
    stages = resolve_stages(cfg)
    while state.stage < len(stages):
        run_stage(job, stages, state, saved if saved and saved["state"]["stage"] == state.stage else None)
        state.stage, state.stage_epoch, state.bad_epochs, state.stopped = state.stage + 1, 0, 0, False
    return finish(job, state)


TRAINED_FILES = (METRICS_FILE, MODEL_WEIGHTS, TRAIN_STATE)     # what a run has after its first epoch


def check_new_run(run: Path, overwrite: bool) -> None:
    """A new run never lands on an old one: its weights, config and metrics would mix with the new
    run's (metrics.jsonl appended to, the old best weights kept when no new epoch beat them). A run
    that stopped before its first epoch (bad data, a wrong setting) holds nothing to keep: it is
    trained over, so the fixed command works as typed."""
    if not any((run / name).exists() for name in TRAINED_FILES):
        return
    if not overwrite:
        raise UserError(f"{run} already holds a training run; continue it with `multitag train --resume {run}`, "
                        "replace it with --overwrite, or choose another --out.")
    shutil.rmtree(run)


def resolved_config(cfg: Config) -> Config:
    """A copy with an absolute data path and an unset data.mean/std filled with the model's own
    (e.g. [-1, 1] scaling for EfficientNet-Lite weights), so training, model.json and inference
    all use what the weights expect; an unset train.eval_batch_size is the training batch size."""
    spec = get_spec(cfg.model.name)
    cfg = copy.deepcopy(cfg)
    cfg.data.path = str(Path(cfg.data.path).resolve()) if cfg.data.path else ""   # eval/report work from any cwd
    cfg.data.mean = tuple(cfg.data.mean) or spec.mean
    cfg.data.std = tuple(cfg.data.std) or spec.std
    cfg.train.eval_batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    return cfg


def setup_job(cfg: Config, run: Path, saved: dict | None, log, pinned: dict | None = None) -> Job:
    """Data (split fixed, pixels decoded once), model, loss and the measured runtime (or ``pinned``: a
    runtime record as a checkpoint stores it, e.g. of an ablation's first variant, used unmeasured)."""
    data = prepare_in_turn(cfg, run, saved is not None, log)
    t = data.table
    if len(data.rows("train")) == 0:
        raise UserError(f"{t.source} has no usable train images after the split; add images or a split column.")
    if len(data.rows("val")) == 0:
        check_no_val(cfg, t, log)
    if data.skipped:
        total = len(t) + len(t.extra.get("skipped", []))     # rows the reader dropped are not in t
        log(f"skipped {len(data.skipped)} of {total} images (listed in {run / 'skipped.txt'})")
        if distributed.is_main():
            (run / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in data.skipped))
    train_loader, val_loader = make_loaders(cfg, data, log)
    log(f"data: {t.source}: {len(data.rows('all'))} images, {t.num_classes} classes "     # usable ones
        f"({'multi' if t.multi_label else 'single'}-label); train {len(train_loader.rows)}, "
        f"val {len(val_loader.rows)}, test {len(data.rows('test'))}")

    torch.manual_seed(cfg.train.seed)
    args = dict(cfg.model.args)
    if get_spec(cfg.model.name).wants_label_counts:
        # e.g. CNN-RNN orders label sequences by training-set frequency; the counts travel in
        # model.json's args so a reloaded model decodes in the same order.
        rows = train_loader.rows
        args["label_counts"] = ((t.targets[rows] > 0.5) & ~t.ignore[rows]).sum(0).astype(int).tolist()
        cfg.model.args = args
    model = build_model(cfg.model.name, t.num_classes,
                        **configured_args(cfg.model.name, args, pretrained=not cfg.model.weights))
    check_input_size(model, cfg.model.name, cfg.data.image_size)
    if cfg.model.weights:
        init_from_file(model, cfg.model.name, cfg.model.weights, prefix=cfg.model.weights_prefix, log=log)
    elif hasattr(model, "init_from_data") and not saved:     # e.g. airbench's patch whitening
        model.init_from_data(init_pixels(data, train_loader.rows, cfg))
    train_rows = train_loader.rows
    loss_fn = build_loss(cfg.train, t.multi_label, t.targets[train_rows], t.ignore[train_rows],
                         soft_targets=train_loader.mix is not None)
    if getattr(loss_fn, "pos_weight", None) is not None:      # class_weights=balanced: shown, like oversampling
        log(describe_pos_weight(t.class_names, loss_fn.pos_weight))
    if saved or pinned:   # the choice made at the start of the run (or of a sibling), so both compute alike
        record = saved["runtime"] if saved else pinned
        rt = Runtime(torch.device(distributed.device_name(record["device"])), record["precision"],
                     record["channels_last"], record.get("threads", 0), tuple(record.get("layer_tweaks", ())))
    else:
        rt = None
        if distributed.is_main():   # rank 0 measures (with one process's micro-batch); all compute alike
            example = data.cache.get_batch(train_loader.rows[:micro_batch_size(cfg)])
            example = BatchAugment(cfg.aug, cfg.data.mean, cfg.data.std)(example, torch.Generator().manual_seed(0))
            rt = choose_runtime(model, loss_fn, example, torch.from_numpy(t.targets[:len(example)]),
                                device=distributed.device_name(cfg.train.device), precision=cfg.train.precision,
                                channels_last=cfg.train.channels_last, key_extra=cfg.model.name, log=log,
                                threads=torch.get_num_threads() if cfg.train.threads or distributed.world().size > 1 else 0)
        rt = distributed.broadcast_object(rt)
        if distributed.world().size > 1:
            rt = dataclasses.replace(rt, device=choose_device(distributed.device_name(cfg.train.device)))
    if rt.threads:      # the thread count measured fastest here (runtime.candidates); kept on resume
        torch.set_num_threads(rt.threads)
    model = rt.prepare_model(model)
    if cfg.train.sync_bn and distributed.world().size > 1:
        if rt.device.type != "cuda":
            raise UserError("train.sync_bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernels); on the CPU "
                            "leave it off: each process then normalises with the statistics of its own micro-batch.")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)     # before DDP; same state-dict keys
    for loader in (train_loader, val_loader):     # GPU: uint8 batches go to (or live on) the device, augmented there
        loader.to(rt.device)
    if saved:
        tensors = _checkpoint_tensors(run, "model.")
        load_model_state(model, {k[6:]: v for k, v in tensors.items()}, str(run / TRAIN_STATE))
    ema = ModelEMA(model, cfg.train.ema) if cfg.train.ema else None
    if ema is not None and saved:
        ema.restore(_checkpoint_tensors(run, "ema."), saved["ema_updates"])
    n_params = count_parameters(model)
    if cfg.train.compile:
        model = torch.compile(model)
    init = (f"weights from {cfg.model.weights}" if cfg.model.weights
            else "packaged pretrained weights" if get_spec(cfg.model.name).pretrained
            and cfg.model.args.get("pretrained", True) else "random init")
    log(f"model: {cfg.model.name} ({n_params:,} parameters, {init}) on {rt.describe()}")
    frozen_random = [s.name for s in resolve_stages(cfg) if s.freeze] if init == "random init" else []
    if frozen_random:
        log(f"note: stage {', '.join(frozen_random)} freezes layers of a randomly initialised model, which then stay "
            "random; give pretrained weights with model.weights=FILE, or drop the freeze")
    return Job(cfg, run, data, train_loader, val_loader, model, loss_fn, rt, n_params, log, ema)


def check_no_val(cfg: Config, t, log) -> None:
    """Training without a val split (data.split_fractions val 0, as in a final fit on all the data):
    allowed, and said, where nothing depends on val; an error where something would."""
    if cfg.data.split_fractions[1] > 0:
        raise UserError(f"{t.source} has no usable val images after the split; add images or a split column.")
    needs = [name for name, on in (("sched.name=plateau", any(s.sched == "plateau" for s in resolve_stages(cfg))),
                                   ("train.early_stop_patience", cfg.train.early_stop_patience > 0)) if on]
    if needs:
        raise UserError(f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} a val split, and "
                        "data.split_fractions gives val 0; "
                        "give val a share (e.g. [0.85, 0.15, 0]) or turn them off.")
    log("no val split (data.split_fractions val 0): every epoch trains on all the train rows, the last epoch "
        "is the result" + (" and thresholds stay at 0.5 (a val split calibrates them)" if t.multi_label else ""))


def run_stage(job: Job, stages: list[StageConfig], state: TrainState, saved: dict | None) -> None:
    """Epochs of one stage: its own freezing, optimizer and schedule; best kept across stages."""
    cfg, t, stage = job.cfg, job.data.table, stages[state.stage]
    frozen = apply_freeze(job.model, stage.freeze)
    optimizer = build_optimizer(cfg, job.model, stage)
    scheduler, per_batch = build_scheduler(cfg, optimizer, stage, len(job.train_loader))
    if job.ema is not None:
        if stage.cache_features:
            raise UserError(f'stage "{stage.name}": train.ema does not work with cache_features; set train.ema=0.')
        optimizer.register_step_post_hook(lambda *_: job.ema.update())     # average after every step
    lookahead = None
    if cfg.train.lookahead:
        if stage.cache_features:
            raise UserError(f'stage "{stage.name}": train.lookahead does not work with cache_features; '
                            'set train.lookahead=0.')
        lookahead = Lookahead(job.model, cfg.train.lookahead, cfg.train.lookahead_every,
                              cfg.train.lookahead_from_epoch, len(job.train_loader), stage.epochs)
        optimizer.register_step_post_hook(lambda *_: lookahead.after_step())
        first = cfg.train.lookahead_from_epoch          # 0-based epoch of the stage
        job.log(f"lookahead {cfg.train.lookahead:g} every {cfg.train.lookahead_every} steps from epoch {first + 1} of "
                f"{stage.epochs}" + (": later than the last epoch, so it never runs" if first >= stage.epochs else ""))
    if saved and state.stage_epoch > 0:          # resuming inside this stage
        restore_optimizer(optimizer, _checkpoint_tensors(job.run, "optim."), saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    if len(stages) > 1:
        job.log(f"stage {state.stage + 1}/{len(stages)} \"{stage.name}\": {stage.epochs} epochs, lr {stage.lr:g}, "
                f"schedule {stage.sched}, {frozen} parameter tensors frozen")
    # What an epoch runs on: the whole model on images, or (cache_features) the head on features.
    net, train_loader, val_loader, rt = (feature_stage(job, stage) if stage.cache_features else
                                         (job.model, job.train_loader, job.val_loader, job.rt))
    ddp = distributed.wrap(net, job.loss_fn, rt.device)      # after freezing: DDP reduces what trains now
    scored = net if job.ema is None else job.ema.module      # what is evaluated and kept as the result
    monitor = monitor_name(t.multi_label)
    total_epochs = sum(s.epochs for s in stages)
    while state.stage_epoch < stage.epochs and not state.stopped:
        epoch, start = state.epoch, time.perf_counter()
        if not stage.cache_features and begin_model_epoch(job.model, epoch):
            ddp = distributed.wrap(net, job.loss_fn, rt.device)   # what trains changed: DDP must know
        if lookahead is not None:
            lookahead.begin_epoch(state.stage_epoch)
        train_loss, lr = train_one_epoch(net, train_loader, job.loss_fn, optimizer, scheduler, per_batch,
                                         rt, cfg, epoch, ddp=ddp)
        if lookahead is not None:
            lookahead.end_epoch()
        train_seconds = time.perf_counter() - start          # the training pass alone, for train_img_per_s
        has_val = len(val_loader.rows) > 0     # no val split (check_no_val): the latest epoch is the result
        if has_val:
            val = evaluate(scored, val_loader, job.loss_fn, rt, job.data)
            value = evaluate_scores(val["scores"], t.targets[val["rows"]], t.ignore[val["rows"]],
                                    t.multi_label)[monitor]
            if scheduler is not None and not per_batch:
                scheduler.step(value)
        improved = not has_val or value > state.best_value
        if improved:
            state.best_epoch, state.bad_epochs = epoch + 1, 0
            if has_val:
                state.best_value = value
        else:
            state.bad_epochs += 1
        state.epoch, state.stage_epoch = epoch + 1, state.stage_epoch + 1
        state.stopped = 0 < cfg.train.early_stop_patience <= state.bad_epochs
        seconds = time.perf_counter() - start
        row = {"epoch": epoch + 1, "stage": stage.name, "train_loss": train_loss,
               **({"val_loss": val["loss"], f"val_{monitor}": value} if has_val else {}),
               "lr": lr, "seconds": seconds, "steps": len(job.train_loader),     # optimizer steps
               "train_img_per_s": len(job.train_loader) * job.train_loader.batch_size / train_seconds}
        if cfg.train.track_test and not stage.cache_features:     # benchmarks: logged, never selects
            row.update(test_score(job, scored, monitor))
        if not distributed.is_main():      # rank 0 alone writes the run directory and the log
            continue
        # Order matters for a kill at any point: the metrics line (dropped on resume if the checkpoint
        # did not follow), then the best weights, then the checkpoint that marks the epoch done.
        append_line(job.run / METRICS_FILE, json.dumps(row))
        if improved:
            save_tensors(job.run / MODEL_WEIGHTS, model_state(job.model if job.ema is None else job.ema.module))
            write_json(job.run / MODEL_META, model_meta(cfg, job.data, job.rt, state, job.n_params))
        _save_checkpoint(job.run, job.model, optimizer, scheduler, state, job.rt, job.ema)
        job.log(f"epoch {epoch + 1}/{total_epochs}  train_loss {train_loss:.4f}  "
                + (f"val_loss {val['loss']:.4f}  val_{monitor} {value:.4f}  " if has_val else "")
                + f"lr {lr:.2e}  {seconds:.1f}s"
                + ("  *best*" if improved and has_val else "") + ("  (early stop)" if state.stopped else ""))


def begin_model_epoch(model: torch.nn.Module, epoch: int) -> bool:
    """Tell a model with an epoch schedule of its own (``set_epoch``, e.g. airbench's whitening-bias
    freeze) which 0-based epoch of the run begins; True when that changed which parameters train."""
    set_epoch = getattr(getattr(model, "_orig_mod", model), "set_epoch", None)
    return bool(set_epoch(epoch)) if set_epoch is not None else False


def feature_stage(job: Job, stage: StageConfig):
    """(head, train loader, val loader, runtime) for a stage that trains the linear head on features
    computed once: a frozen backbone gives the same features every epoch (without augmentation),
    so its forward pass is paid once instead of every epoch."""
    head = check_feature_cache(job.model, stage)
    start = time.perf_counter()
    t, mean, std = job.data.table, job.cfg.data.mean, job.cfg.data.std
    loaders = []
    for images in (job.train_loader, job.val_loader):
        plain = BatchLoader(job.data.cache, images.rows, t.targets, t.ignore, batch_size=job.cfg.train.eval_batch_size,
                            mean=mean, std=std)
        feats = head_inputs(job.model, (b.images for b in plain.iterate()), job.rt,       # (N, F)
                            own_view=images is job.train_loader)
        loaders.append(BatchLoader(FeatureTable(images.rows, feats), images.rows, t.targets, t.ignore,
                                   batch_size=images.batch_size, mean=mean, std=std, augment=_as_is,
                                   shuffle=images.shuffle, drop_last=images.drop_last, repeats=images.repeats,
                                   shard=images.shard))
    job.log(f"features of {len(job.train_loader.rows)} train + {len(job.val_loader.rows)} val images computed "
            f"once in {time.perf_counter() - start:.1f}s; training the head on them")
    return head, loaders[0], loaders[1], Runtime(job.rt.device, job.rt.precision, channels_last=False)


def _as_is(x: torch.Tensor, g: torch.Generator, part=None, flip=None) -> torch.Tensor:
    return x


def finish(job: Job, state: TrainState) -> Path:
    """The result is the best epoch, never the last one: reload it and calibrate thresholds on val."""
    t = job.data.table
    best = distributed.broadcast_tensors(load_tensors(job.run / MODEL_WEIGHTS) if distributed.is_main() else None)
    load_model_state(job.model, best, str(job.run / MODEL_WEIGHTS))
    if len(job.val_loader.rows) == 0:      # no val split: nothing to calibrate on; thresholds stay 0.5
        job.log(f"last epoch {state.best_epoch} kept (no val split); run directory: {job.run}")
        return job.run
    # fp32 scores, as predict applies the thresholds to (per-epoch val scoring uses the training runtime)
    val = evaluate(job.model, job.val_loader, job.loss_fn, job.rt.for_scoring(), job.data)
    if not distributed.is_main():
        return job.run
    meta = read_json(job.run / MODEL_META)
    targets, ignore = t.targets[val["rows"]], t.ignore[val["rows"]]
    if t.multi_label:
        meta["thresholds"] = fit_thresholds(val["scores"], targets, ignore).tolist()
    meta["metrics"] = {"val": evaluate_scores(val["scores"], targets, ignore, t.multi_label, meta["thresholds"],
                                              t.class_names)}
    write_json(job.run / MODEL_META, meta)
    # Resumed without a better epoch: the exported files still hold these weights, but the old thresholds.
    if t.multi_label and meta.get("export"):
        from multitag.export import refresh_metadata
        from multitag.predict import load

        refresh_metadata(load(job.run, device="cpu", backend="torch"), job.log)
    monitor = monitor_name(t.multi_label)
    # The epoch is picked on val scored as it trained (bf16 autocast where chosen, as timm validates under
    # AMP); model.json's val metrics are fp32, as predict scores. Both are said where they differ.
    picked, fp32 = f"{state.best_value:.4f}", f"{meta['metrics']['val'][monitor]:.4f}"
    if job.rt.precision != "fp32" and fp32 != picked:
        picked += f" under {job.rt.precision} as trained; {fp32} in fp32, as model.json and predict score"
    job.log(f"best epoch {state.best_epoch} (val {monitor} {picked}); run directory: {job.run}")
    return job.run


def _checkpoint_tensors(run: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with ``prefix``: read by rank 0, sent to the others."""
    tensors = None
    if distributed.is_main():
        tensors = load_tensors(run / TRAIN_STATE, prefix)     # only this part of the file is read
    return distributed.broadcast_tensors(tensors)


def prepare_in_turn(cfg: Config, run: Path, reuse_split: bool, log) -> PreparedData:
    """data.prepare for every process, without two of them building the same image cache at once.

    Rank 0 first: it reads the table, fixes the split (split.csv in the run) and builds or opens
    the cache. Then the first process of each other machine opens it (a cache directory on a shared
    filesystem) or builds its own copy (a local disk), and last the remaining processes of every
    machine open their machine's cache read-only. All use rank 0's split.
    """
    w = distributed.world()
    if w.size == 1:
        return prepare(cfg.data, run, reuse_split=reuse_split, log=log)
    data = prepare(cfg.data, run, reuse_split=reuse_split, log=log) if w.rank == 0 else None
    split = distributed.broadcast_object(list(data.split) if data is not None else None)   # waits for rank 0
    if w.rank != 0 and w.local_rank == 0:
        data = prepare(cfg.data, None, split=split, log=log)
    distributed.barrier()
    if w.local_rank != 0:
        data = prepare(cfg.data, None, split=split, log=log)
    return data


def _save_checkpoint(run: Path, model, optimizer, scheduler, state: TrainState, rt: Runtime,
                     ema: ModelEMA | None = None) -> None:
    tensors, optim_meta = optimizer_tensors(optimizer)
    tensors.update({f"model.{k}": v for k, v in model_state(model).items()})
    tensors.update(ema.tensors() if ema is not None else {})
    meta = {
        "state": vars(state),
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "runtime": {"device": str(rt.device), "precision": rt.precision, "channels_last": rt.channels_last,
                    "threads": rt.threads, "layer_tweaks": list(rt.layer_tweaks)},
        "ema_updates": ema.updates if ema is not None else 0,
    }
    save_tensors(run / TRAIN_STATE, tensors, meta)     # the commit point: tensors and state in one file
    write_json(run / TRAIN_META, meta)                 # a readable copy; --resume never trusts it alone


# Temporary files of writes cut short by a kill: fileio.atomic_write's ".NAME.XXXX.tmp" and the
# ".tmpXXXXXX" that safetensors' writer (Rust's tempfile crate) renames into place.
_LEFTOVER = re.compile(r"\.tmp[A-Za-z0-9]{6}|\..+\.[A-Za-z0-9_]+\.tmp")


def remove_write_leftovers(run: Path, log) -> None:
    """Delete temporary files that killed writes left in RUN (each can be a full copy of the weights)."""
    leftovers = [p for p in run.iterdir() if p.is_file() and _LEFTOVER.fullmatch(p.name)]
    for path in leftovers:
        path.unlink()
    if leftovers:
        log(f"removed {len(leftovers)} temporary file(s) of writes a kill cut short")


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint (written just before a kill), and a last line
    cut short by a power loss (append_line never leaves one, but an older version or the OS might)."""
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("epoch", math.inf) <= epochs_done]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def load_run_config(run: Path) -> Config:
    path = Path(run) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{run} has no {CONFIG_FILE}; --resume needs a run directory made by `multitag train`.")
    return config_from_dict(yaml.safe_load(path.read_text()))
