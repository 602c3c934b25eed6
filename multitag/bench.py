"""`multitag bench`: how fast multitag trains and predicts here, side by side with a naive PyTorch loop,
in one process, on the same model, image size and images.

Sections (figures in images/s unless named otherwise):
  training   multitag's loop (engine.train_one_epoch over the decode-once uint8 cache, batched
             augmentation, the runtime measured for this machine, fused Adam/AdamW) against the loop
             the reference systems wrote (PIL decode + torchvision transforms per sample in a torch
             DataLoader, fp32, NCHW, torch's default Adam); then one row per lever: precision and
             memory format, 1 thread, the unfused optimizer, decoding every epoch, torch.compile
  pipeline   the data pipeline alone (cache gather + batched augmentation; the naive DataLoader) and
             its ratio to multitag's training step: far above 1 means the model sets the pace
  optimizer  one optimizer step alone, in ms: torch's CPU default loop, foreach, fused
  ceiling    how fast a step could run here: the model's training FLOPs per image and the fastest
             dense-conv GFLOP/s of each precision (multitag/ceiling.py); each training row's GFLOP/s is
             given as a share of its precision's peak, and the peak as a bound on the ratio to the naive loop
  inference  eager vs ONNX Runtime vs int8 on the model just trained (multitag/inference_speed.py)
  scaling    the training images repeated 1x, 4x, 16x through the cache: img/s and memory. The
             cache is a memory map, so anonymous memory stays flat; the mapped pages are the
             kernel's page cache (shown as file RSS, dropped under memory pressure, not swapped)

Every system runs once per round and rounds are interleaved, so a burst of load from another
process hits every system alike; a figure is a system's fastest round (other work only ever slows
a round down), with the median beside it, and the load average is recorded before and after.

The CLI's allocator setting (multitag/allocator.py: glibc keeps freed memory) is process-wide and cannot
be undone inside a process, so the naive loop's rows run with it too and its gain there (the naive fp32
NCHW step: ResNet-18 1.08x, EfficientNet-Lite0 1.73x) is not counted for multitag; run the bench with
MULTITAG_MALLOC=default for glibc's figures, and benchmarks/bench_allocator.py for process against process.
"""
from __future__ import annotations

import copy
import csv
import datetime
import hashlib
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from multitag import allocator, openmp
from multitag.config import Config, DataConfig, cache_root, list_recipes, load_config, resolve_aug
from multitag.data.cache import build_cache
from multitag.data.decode import load_and_resize
from multitag.data.loader import BatchLoader
from multitag.data.prepare import PreparedData, load_table, prepare
from multitag.data.transforms import BatchAugment
from multitag.errors import UserError
from multitag.layer_tweaks import available_tweaks
from multitag.models import build_model, count_parameters
from multitag.models.resnet_stem import relu_before_pool
from multitag.models.registry import configured_args
from multitag.progress import track
from multitag.runtime import Runtime, candidates, choose_device, choose_runtime, describe_cpu


@dataclass
class BenchOptions:
    data: str = "digits"          # "digits" (built-in mosaics, no files needed) or a dataset path
    model: str = "advanced_cnn"   # its recipe (configs/) sets normalisation, augmentation and optimizer
    image_size: int = 128
    batch_size: int = 32
    images: int = 512             # training images used (plus a quarter as many for validation)
    steps: int = 2                # timed training steps per system and round
    rounds: int = 3               # interleaved rounds
    device: str = "auto"          # auto | cpu | cuda
    threads: int = 0              # torch threads; 0 = torch's default
    compile: bool = False         # add a torch.compile row (compiling takes minutes on a CPU)
    naive_workers: int = 0        # DataLoader workers of the naive loop (0: decode in the training process)
    scaling: tuple = (1, 4, 16)   # dataset multiples of the scaling section; () = skip it
    inference: bool = True        # the inference section (exports ONNX and int8: ~1 min)
    inference_rounds: int = 10


@dataclass
class System:
    """One row of the training and pipeline sections: ``run(epoch, steps)`` processes ``steps`` batches."""
    section: str
    name: str
    run: Callable[[int, int], None]
    note: str = ""
    precision: str = "fp32"          # what its model step computes in, and with how many threads (0: torch's
    threads: int = 0                 # default): the ceiling section's peak it is held to


# --- data: one small labelled set that every section (export checks too) reads -------------------

