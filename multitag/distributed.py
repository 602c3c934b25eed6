"""Multi-process training with PyTorch's own engine: torchrun starts the processes, this file joins them.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) ``session`` initialises the
process group: NCCL on CUDA, gloo on the CPU. ``torchrun --nproc-per-node 1`` runs DDP with one
process (a sanity check of the distributed path). Without torchrun (plain ``multitag train``, or
``--nproc 1``) nothing here creates a group and every helper is the identity, so single-process
training runs exactly the code it always ran.

Two groups, two timeouts:
  - the default group (NCCL or gloo), timeout ``train.dist_timeout_s``: gradients (DDP), SyncBatchNorm
    and the per-epoch gathers of validation logits. A process that hangs or is lost makes the others
    fail after this long instead of waiting forever (torchrun's agent usually stops them sooner: it
    ends the whole job when any process exits with an error).
  - a gloo "setup" group, timeout ``train.dist_setup_timeout_s``: what ranks wait for while rank 0
    reads the data, builds the image cache and measures the runtime (minutes on a large dataset),
    and the broadcasts of checkpoint tensors. Always on the CPU, so these helpers need no GPU copies.

Rank 0 owns the run directory: it alone reads and writes split.csv, checkpoints, model files, metrics
and reports; the other ranks receive what they need from it (``broadcast_object``/``broadcast_tensors``),
so on several machines only rank 0's needs the run directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from multitag.errors import UserError
from multitag.machine import usable_cores

_SETUP_GROUP = None     # gloo group with the long setup timeout, set by session()
_LAUNCHER_PID = "MULTITAG_LAUNCHER_PID"   # set by launch_local for the processes it starts
_PR_SET_PDEATHSIG = 1                     # linux/prctl.h
_BACKEND = ""           # "nccl" | "gloo" while a session is active


@dataclass(frozen=True)
class World:
    rank: int = 0          # global rank; 0 writes the run directory
    size: int = 1          # number of processes
    local_rank: int = 0    # rank on this machine (picks the GPU)
    local_size: int = 1    # processes on this machine


class ProcessLost(UserError):
    """A collective failed: another process died, hung past the timeout or lost its connection."""


def launched() -> bool:
    """Started by torchrun (its agent sets TORCHELASTIC_RUN_ID), or by another launcher of several ranks."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_world() -> World:
    """The world torchrun describes in the environment (size 1 when not launched by torchrun)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")),
                 int(env.get("LOCAL_WORLD_SIZE", str(size))))


def world() -> World:
    """This process's place in the job: from the active process group, else a world of one."""
    if not active():
        return World()
    return launched_world()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0 (torchrun's RANK, so also before and after a session) and in a single process."""
    return launched_world().rank == 0


@contextlib.contextmanager
def session(device: str, timeout_s: float, setup_timeout_s: float):
    """Join torchrun's process group for the duration of a training run (no-op without torchrun,
    and inside a session already open, so fit() called by api.train does not join twice).

    ``device`` is train.device ("auto", "cpu", "cuda"): CUDA → NCCL with one GPU per local rank,
    else gloo. A failed collective becomes one ProcessLost line (the CLI prefixes the rank).
    """
    w = launched_world()
    if not launched() or active():
        yield w
        return
    die_with_launcher()
    global _SETUP_GROUP, _BACKEND
    if timeout_s <= 0 or setup_timeout_s <= 0:
        raise UserError(f"train.dist_timeout_s and train.dist_setup_timeout_s must be positive, got "
                        f"{timeout_s} and {setup_timeout_s}.")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= w.local_rank:
            raise UserError(f"rank {w.rank} needs GPU {w.local_rank} but this machine shows "
                            f"{torch.cuda.device_count()}; start at most that many processes per machine.")
        torch.cuda.set_device(w.local_rank)
    _BACKEND = "nccl" if cuda else "gloo"
    dist.init_process_group(_BACKEND, timeout=timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", w.local_rank) if cuda else None)
    _SETUP_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=setup_timeout_s))
    try:
        yield w
    except RuntimeError as e:
        if not _collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProcessLost(f"stopped waiting for the other training processes, a collective operation failed "
                          f"({first[:200]}): another process died, hung for longer than train.dist_timeout_s="
                          f"{timeout_s:g} s or lost its connection, so this one stops too.") from None
    finally:
        dist.destroy_process_group()
        _SETUP_GROUP, _BACKEND = None, ""


# What gloo's and NCCL's plain RuntimeErrors say when a peer is gone or a collective timed out, e.g.
# "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to
# complete", "Application timeout caused pair closure", "Connection closed by peer".
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|processgroup|timed out|timeout|connection (closed|reset|refused)"
                                 r"|pair closure|broken pipe", re.IGNORECASE)


