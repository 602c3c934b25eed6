"""Where and how the model runs: device, precision (fp32 / bf16 autocast) and memory format.

The best precision differs by more than 10× between machines of the same kind (bf16 is fast
with AVX-512-BF16/AMX and very slow on AVX2-only CPUs), so ``precision=auto`` times a few
training steps of each candidate on this machine, caches the winner per machine fingerprint,
and prints what it chose. Nothing is assumed from the CPU name.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from multitag import allocator, openmp
from multitag.config import DEVICES, PRECISIONS, cache_root
from multitag.errors import UserError, did_you_mean
from multitag.fileio import read_json_object, update_json_object
from multitag.losses import training_loss
from multitag.layer_tweaks import apply_tweaks, available_tweaks, label, tweaks_for


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str            # "fp32" | "bf16"
    channels_last: bool
    threads: int = 0          # torch CPU threads to train with; 0 = leave torch's setting as it is
    layer_tweaks: tuple[str, ...] = ()   # per-layer exceptions (layer_tweaks.py), e.g. ("fp32_depthwise",)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def for_scoring(self) -> "Runtime":
        """This runtime in fp32, as `multitag predict`/`eval`/`serve` score: thresholds fitted on bf16
        scores sit up to a bf16 step off the fp32 scores they are applied to (seen: 80 of 600 demo test
        images with other labels). Layer tweaks act only under backward, so they may stay."""
        return replace(self, precision="fp32")

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (in place) on this runtime's device and memory format, with its layer precisions."""
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last
                         else torch.contiguous_format)
        apply_tweaks(model, self.layer_tweaks)
        return model

    def describe(self) -> str:
        fmt = "channels_last" if self.channels_last else "NCHW"
        return (f"{self.device.type} {self.precision} {fmt}" + "".join(f", {label(t)}" for t in self.layer_tweaks)
                + (f", {self.threads} thread{'s' * (self.threads > 1)}" if self.threads else ""))

    @contextlib.contextmanager
    def thread_count(self):
        """torch's intra-op threads set to ``threads`` inside the block (nothing changes when it is 0)."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def choose_device(name: str, setting: str = "train.device") -> torch.device:
    """``name`` (auto, cpu, cuda, cuda:N) as a device; ``setting`` is what the user set it with, for errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f'unknown device "{name}"{did_you_mean(name, DEVICES)}.')
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{setting}={name} was asked for but no CUDA GPU is visible; use {setting}=auto or cpu.")
    return torch.device(name)


# The CPU features that decide bf16 (avx512_bf16, AMX) and int8 (VNNI) speed.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(text: str) -> list[str]:
    """Of CPU_FLAGS, those the CPU of ``text`` (/proc/cpuinfo's) has, as recorded beside every benchmark figure."""
    present = set(text.split())
    return [f for f in CPU_FLAGS if f in present]


def cpu_model(text: str) -> str:
    """The name, vendor, family and model of the CPU of ``text`` (/proc/cpuinfo's), e.g.
    "AMD EPYC (AuthenticAMD family 26 model 2)".

    Part of the runtime's cache key: kernels' speeds differ by more than the flags say (bf16 made the ResNet-18
    layout's step 1.5-2.0x faster than fp32 channels_last on an AMD EPYC with avx512_bf16 and no AMX,
    2.0-2.6x on the AMX Intel machine: RESULTS run P), and CPUs with the same flags need not rank alike."""
    first = text.split("\n\n", 1)[0]        # the first processor's block
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    ids = " ".join(f"{label} {fields[k]}" for k, label in (("cpu family", "family"), ("model", "model")) if fields.get(k))
    vendor = " ".join(x for x in (fields.get("vendor_id", ""), ids) if x)
    return f"{name} ({vendor})" if vendor else name


def describe_cpu() -> str:
    """The CPU as every benchmark figure records it: its model and which of CPU_FLAGS it has."""
    text = _cpuinfo()
    return f"{cpu_model(text)}, flags {' '.join(cpu_flags(text)) or '(none of ' + ' '.join(CPU_FLAGS) + ')'}"