def bench_dataset(opts: BenchOptions, log) -> tuple[str, str]:
    """(data path, format): the built-in digit mosaics, or a CSV of ``opts.images`` train and
    ``opts.images // 4`` val images of the given data (absolute paths, one 0/1 column per class)."""
    n_val = max(opts.batch_size, opts.images // 4)
    if opts.data == "digits":
        from multitag.demo_data import make_digit_mosaics

        out = cache_root() / f"bench_digits_{opts.images}_{n_val}"
        return str(make_digit_mosaics(out, {"train": opts.images, "val": n_val, "test": 0}, seed=0)), "csv"
    table = load_table(DataConfig(path=opts.data))
    split = np.array(table.split or [""] * len(table))
    train = np.flatnonzero(split == "train") if (split == "train").any() else np.arange(len(table))
    val = np.flatnonzero(split == "val") if (split == "val").any() else np.setdiff1d(train, _spread(train, opts.images))
    train, val = _spread(train, opts.images), _spread(val, n_val)      # tables are often sorted by class
    if len(train) < opts.batch_size or len(val) == 0:
        raise UserError(f"{opts.data} has {len(train)} train and {len(val)} val images; the bench needs at least "
                        f"--batch-size ({opts.batch_size}) train images and one val image.")
    key = hashlib.sha256(f"{Path(opts.data).resolve()}|{opts.images}|{n_val}|v2".encode()).hexdigest()[:12]
    path = cache_root() / "bench" / f"{key}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:      # single-label data keeps one "label" column (so: CE loss)
        w = csv.writer(f)
        w.writerow(["image", *(table.class_names if table.multi_label else ["label"]), "split"])
        for rows, name in ((train, "train"), (val, "val")):
            for i in rows:
                labels = ([int(v > 0.5) for v in table.targets[i]] if table.multi_label
                          else [table.class_names[int(np.argmax(table.targets[i]))]])
                w.writerow([table.paths[i], *labels, name])
    log(f"bench data: {len(train)} train + {len(val)} val images of {opts.data} ({path})")
    return str(path), "csv_onehot" if table.multi_label else "csv"


def _spread(rows: np.ndarray, n: int) -> np.ndarray:
    """Up to n of ``rows``, evenly spaced."""
    return rows if len(rows) <= n else rows[np.linspace(0, len(rows) - 1, n).astype(int)]


def bench_config(opts: BenchOptions, path: str, fmt: str) -> Config:
    """The model's recipe when there is one (else the defaults), at the bench's size and batch."""
    from multitag.engine import resolved_config

    recipe = opts.model if opts.model in list_recipes() else None
    cfg = load_config(recipe, [f"model.name={opts.model}", f"data.image_size={opts.image_size}",
                               f"train.batch_size={opts.batch_size}", f"train.device={opts.device}",
                               f"data.format={fmt}"])
    cfg.data.path = path
    return resolved_config(cfg)


# --- the naive reference loop: what the reference systems' scripts do ----------------------------

class NaiveImages(torch.utils.data.Dataset):
    """The reference scripts' dataset: every access opens the file with PIL and runs torchvision transforms."""

    def __init__(self, paths: list[str], targets: np.ndarray, transform):
        self.paths, self.targets, self.transform = paths, torch.from_numpy(targets), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.targets[i]     # (3, S, S) float32, (C,)


def naive_transform(cfg: Config):
    """torchvision (v1) transforms doing the recipe's augmentation per image, as the references did."""
    import torchvision.transforms as T

    a, size = resolve_aug(cfg.aug), cfg.data.image_size
    steps = ([T.RandomResizedCrop(size, scale=tuple(a.scale), ratio=tuple(a.ratio))]
             if tuple(a.scale) != (1.0, 1.0) else [T.Resize((size, size))])
    steps += [T.RandomCrop(size, padding=round(a.translate * size))] if a.translate > 0 else []
    steps += [T.RandomHorizontalFlip()] if a.hflip else []
    steps += [T.RandomRotation(a.rotate)] if a.rotate > 0 else []
    steps += [T.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter)] if a.color_jitter > 0 else []
    steps += [T.TrivialAugmentWide()] if a.trivial_augment else []
    steps += [T.ToTensor(), T.Normalize(cfg.data.mean, cfg.data.std)]
    return T.Compose(steps + ([T.RandomErasing(a.erasing)] if a.erasing > 0 else []))