def die_with_launcher() -> None:
    """Have Linux send this process SIGTERM when its launcher (torchrun's agent) dies.

    A ``kill -9`` of ``multitag train --nproc 2`` cannot pass anything on, and its processes went on
    training to the end, writing into the run directory. Linux only (elsewhere a no-op). The
    launcher's pid, passed in the environment by launch_local, closes the race of a launcher that
    died before this call (the parent would already be another process)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    expected = os.environ.get(_LAUNCHER_PID)
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def _collective_failure(e: RuntimeError) -> bool:
    """A failed collective: torch's DistError, or one of the plain RuntimeErrors gloo raises."""
    return isinstance(e, dist.DistError) or bool(_COLLECTIVE_FAILURE.search(str(e)))


def device_name(device: str) -> str:
    """train.device for this process: under NCCL the local rank's GPU, else unchanged."""
    if _BACKEND == "nccl":
        return f"cuda:{world().local_rank}"
    return device


def cpu_threads(configured: int) -> int:
    """Torch CPU threads per process: the configured count, else the cores shared out among the
    processes on this machine (2 processes on 2 cores: 1 each; more would oversubscribe)."""
    if configured > 0:
        return configured
    return max(1, usable_cores() // launched_world().local_size)


# --- collectives (identity for a single process) -------------------------------------------------

def barrier() -> None:
    """Wait for every rank, with the setup timeout (used around rank 0's data preparation)."""
    if active():
        dist.barrier(group=_SETUP_GROUP)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (small, picklable things: paths, the split, checkpoint.json)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_SETUP_GROUP)
    return box[0]


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Rank 0's dict of CPU tensors (e.g. the checkpoint it read) on every rank; others pass None."""
    if not active():
        return tensors
    spec = broadcast_object({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} if is_main() else None)
    out = {}
    for name, (dtype, shape) in spec.items():
        t = tensors[name].contiguous() if is_main() else torch.empty(shape, dtype=dtype)
        dist.broadcast(t, src=0, group=_SETUP_GROUP)
        out[name] = t
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _BACKEND == "nccl" else torch.device("cpu")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor along dim 0 in rank order; n_r may differ."""
    if not active():
        return x
    dev = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], dtype=torch.int64, device=dev))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=dev)   # all_gather needs equal shapes
    padded[:len(x)] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


def reassemble(values: torch.Tensor, rows: np.ndarray, wanted: np.ndarray) -> torch.Tensor:
    """Every rank's (n_r, ...) values and their table rows (n_r,) → (len(wanted), ...) in ``wanted``'s order.

    Validation rows are unique, so sorting both row lists pairs them up (identity for one process).
    """
    if not active():
        return values
    values = gather_rows(values)
    rows = gather_rows(torch.from_numpy(np.asarray(rows, dtype=np.int64))).numpy()
    if len(rows) != len(wanted) or len(np.unique(rows)) != len(rows):
        raise RuntimeError(f"gathered {len(rows)} rows for {len(wanted)} wanted (or duplicates): ranks disagree")
    out = torch.empty_like(values)
    out[np.argsort(wanted, kind="stable")] = values[np.argsort(rows, kind="stable")]
    return out


def all_sum(value: float) -> float:
    """Σ over ranks of a float (e.g. the epoch's summed training loss); the value itself for one process."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


# --- the convenience launcher: `multitag train --nproc N` -----------------------------------------

def launch_local(nproc: int, train_argv: list[str]) -> None:
    """Run ``multitag train TRAIN_ARGV`` as ``nproc`` processes on this machine through torchrun's
    launcher (standalone rendezvous on localhost). A failed process stops the others; the error names it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if launched():
        raise UserError("--nproc starts torchrun itself; under torchrun leave it out (torchrun already started "
                        "the processes).")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}.")
    os.environ[_LAUNCHER_PID] = str(os.getpid())     # the processes it starts inherit it (die_with_launcher)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module",
                                         "multitag.cli", "train", *train_argv])
    try:
        run(args)
    except SignalException as e:
        # torchrun's agent passed the signal on to the processes. Ctrl-C reaches rank 0 as well,
        # which then prints the resume line; any other signal gets it printed here.
        if e.sigval == signal.SIGINT:
            raise SystemExit(130) from None
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        raise UserError(f"training process rank {rank} {how}, so torchrun stopped the other "
                        f"{nproc - 1} process{'es' if nproc > 2 else ''}; its own messages above say why.") from None


# --- the model under DDP ----------------------------------------------------------------------------

class _LossForward(torch.nn.Module):
    """DDP synchronises gradients of what its forward() runs, so the wrapped forward is the training
    loss itself: training_loss also covers sequence models (CNN-RNN), whose objective is not forward().
    The loss module is held outside the module tree: DDP must not broadcast its (CPU) buffers."""

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module):
        super().__init__()
        self.model, self._loss = model, (loss_fn,)

    def forward(self, x, y, ignore):
        from multitag.losses import training_loss

        return training_loss(self.model, self._loss[0], x, y, ignore)


def wrap(model: torch.nn.Module, loss_fn: torch.nn.Module, device: torch.device):
    """DistributedDataParallel over the loss of ``model`` (call it with (x, y, ignore) → loss), or None
    for a single process. Wrap after freezing: DDP only reduces the parameters that need gradients then."""
    if not active():
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LossForward(model, loss_fn), device_ids=ids)
