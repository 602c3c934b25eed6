"""Distributed training (torchrun, DDP over gloo on the CPU) computes what one process computes.

Exact equivalence needs batch statistics that do not depend on how a batch is split. torch's
SyncBatchNorm would give that, but it runs on GPUs only, so these runs freeze simple_cnn's
BatchNorm layers (a frozen layer stays in eval mode: a fixed affine map) and turn dropout off
(its masks are drawn per process). Everything else is the real path: epoch order, oversampling,
augmentation draws, loss weighting, DDP's gradient averaging, validation gathering, rank 0's
checkpoints and a resume through `--nproc`.

The processes run on 127.0.0.1 only (torchrun --standalone picks a free port).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitag.api import train
from multitag.checkpoint import MODEL_META, TRAIN_STATE
from multitag.config import AugConfig, load_config
from multitag.data.loader import BatchLoader, shard_bounds
from multitag.data.transforms import BatchAugment, Part
from multitag.engine import micro_batch_size
from multitag.errors import UserError
from multitag.losses import MaskedBCE, loss_count

FROZEN_BN = 'stages=[{epochs: %d, lr: 0.003, sched: none, freeze: ["features.*.1.*"]}]'
SETTINGS = ["train.batch_size=32", "train.precision=fp32", "train.channels_last=false", "train.report=false",
            "train.threads=1", "model.args.drop_rate=0", "data.oversample_to=30", "aug.rotate=10",
            "aug.color_jitter=0.2", "aug.erasing=0.25", "train.dist_timeout_s=60",
            "train.track_test=true"]     # the logged test metric is gathered like val
# Float sums run in another order (DDP's all-reduce, half-size batches), and Adam divides by
# sqrt(v), which magnifies the difference for weights whose gradients are near zero: measured
# 7e-6 largest absolute difference after 2 epochs. 1e-4 is far below any real training change.
ATOL = 1e-4


def child_env() -> dict:
    """Children share the 2 cores: one thread each, idle OpenMP threads sleep."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def train_args(data: Path, run: Path, epochs: int, extra=()) -> list[str]:
    sets = [*SETTINGS, FROZEN_BN % epochs, *extra]
    return ["demo", "--data", str(data), "--out", str(run), *[f for s in sets for f in ("--set", s)]]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "multitag.cli", "train", *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


def cli_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multitag.cli", "train", *args], env=child_env(),
                          capture_output=True, text=True, timeout=300)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    """Model and optimizer tensors of two runs' last checkpoints agree within ATOL."""
    ta, tb = load_file(a / TRAIN_STATE), load_file(b / TRAIN_STATE)
    assert ta.keys() == tb.keys()
    worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)
    assert worst < ATOL, worst


def assert_same_metrics(a: Path, b: Path) -> None:
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        for key in ("epoch", "train_loss", "val_loss", "val_mAP", "test_mAP"):
            assert ra[key] == pytest.approx(rb[key], abs=ATOL), key
    ma, mb = json.loads((a / MODEL_META).read_text()), json.loads((b / MODEL_META).read_text())
    np.testing.assert_allclose(ma["thresholds"], mb["thresholds"], atol=1e-3)    # calibrated on gathered val
    va, vb = ma["metrics"]["val"], mb["metrics"]["val"]
    for name, x, y in (("mAP", va, vb), ("CF1@0.5", va["at_0.5"], vb["at_0.5"]),
                       ("CF1", va["calibrated"], vb["calibrated"]), ("OF1", va["calibrated"], vb["calibrated"])):
        key = name.split("@")[0]
        assert x[key] == pytest.approx(y[key], abs=ATOL), name


@pytest.fixture(scope="module")
def reference(digits_csv, tmp_path_factory) -> Path:
    """One process, 2 epochs: what the distributed runs must reproduce."""
    run = tmp_path_factory.mktemp("dist_ref") / "run"
    args = train_args(digits_csv, run, epochs=2)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return train("demo", data=str(digits_csv), out=run, overrides=overrides, log=lambda *a: None)