def naive_systems(cfg: Config, data: PreparedData, model: torch.nn.Module, device: torch.device,
                  workers: int) -> list[System]:
    """The naive training loop (fp32, NCHW, torch's default Adam) and its DataLoader alone."""
    t, rows = data.table, data.rows("train")
    dataset = NaiveImages([t.paths[i] for i in rows], t.targets[rows], naive_transform(cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    batches = _forever(loader)
    loss_fn = torch.nn.BCEWithLogitsLoss() if t.multi_label else torch.nn.CrossEntropyLoss()
    optim = torch.optim.Adam if cfg.optim.name == "adam" else torch.optim.AdamW

    def trainer(threads: int) -> Callable[[int, int], None]:
        net = relu_before_pool(copy.deepcopy(model)).to(device)       # the stem as timm and the references run it
        optimizer = optim(net.parameters(), lr=cfg.optim.lr)

        def train(epoch: int, steps: int) -> None:
            net.train()
            with Runtime(device, "fp32", False, threads).thread_count():
                for _ in range(steps):
                    x, y = next(batches)
                    loss = loss_fn(net(x.to(device)), y.to(device))
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    loss.item()
        return train

    def pipeline(epoch: int, steps: int) -> None:
        for _ in range(steps):
            next(batches)

    note = f"PIL + torchvision per image, DataLoader workers {workers}, fp32 NCHW, {optim.__name__} for-loop"
    return [System("training", "naive PyTorch loop (reference)", trainer(0), note),
            System("training", "naive PyTorch loop, 1 thread", trainer(1), note + ", 1 thread", threads=1),
            System("pipeline", "naive DataLoader alone", pipeline, f"PIL + torchvision per image, workers {workers}")]


def _forever(loader):
    while True:
        yield from loader


# --- multitag's loop and its levers ----------------------------------------------------------------

@dataclass
class Bench:
    """What every multitag row shares: config, data, the initial model, its loss and the train loader."""
    cfg: Config
    data: PreparedData
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    loader: BatchLoader
    rt: Runtime                      # the runtime choose_runtime picked (the engine's choice)


def first_batches(loader: BatchLoader, steps: int) -> BatchLoader:
    """The same loader over just ``steps`` batches of rows, so one engine "epoch" is one timed round."""
    part = copy.copy(loader)
    part.rows, part.repeats = np.resize(loader.rows, steps * loader.batch_size), None
    return part


def engine_system(b: Bench, name: str, rt: Runtime, *, note: str = "", fused: bool = True, cache=None,
                  compile: bool = False) -> System:
    """A row trained by engine.train_one_epoch itself, on a copy of the model, with one lever changed."""
    from multitag.engine import build_optimizer, train_one_epoch
    from multitag.finetune import resolve_stages

    model = rt.prepare_model(copy.deepcopy(b.model))
    stage = resolve_stages(b.cfg)[0]
    optimizer = build_optimizer(b.cfg, model, stage)
    if not fused:       # torch's own choice on the CPU: a Python loop over the parameter tensors
        optimizer = type(optimizer)(model.parameters(), lr=stage.lr, foreach=False)
    net = torch.compile(model) if compile else model
    loader = copy.copy(b.loader)
    if cache is not None:
        loader.cache = cache
    loaders = {}

    def run(epoch: int, steps: int) -> None:
        part = loaders.setdefault(steps, first_batches(loader, steps))
        with rt.thread_count():
            train_one_epoch(net, part, b.loss_fn, optimizer, None, False, rt, b.cfg, epoch)

    return System("training", name, run, note or rt.describe(), rt.precision, rt.threads)


def pipeline_system(b: Bench) -> System:
    loaders = {}

    def run(epoch: int, steps: int) -> None:
        with b.rt.thread_count():         # as inside the training loop it feeds
            for _ in loaders.setdefault(steps, first_batches(b.loader, steps)).iterate(epoch, b.cfg.train.seed):
                pass

    return System("pipeline", "multitag pipeline alone", run,
                  f"uint8 cache gather + BatchAugment ({BatchAugment(b.cfg.aug, b.cfg.data.mean, b.cfg.data.std).describe()})")


class DecodeEveryRead:
    """An image-cache stand-in that decodes and resizes the files on every read: what each epoch costs
    without the decode-once cache (same decoder and resize, 2 threads as the cache build uses)."""

    def __init__(self, paths: list[str], size: int, workers: int = 2):
        self.paths, self.size, self.pool = paths, size, ThreadPoolExecutor(workers)

    def get_batch(self, indices, channels_last: bool = False) -> torch.Tensor:
        return torch.stack(list(self.pool.map(lambda i: load_and_resize(self.paths[i], self.size), indices)))


def multitag_systems(b: Bench, opts: BenchOptions) -> list[System]:
    rows = []
    for cand in candidates(b.rt.device, opts.threads, available_tweaks(b.model, b.rt.device), b.model):   # what choose_runtime measured
        rt = Runtime(b.rt.device, *cand)
        rows.append(engine_system(b, f"multitag, {rt.describe()}" + ("  [chosen]" if rt == b.rt else ""), rt))
    rows.append(engine_system(b, "multitag, unfused optimizer", b.rt, fused=False,
                              note=f"{b.rt.describe()}, {b.cfg.optim.name} for-loop (torch's CPU default)"))
    rows.append(engine_system(b, "multitag, decode every epoch", b.rt,
                              cache=DecodeEveryRead(b.data.table.paths, b.cfg.data.image_size),
                              note=f"{b.rt.describe()}, no cache: files decoded + resized per batch"))
    if opts.compile:
        rows.append(engine_system(b, "multitag + torch.compile", b.rt, compile=True,
                                  note=f"{b.rt.describe()}, compiled in the warm-up round"))
    return rows


# --- measuring ----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(systems: list[System], opts: BenchOptions, device: torch.device, log) -> dict[str, list[float]]:
    """Seconds per round of each system: one untimed warm-up step each, then interleaved rounds."""
    for s in systems:
        t0 = time.perf_counter()
        s.run(0, 1)
        _sync(device)
        log(f"  warm-up {s.name}: {time.perf_counter() - t0:.1f}s")
    seconds = {s.name: [] for s in systems}
    for r in track(range(opts.rounds), opts.rounds, "bench rounds"):
        for s in systems:
            t0 = time.perf_counter()
            s.run(r + 1, opts.steps)
            _sync(device)
            seconds[s.name].append(time.perf_counter() - t0)
    return seconds


def rate_rows(systems: list[System], seconds: dict[str, list[float]], images: int) -> list[dict]:
    return [{"section": s.section, "name": s.name, "img_s": images / min(seconds[s.name]),
             "img_s_median": images / statistics.median(seconds[s.name]), "note": s.note,
             **({"precision": s.precision, "threads": s.threads or torch.get_num_threads()}
                if s.section == "training" else {})} for s in systems]


def ceiling_rows(rows: list[dict], b: Bench, example: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """The ceiling section (multitag/ceiling.py): per precision and thread count of the training rows,
    the conv peak and the img/s it would allow; training rows gain their achieved GFLOP/s and its share
    of their own precision's and thread count's peak."""
    from multitag.ceiling import conv_peak, training_flops

    flops = training_flops(b.model, b.loss_fn, example, targets)
    kinds = sorted({(r["precision"], r["threads"]) for r in rows if r["section"] == "training"},
                   key=lambda k: (-k[1], ["fp32", "bf16"].index(k[0])))
    peaks = {}
    for precision, threads in kinds:
        with Runtime(b.rt.device, precision, True, threads).thread_count():
            peaks[precision, threads] = conv_peak(b.rt.device, precision, b.cfg.train.batch_size, b.cfg.data.image_size)
    naive = next(r["img_s"] for r in rows if r["name"] == "naive PyTorch loop (reference)")
    for r in rows:
        if r["section"] == "training":
            r["gflop_s"] = r["img_s"] * flops / 1e9
            r["of_peak"] = r["gflop_s"] / peaks[r["precision"], r["threads"]]["gflop_s"]
    return [{"section": "ceiling", "name": f"{_kind(p, n)}: every FLOP at the conv peak", "precision": p, "threads": n,
             "gflop_s": peak["gflop_s"], "img_s": peak["gflop_s"] * 1e9 / flops,
             "ratio": peak["gflop_s"] * 1e9 / flops / naive, "gflop_per_image": flops / 1e9,
             "note": f"{flops / 1e9:.2f} GFLOP per training image; peak of a {peak['shape']}"}
            for (p, n), peak in peaks.items()]


def _kind(precision: str, threads: int) -> str:
    return f"{precision}, {threads} thread{'s' * (threads > 1)}"


def optimizer_rows(model: torch.nn.Module, device: torch.device, rounds: int) -> list[dict]:
    """One AdamW step alone (ms) per implementation, on the model's parameters with random gradients."""
    model = copy.deepcopy(model).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"for-loop (torch's CPU default)": dict(foreach=False), "foreach": dict(foreach=True),
             "fused (multitag)": dict(fused=True)}
    optims = {k: torch.optim.AdamW(model.parameters(), 1e-4, **kw) for k, kw in kinds.items()}
    times = {k: [] for k in optims}
    for o in optims.values():
        o.step()
    for _ in range(max(3, rounds)):
        for k, o in optims.items():
            t0 = time.perf_counter()
            o.step()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    fastest = {k: min(v) for k, v in times.items()}
    return [{"section": "optimizer", "name": f"AdamW step, {k}", "ms": 1000 * t,
             "ratio": fastest["for-loop (torch's CPU default)"] / t, "note": f"{count_parameters(model):,} parameters"}
            for k, t in fastest.items()]


def memory() -> dict[str, float]:
    """MiB of this process: anonymous RSS (heap, tensors), file-backed RSS (mapped cache pages), peak RSS."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return {"rss_anon_mib": fields.get("RssAnon"), "rss_file_mib": fields.get("RssFile"),
            "peak_rss_mib": fields.get("VmHWM")}


def scaling_rows(b: Bench, opts: BenchOptions, log) -> list[dict]:
    """Training images repeated k times into a fresh cache: build time, one full pipeline epoch,
    a few training steps, and memory after them."""
    from multitag.engine import build_optimizer, train_one_epoch
    from multitag.finetune import resolve_stages

    t, rows, size = b.data.table, b.data.rows("train"), b.cfg.data.image_size
    model = b.rt.prepare_model(copy.deepcopy(b.model))
    optimizer = build_optimizer(b.cfg, model, resolve_stages(b.cfg)[0])
    out = []
    with tempfile.TemporaryDirectory(prefix="multitag-bench-") as tmp:
        for k in opts.scaling:
            paths = [t.paths[i] for i in rows] * k
            start = time.perf_counter()
            cache = build_cache(paths, size, tmp, progress=False)
            build_s = time.perf_counter() - start
            loader = BatchLoader(cache, np.arange(len(paths)), np.tile(t.targets[rows], (k, 1)),
                                 np.tile(t.ignore[rows], (k, 1)), batch_size=b.loader.batch_size,
                                 mean=b.cfg.data.mean, std=b.cfg.data.std, augment=b.loader.augment,
                                 shuffle=True, drop_last=True).to(b.rt.device)
            start = time.perf_counter()
            with b.rt.thread_count():
                seen = sum(len(batch.index) for batch in loader.iterate(0, b.cfg.train.seed))
            pipeline = seen / (time.perf_counter() - start)
            part = first_batches(loader, opts.steps)
            best = float("inf")
            for r in range(2):           # the first also warms the pages it reads
                start = time.perf_counter()
                with b.rt.thread_count():
                    train_one_epoch(model, part, b.loss_fn, optimizer, None, False, b.rt, b.cfg, r)
                _sync(b.rt.device)
                best = min(best, time.perf_counter() - start)
            out.append({"section": "scaling", "name": f"{k}x: {len(paths):,} images", "images": len(paths),
                        "cache_mib": cache.path.stat().st_size / 2**20, "cache_build_s": build_s,
                        "pipeline_img_s": pipeline, "train_img_s": len(part.rows) / best, **memory()})
            log(f"  scaling {k}x: {out[-1]}")
            del cache, loader, part
    return out


# --- the whole bench --------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "cpu": describe_cpu(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp_wait": openmp.wait_setting(),
            "malloc": allocator.state, "load_average_start": round(os.getloadavg()[0], 2)}


def run_bench(opts: BenchOptions, log=print) -> dict:
    """Every section; returns {"machine": {...}, "options": {...}, "rows": [...]}."""
    from multitag.engine import make_loaders, model_meta
    from multitag.losses import build_loss

    if opts.images < opts.batch_size or min(opts.steps, opts.rounds, opts.batch_size, opts.image_size) < 1:
        raise UserError(f"--images ({opts.images}) must be at least --batch-size ({opts.batch_size}), and "
                        "--steps, --rounds, --batch-size and --image-size at least 1.")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = choose_device(opts.device, "--device")
    info = machine(device)
    log(f"bench on {info['device']}, CPU {info['cpu']}, load {info['load_average_start']}")
    path, fmt = bench_dataset(opts, log)
    cfg = bench_config(opts, path, fmt)
    with tempfile.TemporaryDirectory(prefix="multitag-bench-run-") as tmp:
        run = Path(tmp)
        data = prepare(cfg.data, run, log=log)
        t = data.table
        train_loader, _ = make_loaders(cfg, data, log=lambda *a: None)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, t.num_classes, **configured_args(cfg.model.name, cfg.model.args, False))
        rows = train_loader.rows
        loss_fn = build_loss(cfg.train, t.multi_label, t.targets[rows], t.ignore[rows])
        example = next(first_batches(train_loader, 1).iterate()).images
        targets = torch.from_numpy(t.targets[rows[:len(example)]])
        rt = choose_runtime(model, loss_fn, example, targets,
                            device=opts.device, key_extra=cfg.model.name, threads=opts.threads, log=log)
        b = Bench(cfg, data, model, loss_fn, train_loader.to(device), rt)
        naive = naive_systems(cfg, data, model, device, opts.naive_workers)
        systems = [*naive[:2], *multitag_systems(b, opts), pipeline_system(b), naive[2]]
        log(f"timing {len(systems)} systems: {opts.rounds} interleaved rounds of {opts.steps} batches of "
            f"{opts.batch_size} at {opts.image_size} px ({cfg.model.name})")
        seconds = time_rounds(systems, opts, device, log)
        out = rate_rows(systems, seconds, opts.steps * opts.batch_size)
        _add_ratios(out)
        out += ceiling_rows(out, b, example, targets)
        out += optimizer_rows(model, device, opts.inference_rounds)
        if opts.inference:
            from multitag.checkpoint import MODEL_META, MODEL_WEIGHTS, model_state, save_tensors, write_json
            from multitag.engine import TrainState
            from multitag.inference_speed import inference_rows

            # A run directory for the exporters; the weights do not change inference speed.
            save_tensors(run / MODEL_WEIGHTS, model_state(model))
            write_json(run / MODEL_META, model_meta(cfg, data, rt, TrainState(best_epoch=1, best_value=0.0),
                                                    count_parameters(model)))
            log("inference: exporting ONNX + int8 and timing the backends")
            out += [{"section": "inference", "name": r.pop("backend"), **r}
                    for r in inference_rows(run, opts.inference_rounds, log)]
        if opts.scaling:
            log(f"scaling: the {len(rows)} training images x {', '.join(map(str, opts.scaling))}")
            out += scaling_rows(b, opts, log)
    info["load_average_end"] = round(os.getloadavg()[0], 2)
    info["runtime_chosen"] = rt.describe()
    info["round_spread"] = round_spread(out)
    return {"machine": info, "options": asdict(opts), "rows": out}


# Above this spread between a system's best and median round the machine is called noisy: on an idle
# Intel machine the spread was 1-2 %, on a KVM guest whose speed moved by a third within half an hour
# 10-25 % (RESULTS runs O and P), where only the ratios within one run mean something.
NOISY_SPREAD = 0.10


def round_spread(rows: list[dict]) -> float | None:
    """The largest (best − median) / best img/s over the training rows: how much the rounds disagreed."""
    spreads = [1 - r["img_s_median"] / r["img_s"] for r in rows if r["section"] == "training" and r.get("img_s")]
    return round(max(spreads), 3) if spreads else None


def _chosen_name(rows: list[dict]) -> str:
    return next(r["name"] for r in rows if r["name"].endswith("[chosen]"))


def _add_ratios(rows: list[dict]) -> None:
    """Training rows: speed-up over the naive loop. Pipeline rows: pipeline img/s ÷ training img/s of
    the loop it feeds (multitag's chosen runtime, or the naive loop)."""
    by_name = {r["name"]: r for r in rows}
    naive = by_name["naive PyTorch loop (reference)"]["img_s"]
    chosen = by_name[_chosen_name(rows)]["img_s"]
    for r in rows:
        if r["section"] == "training":
            r["ratio"] = r["img_s"] / naive
        elif r["name"] == "multitag pipeline alone":
            r["ratio"] = r["img_s"] / chosen
        else:
            r["ratio"] = r["img_s"] / naive


# --- printing -----------------------------------------------------------------------------------

SECTION_COLUMNS = {
    "training": [("img/s (best)", "img_s", "{:,.1f}"), ("median", "img_s_median", "{:,.1f}"),
                 ("× naive", "ratio", "{:.2f}×"), ("GFLOP/s", "gflop_s", "{:,.0f}"),
                 ("of peak", "of_peak", "{:.0%}")],
    "ceiling": [("conv peak GFLOP/s", "gflop_s", "{:,.0f}"), ("img/s at the peak", "img_s", "{:,.1f}"),
                ("× naive at most", "ratio", "{:.2f}×")],
    "pipeline": [("img/s (best)", "img_s", "{:,.0f}"), ("median", "img_s_median", "{:,.0f}"),
                 ("÷ its training img/s", "ratio", "{:,.0f}×")],
    "optimizer": [("ms per step", "ms", "{:.1f}"), ("× faster than for-loop", "ratio", "{:.2f}×")],
    "inference": [("batch 1 ms (median)", "batch1_ms_median", "{:.2f}"), ("best", "batch1_ms_best", "{:.2f}"),
                  ("batch 32 img/s (median)", "batch32_img_s_median", "{:,.0f}"), ("best", "batch32_img_s_best", "{:,.0f}"),
                  ("× eager NCHW", "speedup_vs_eager_nchw", "{:.2f}×"), ("val metric", "val_metric", "{:.4f}"),
                  ("max |Δlogit|", "max_abs_logit_diff", "{:.1e}")],
    "scaling": [("cache MiB", "cache_mib", "{:,.0f}"), ("build s", "cache_build_s", "{:.1f}"),
                ("pipeline img/s", "pipeline_img_s", "{:,.0f}"), ("train img/s", "train_img_s", "{:,.1f}"),
                ("anon RSS MiB", "rss_anon_mib", "{:,.0f}"), ("file RSS MiB", "rss_file_mib", "{:,.0f}"),
                ("peak RSS MiB", "peak_rss_mib", "{:,.0f}")],
}


def ceiling_verdict(rows: list[dict]) -> str:
    """One line under the ceiling table: the chosen step's share of its peak, and the most that peak allows."""
    chosen = next(r for r in rows if r["name"] == _chosen_name(rows))
    kind = chosen["precision"], chosen["threads"]
    peak = next(r for r in rows if r["section"] == "ceiling" and (r["precision"], r["threads"]) == kind)
    return (f"the chosen step ({_kind(*kind)}) computes at {chosen['of_peak']:.0%} of this machine's conv peak "
            f"for them and is {chosen['ratio']:.2f}× the naive loop; at 100 % no such loop could pass "
            f"{peak['ratio']:.2f}× here.")


NOTED = ("training", "ceiling", "pipeline", "optimizer")      # sections with a "what ran" column


def _cell(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console, m, o = Console(), result["machine"], result["options"]
    if not console.is_terminal:           # a file or pipe (RESULTS.md, CI logs): no wrapping at 80 columns
        console = Console(width=max(console.width, 200))
    console.print(f"[bold]multitag bench[/bold]  {m['date']}  {m['device']}  CPU: {m['cpu']}  "
                  f"{m['cpus']} CPUs, {m['threads']} threads, torch {m['torch']}, OpenMP wait: {m['omp_wait']}, "
                  f"malloc: {m.get('malloc', '(not recorded)')}")
    console.print(f"model {o['model']} @{o['image_size']} px, batch {o['batch_size']}, data {o['data']} "
                  f"({o['images']} train images), {o['rounds']} rounds × {o['steps']} steps; runtime chosen: "
                  f"{m['runtime_chosen']}; load average {m['load_average_start']} → {m['load_average_end']}")
    if (m.get("round_spread") or 0) > NOISY_SPREAD:
        console.print(f"[yellow]noisy machine:[/yellow] a system's median round ran up to {m['round_spread']:.0%} "
                      f"slower than its best; compare the ratios within this run, not figures across runs.")
    for section, columns in SECTION_COLUMNS.items():
        rows = [r for r in result["rows"] if r["section"] == section]
        if not rows:
            continue
        table = Table(title=section, title_justify="left")
        table.add_column("system" if section != "inference" else "backend")
        for title, _, _ in columns:
            table.add_column(title, justify="right")
        if section in NOTED:
            table.add_column("what ran")
        for r in rows:
            cells = [_cell(fmt, r.get(key)) for _, key, fmt in columns]
            table.add_row(r["name"], *cells, *([r.get("note", "")] if section in NOTED else []))
        console.print(table)
        if section == "ceiling":          # its rows exist only beside training rows with a chosen one
            console.print(ceiling_verdict(result["rows"]))