def machine_fingerprint(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    text = _cpuinfo()
    return f"{platform.machine()}:{cpu_model(text)}:{','.join(cpu_flags(text))}:{os.cpu_count()}"


def _cache_path() -> Path:
    return cache_root() / "precision.json"


def parse_switch(value: str, key: str) -> bool | None:
    """An auto/true/false setting (also 1/0, yes/no; YAML's true reads as "True"): None for auto."""
    low = str(value).lower()
    if low == "auto":
        return None
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise UserError(f'{key} must be auto, true or false, got "{value}".')


MEASURE_ROUNDS = 2
# The second round re-times only candidates within this factor of the best: EfficientNet-Lite0 at 224 px
# has 10 candidates (4 s a step for the slowest), and its start-up measurement took ~3 min; on that
# idle machine 5 of them were 2.05-3x behind (benchmarks/RESULTS.md, run I).
RETRY_WITHIN = 2.0
# Candidates are timed on at most this many images of the batch: per image they rank alike (airbench
# at 32 px, all six candidates: the same order at 256 and at 1,024 images, bf16 1,365 vs 1,144 img/s),
# and a batch-1,024 recipe's start-up measurement then costs a quarter (it took ~3 min for a 4.6 M
# parameter airbench).
MEASURE_MAX_IMAGES = 256


def candidates(device: torch.device, threads: int = 0, tweaks: tuple[str, ...] = (), model: nn.Module | None = None
               ) -> list[tuple[str, bool, int, tuple[str, ...]]]:
    """(precision, channels_last, threads, layer_tweaks) to measure: Runtime's fields. On a CPU with
    several threads each is also tried with one: when other processes share the cores, every parallel
    region of a 2-thread step waits for its descheduled thread, and one thread was 2-5x faster
    (benchmarks/RESULTS.md, "Performance (issue 9)"); on an idle machine two threads win. ``threads``
    > 0 fixes the count. ``tweaks``: the model's available layer tweaks; every precision and format
    they apply to is also tried with all of them on (all that still change a layer of ``model``, if given)."""
    base = [("fp32", False), ("fp32", True), ("bf16", True)]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        base = base[:2]
    cands = []
    for p, c in base:
        cands.append((p, c, ()))
        if own := tweaks_for(tweaks, p, c, model):
            cands.append((p, c, own))
    counts = [threads] if threads or device.type != "cpu" or torch.get_num_threads() == 1 else [0, 1]
    return [(p, c, n, tw) for n in counts for p, c, tw in cands]


def time_train_step(model, loss_fn, example: torch.Tensor, targets: torch.Tensor, rt: Runtime,
                    steps: int = 3, give_up_after: float = float("inf")) -> float:
    """Seconds per forward+backward step (after one warm-up), on a throwaway copy of the model."""
    model = rt.prepare_model(copy.deepcopy(model))
    model.train()
    x, y = rt.prepare_input(example), targets.to(rt.device)
    ignore = torch.zeros_like(y, dtype=torch.bool)
    with rt.thread_count():
        return _timed_steps(model, loss_fn, x, y, ignore, rt, steps, give_up_after)


def _timed_steps(model, loss_fn, x, y, ignore, rt: Runtime, steps: int, give_up_after: float) -> float:
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with rt.autocast():
            loss = training_loss(model, loss_fn, x, y, ignore)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
        # Far slower than the best so far (bf16 on AVX2): stop paying for it. Not on the warm-up step,
        # which on CUDA loads the candidate's kernels and autotunes cuDNN (seconds, once).
        if i > 0 and dt > give_up_after:
            return dt
    return sorted(times)[len(times) // 2]


# The best thread count (and so the choice) depends on how busy the cores are: a choice measured while
# other processes kept a core busy is measured again once they have gone, and the other way round.
LOAD_CHANGE = 0.75      # cores


@dataclass(frozen=True)
class CpuSample:
    wall: float          # time.perf_counter()
    busy: float          # CPU-seconds the whole machine has spent busy (/proc/stat)
    own: float           # CPU-seconds this process has used


def cpu_sample() -> CpuSample | None:
    """A reading of machine-wide and own CPU time; None where /proc/stat is missing (not Linux)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")      # minus idle and iowait
    t = os.times()
    return CpuSample(time.perf_counter(), busy, t.user + t.system)


def other_cores(a: CpuSample | None, b: CpuSample | None) -> float | None:
    """Cores kept busy by other processes between two samples (what this process used is taken out)."""
    if a is None or b is None or b.wall - a.wall <= 0:
        return None
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / (b.wall - a.wall))


def other_load(seconds: float = 0.5) -> float | None:
    """Cores busy with other processes over the next ``seconds`` (this process idles meanwhile)."""
    a = cpu_sample()
    time.sleep(seconds)
    return other_cores(a, cpu_sample())


def choose_runtime(model, loss_fn, example, targets, *, device: str = "auto", precision: str = "auto",
                   channels_last: str = "auto", key_extra: str = "", threads: int = 0, log=print) -> Runtime:
    """Pick device, precision, memory format and (CPU, ``threads`` 0) the thread count; measure
    when set to auto, and cache the result."""
    dev = choose_device(device)
    if precision not in PRECISIONS:
        raise UserError(f'unknown precision "{precision}"{did_you_mean(precision, PRECISIONS)}.')
    cl = parse_switch(channels_last, "train.channels_last")
    tweaks = available_tweaks(model, dev)
    cands = [cand for cand in candidates(dev, threads, tweaks, model)
             if (precision == "auto" or cand[0] == precision) and (cl is None or cand[1] == cl)]
    if not cands:
        cands = [(precision if precision != "auto" else "fp32", bool(cl), threads, ())]
    if len(cands) == 1 or precision != "auto" and cl is not None:    # fixed by the user: threads as they are
        return Runtime(dev, *cands[0][:2])

    example, targets = example[:MEASURE_MAX_IMAGES], targets[:MEASURE_MAX_IMAGES]
    n_params = sum(p.numel() for p in model.parameters())
    # (a model with layer tweaks has candidates more: its choices made before them are measured again;
    # the malloc setting and OpenMP's wait policy move the candidates by different amounts: 1.05-1.41x,
    # allocator.py; 2-thread steps 1.05-1.33x, 1-thread steps not at all, openmp.py)
    key = hashlib.sha256(json.dumps([machine_fingerprint(dev), torch.__version__, type(model).__name__,
                                     n_params, list(example.shape), key_extra, allocator.state,
                                     openmp.wait_setting()]
                                    + ([list(tweaks)] if tweaks else [])).encode()).hexdigest()[:16]
    known = read_json_object(_cache_path())
    # Entries written before the thread count was measured have no "threads": measure those again.
    saved = (*known[key]["choice"], known[key]["threads"], tuple(known[key].get("layer_tweaks", ()))) \
        if key in known and "threads" in known[key] else None
    if saved in cands:
        then = known[key].get("other_load")
        now = other_load() if dev.type == "cpu" and then is not None else None
        if now is None or abs(now - then) < LOAD_CHANGE:
            rt = Runtime(dev, *saved)
            log(f"runtime: {rt.describe()} (measured before on this machine: {known[key]['timings']})")
            return rt
        log(f"runtime: measuring again: other processes keep {now:.1f} cores busy now, {then:.1f} when it was measured")

    # Interleaved rounds, fastest per candidate: a burst of load from another process then slows
    # one round of every candidate instead of deciding the choice (seen on shared 2-core machines).
    # A candidate more than RETRY_WITHIN x slower than the best after a round is not timed again.
    start = cpu_sample()
    seconds: dict[tuple, float] = {}
    for _ in range(MEASURE_ROUNDS):
        behind = {c for c, t in seconds.items() if t > RETRY_WITHIN * min(seconds.values())}
        for cand in (c for c in cands if c not in behind):
            best = min(seconds.values(), default=float("inf"))
            t = time_train_step(model, loss_fn, example, targets, Runtime(dev, *cand), give_up_after=5 * best)
            seconds[cand] = min(seconds.get(cand, float("inf")), t)
    end = cpu_sample()
    load = other_cores(start, end) if end is not None and end.wall - start.wall >= 0.25 else other_load(0.25)
    timings = {Runtime(dev, *c).describe(): round(example.shape[0] / t, 1) for c, t in seconds.items()}
    choice = min(seconds, key=seconds.get)
    rt = Runtime(dev, *choice)
    log(f"runtime: {rt.describe()} (measured img/s: {timings}" + (f"; other processes kept {load:.1f} cores busy)"
                                                                   if load is not None else ")"))
    update_json_object(_cache_path(), key, {
        "choice": list(choice[:2]), "threads": choice[2], "layer_tweaks": list(choice[3]), "timings": timings,
        **({"other_load": round(load, 2)} if load is not None and dev.type == "cpu" else {})})
    return rt