def test_two_processes_train_like_one_and_resume(reference, digits_csv, tmp_path):
    """Epoch 1 under torchrun with 2 processes, then --resume through `--nproc 2` to epoch 2 with
    gradient accumulation (2 micro-batches of 8 per process, DDP's no_sync on the first): the
    weights, optimizer state and every metric equal the 1-process run's."""
    run = tmp_path / "run"
    first = torchrun(*train_args(digits_csv, run, epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    assert metrics(run)[0]["val_mAP"] == pytest.approx(metrics(reference)[0]["val_mAP"], abs=ATOL)
    # Lengthen the (constant-LR) stage to 2 epochs: resuming then continues exactly like the
    # uninterrupted 2-epoch run, which makes a resume comparable with the reference. Accumulation
    # keeps the global batch, so it may change on resume (e.g. on machines with less memory).
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["stages"][0]["epochs"] = 2
    cfg["train"]["accumulate"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    second = cli_train("--nproc", "2", "--resume", str(run), "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout)["run_dir"] == str(run)         # printed once, by rank 0
    assert "resuming" in second.stderr and second.stderr.count("epoch 2/2") == 1
    assert_same_weights(run, reference)
    assert_same_metrics(run, reference)


def test_gradient_accumulation_matches_one_batch(reference, digits_csv, tmp_path):
    """train.accumulate=2 (two micro-batches of 16) trains like one batch of 32."""
    run = tmp_path / "run"
    args = train_args(digits_csv, run, epochs=2, extra=["train.accumulate=2"])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    train("demo", data=str(digits_csv), out=run, overrides=overrides, log=lambda *a: None)
    assert_same_weights(run, reference)
    assert_same_metrics(run, reference)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> str | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def test_killed_process_stops_the_job(digits_csv, tmp_path):
    """SIGKILL of rank 1 mid-training: `--nproc 2` ends with an error naming the rank, well within
    the collective timeout, instead of rank 0 waiting forever."""
    run = tmp_path / "run"
    args = train_args(digits_csv, run, epochs=200, extra=["train.dist_timeout_s=30"])
    proc = subprocess.Popen([sys.executable, "-m", "multitag.cli", "train", "--nproc", "2", *args],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():        # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        victim = next(p for p in _children(proc.pid) if _rank_of(p) == "1")
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=90)              # a hang guard: 3× the collective timeout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert "training process rank 1 was killed by SIGKILL" in err and "stopped the other 1 process" in err
    assert len(metrics(run)) < 200


def test_killed_launcher_takes_its_processes_with_it(digits_csv, tmp_path):
    """SIGKILL of the `--nproc 2` launcher itself (nothing can be passed on): its training processes
    get SIGTERM from Linux (PR_SET_PDEATHSIG) instead of training on, orphaned, to the last epoch."""
    run = tmp_path / "run"
    args = train_args(digits_csv, run, epochs=200)
    proc = subprocess.Popen([sys.executable, "-m", "multitag.cli", "train", "--nproc", "2", *args],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():        # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        workers += [p for p in _children(proc.pid) if _rank_of(p) is not None]
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in workers if _running(p)]
    finally:
        for p in workers:
            if _running(p):
                os.kill(p, signal.SIGKILL)
    assert not left, f"processes {left} went on after their launcher was killed"
    assert len(metrics(run)) < 200


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's exit may wait for its reaper)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the parts, in one process --------------------------------------------------------------------

def test_augmenting_parts_equals_augmenting_the_batch():
    """Each process augments only its images, with the draws the whole batch would give them."""
    aug = BatchAugment(AugConfig(preset="strong", rotate=15.0, color_jitter=0.3), (0.5,) * 3, (0.25,) * 3)
    x = torch.randint(0, 256, (7, 3, 24, 24), dtype=torch.uint8)
    whole = aug(x, torch.Generator().manual_seed(5))
    parts = []
    for rank in range(3):
        lo, hi = shard_bounds(len(x), rank, 3)
        parts.append(aug(x[lo:hi], torch.Generator().manual_seed(5), Part(lo, hi, len(x))))
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=0)


class _Cache:
    def get_batch(self, index):
        return torch.as_tensor(np.asarray(index), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()


def test_shards_of_every_batch_make_up_the_one_process_batch():
    """Oversampled, shuffled epochs: rank parts concatenate to exactly the single-process batch."""
    rows = np.arange(20)
    targets = np.zeros((20, 2), np.float32)
    repeats = np.where(rows % 3 == 0, 2.5, 1.0)
    common = dict(batch_size=8, mean=(0,) * 3, std=(1,) * 3, shuffle=True, drop_last=True, repeats=repeats)

    def loader(shard):
        return BatchLoader(_Cache(), rows, targets, np.zeros_like(targets, bool), shard=shard, **common)

    single = list(loader((0, 1)).iterate(epoch=3, seed=1))
    ranks = [list(loader((r, 3)).iterate(epoch=3, seed=1)) for r in range(3)]
    assert len(single) == len(ranks[0]) == 3
    for k, batch in enumerate(single):
        assert np.array_equal(np.concatenate([r[k].index for r in ranks]), batch.index)
        assert all(np.array_equal(r[k].whole, batch.index) for r in ranks)


def test_part_losses_weighted_by_their_counts_give_the_batch_loss():
    """With ignored pairs spread unevenly, count-weighted part losses sum to the whole batch's mean."""
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(12, 5, generator=g), (torch.rand(12, 5, generator=g) > 0.5).float()
    ignore = torch.zeros(12, 5, dtype=torch.bool)
    ignore[:4, :3] = True                                   # all in the first part
    loss, model = MaskedBCE(), torch.nn.Identity()
    total = loss_count(model, loss, targets, ignore)
    parts = sum(loss_count(model, loss, targets[s], ignore[s]) / total * loss(logits[s], targets[s], ignore[s])
                for s in (slice(0, 6), slice(6, 12)))
    torch.testing.assert_close(parts, loss(logits, targets, ignore))


def test_global_batch_must_split_into_micro_batches():
    cfg = load_config("demo", ["train.batch_size=32", "train.accumulate=3"])
    with pytest.raises(UserError, match="multiple of 3"):
        micro_batch_size(cfg)
    assert micro_batch_size(load_config("demo", ["train.batch_size=32", "train.accumulate=4"])) == 8


def test_nproc_under_torchrun_is_refused(monkeypatch):
    from multitag.distributed import launch_local

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(UserError, match="leave it out"):
        launch_local(2, ["demo"])


def test_hung_process_times_out_with_one_line(digits_csv, tmp_path):
    """Rank 1 hangs (alive, so torchrun's agent sees nothing wrong): rank 0's next collective fails
    after train.dist_timeout_s and it exits with one error line; torchrun then ends rank 1."""
    run = tmp_path / "run"
    worker = Path(__file__).with_name("dist_hang_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
           *train_args(digits_csv, run, epochs=3, extra=["train.dist_timeout_s=5"])]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("multitag train (rank 0 of 2): error:")]
    assert len(lines) == 1, done.stderr[-4000:]
    line = lines[0]
    assert "stopped waiting for the other training processes" in line and "dist_timeout_s=5 s" in line
    assert len(metrics(run)) == 1


def test_a_parameter_frozen_mid_stage_keeps_two_processes_training(tiny_cifar, tmp_path):
    """airbench's whitening bias stops training after epoch 1 (model.set_epoch): DDP, built when it still
    trained, must be rebuilt or epoch 2 fails waiting for a gradient that never comes."""
    run = tmp_path / "run"
    sets = ["train.epochs=2", "model.args.whiten_bias_epochs=1", "train.batch_size=16", "train.eval_batch_size=32",
            "train.precision=fp32", "train.channels_last=false", "train.threads=1", "train.dist_timeout_s=60"]
    done = torchrun("cifar10_speed", "--data", str(tiny_cifar), "--out", str(run),
                    *[f for s in sets for f in ("--set", s)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
