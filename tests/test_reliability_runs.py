"""Training runs that are killed, interrupted or run out of disk lose nothing and resume exactly.

- SIGKILL (and a real SIGINT) of `multitag train` subprocesses at random moments once a checkpoint
  exists, each followed by `train --resume`: the final metrics equal an uninterrupted run's.
- A write failing half-way for lack of disk space leaves the previous checkpoint and model.json
  whole and is one UserError saying to free disk space.
- Ctrl-C during an epoch: exit status 130 and a line naming the kept epoch and the resume command.

``kill_and_resume`` is also run by benchmarks/reliability_report.py with more kills.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from multitag import checkpoint, engine
from multitag.api import train
from multitag.checkpoint import MODEL_META, TRAIN_META, TRAIN_STATE
from multitag.cli import main
from multitag.fileio import DiskFullError, atomic_write

# Tiny and deterministic: one thread, so the killed, resumed and uninterrupted runs compute alike.
SETTINGS = ["train.batch_size=32", "data.image_size=32", "train.precision=fp32", "train.channels_last=false",
            "train.report=false", "train.threads=1", "train.seed=3"]
THREE_EPOCHS = [*SETTINGS, "train.epochs=3"]
COMPARED = ("epoch", "train_loss", "val_loss", "val_mAP")


# --- SIGKILL / SIGINT at random moments --------------------------------------------------------------

def cli_train(*args: str) -> subprocess.Popen:
    """`python -m multitag.cli train ARGS` in a subprocess (stdout dropped, stderr kept for messages)."""
    return subprocess.Popen([sys.executable, "-m", "multitag.cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def as_flags(settings: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]"""
    return [flag for setting in settings for flag in ("--set", setting)]


def train_args(data: Path, run: Path, epochs: int = 10) -> list[str]:
    return ["demo", "--data", str(data), "--out", str(run), *as_flags([*SETTINGS, f"train.epochs={epochs}"])]


def checkpointed_epochs(run: Path) -> int:
    """Epochs the run's checkpoint covers (0 before the first); tolerant of a file being replaced."""
    try:
        return json.loads((run / TRAIN_META).read_text())["state"]["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def finished(run: Path) -> bool:
    """Whether training completed: finish() has written the calibrated metrics into model.json."""
    try:
        return "metrics" in json.loads((run / MODEL_META).read_text())
    except (OSError, ValueError):
        return False


def _wait_for_checkpoint_after(run: Path, epochs: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while checkpointed_epochs(run) <= epochs and proc.poll() is None:
        assert time.monotonic() < deadline, "no new checkpoint"
        time.sleep(0.01)


def kill_and_resume(data: Path, run: Path, signals: list[int], rng: random.Random,
                    max_delay: float = 0.8, epochs: int = 10) -> list[dict]:
    """Train into ``run``; for each signal, once a new checkpoint exists, wait a random delay, send the
    signal, then `train --resume`. Returns one record per signal: when it landed and what it hit."""
    events = []
    proc = cli_train(*train_args(data, run, epochs))
    for sig in signals:
        before = checkpointed_epochs(run)
        _wait_for_checkpoint_after(run, before, proc)
        delay = rng.uniform(0, max_delay)
        time.sleep(delay)
        at = checkpointed_epochs(run)
        alive = proc.poll() is None
        landed = alive and not finished(run)         # still training (not only exiting) when signalled
        if alive:
            proc.send_signal(sig)
        rc, err = proc.wait(), proc.stderr.read()
        events.append({"signal": signal.Signals(sig).name, "delay_s": round(delay, 3), "landed": landed,
                       "checkpointed_epochs": at, "exit_status": rc, "message": err.strip().splitlines()[-1:]})
        if sig == signal.SIGINT and alive:
            # 130 with the resume line; or, when Ctrl-C came as the finished run was exiting, Python's own exit
            assert rc == 130 or finished(run), err
            assert rc != 130 or f"continue with `multitag train --resume {run}`" in err, err
        proc = cli_train("--resume", str(run))
    rc, err = proc.wait(), proc.stderr.read()
    assert rc == 0, err
    return events


def metrics_of(run: Path) -> list[dict]:
    return [{k: row[k] for k in COMPARED} for row in map(json.loads, (run / engine.METRICS_FILE).read_text().splitlines())]


def assert_same_result(run: Path, reference: Path) -> None:
    """Same per-epoch losses and val mAP (1e-6), same best epoch, same final val metrics."""
    got, want = metrics_of(run), metrics_of(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for key in COMPARED[1:]:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], atol=1e-6, err_msg=key)
    a, b = (json.loads((r / MODEL_META).read_text()) for r in (run, reference))
    assert a["best_epoch"] == b["best_epoch"]
    assert a["metrics"]["val"]["mAP"] == pytest.approx(b["metrics"]["val"]["mAP"], abs=1e-6)
    assert a["thresholds"] == pytest.approx(b["thresholds"], abs=1e-6)


def test_sigkill_and_sigint_at_random_points_then_resume_match_an_uninterrupted_run(digits_csv, tmp_path):
    seed = int(os.environ.get("MULTITAG_KILL_SEED", time.time_ns() % 1_000_000))
    print(f"kill delays seeded with {seed} (MULTITAG_KILL_SEED={seed} repeats them)")   # shown on failure
    reference = cli_train(*train_args(digits_csv, tmp_path / "reference"))     # runs alongside: one thread each
    events = kill_and_resume(digits_csv, tmp_path / "killed", [signal.SIGKILL, signal.SIGINT], random.Random(seed))
    assert reference.wait() == 0, reference.stderr.read()
    assert any(e["landed"] for e in events), f"no signal landed (seed {seed}): {events}"
    assert_same_result(tmp_path / "killed", tmp_path / "reference")


# --- a full disk half-way through a write ------------------------------------------------------------

def disk_full_midway(path: str, write_real) -> None:
    """Write the file for real, cut it to half its size, then fail as a full disk does."""
    write_real()
    os.truncate(path, os.path.getsize(path) // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' kind
], ids=["ENOSPC", "EDQUOT", "safetensors os error 28"])
def test_atomic_write_keeps_the_old_file_and_says_free_disk_space(tmp_path, failure):
    target = tmp_path / "model.json"
    target.write_text('{"old": true}')

    def write(tmp):
        Path(tmp).write_text('{"new": tr')     # half-written when the disk fills
        raise failure

    with pytest.raises(DiskFullError) as info:
        atomic_write(target, write)
    message = str(info.value)
    assert str(target) in message and "free disk space" in message and "\n" not in message
    assert target.read_text() == '{"old": true}'
    assert list(tmp_path.iterdir()) == [target]    # the temporary file is gone


def test_other_write_errors_are_not_disguised(tmp_path):
    def write(tmp):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(tmp_path / "x", write)


def fail_second_write(monkeypatch, run: Path, target: str) -> dict:
    """Make the 2nd write of RUN/``target`` (safetensors or JSON) fail half-way for lack of disk
    space; the returned dict gets the file's bytes as they were just before that write."""
    kept, calls = {}, []
    real_save, real_write_text = checkpoint.save_file, pathlib.Path.write_text

    def failing(path: str, write_real) -> None:
        if not Path(path).name.startswith(f".{target}."):      # atomic_write's temporary name
            return write_real()
        calls.append(path)
        if len(calls) != 2:
            return write_real()
        kept["bytes"] = (run / target).read_bytes()
        disk_full_midway(path, write_real)

    monkeypatch.setattr(checkpoint, "save_file",
                        lambda tensors, path, **kw: failing(path, lambda: real_save(tensors, path, **kw)))
    monkeypatch.setattr(pathlib.Path, "write_text",
                        lambda self, *a, **k: failing(str(self), lambda: real_write_text(self, *a, **k)))
    return kept



@pytest.mark.parametrize("target", [TRAIN_STATE, MODEL_META])
def test_disk_full_during_training_keeps_the_last_checkpoint_and_resumes(digits_csv, tmp_path, monkeypatch, target):
    """The 2nd write of ``target`` (epoch 2's checkpoint, or a later model.json) fails half-way."""
    run = tmp_path / "run"
    kept = fail_second_write(monkeypatch, run, target)
    with pytest.raises(DiskFullError, match=f"cannot write {run / target}: .* free disk space"):
        train("demo", data=str(digits_csv), out=run, overrides=THREE_EPOCHS, log=lambda *a: None)
    assert (run / target).read_bytes() == kept["bytes"]                      # the previous file, whole
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]   # no half-written leftovers
    json.loads((run / MODEL_META).read_text())
    load_file(str(run / TRAIN_STATE))
    monkeypatch.undo()
    train(resume=run, log=lambda *a: None)
    assert [r["epoch"] for r in metrics_of(run)] == [1, 2, 3]


def test_disk_full_in_the_cli_says_how_to_resume(digits_csv, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fail_second_write(monkeypatch, run, TRAIN_STATE)
    argv = ["train", "demo", "--data", str(digits_csv), "--out", str(run), *as_flags(THREE_EPOCHS)]
    assert main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"multitag train: error: cannot write {run / TRAIN_STATE}: the disk or your quota is full")
    assert line.endswith(f"the checkpoint of epoch 1 is kept: continue with `multitag train --resume {run}`")


def test_append_line_on_a_full_disk_keeps_the_lines_before_it_whole(tmp_path, monkeypatch):
    """os.write lands half the line, then the disk is full: the file is cut back to its old length."""
    from multitag import fileio

    log = tmp_path / "metrics.jsonl"
    fileio.append_line(log, json.dumps({"epoch": 1}))
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=f"cannot write {log}: .* free disk space"):
        fileio.append_line(log, json.dumps({"epoch": 2, "train_loss": 0.5}))
    monkeypatch.undo()
    assert log.read_text() == '{"epoch": 1}\n'
    fileio.append_line(log, json.dumps({"epoch": 2}))
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2]


def test_disk_full_on_the_metrics_line_resumes_to_the_same_history(digits_csv, tmp_path, monkeypatch):
    """Epoch 2's metrics line hits a full disk: training stops with the one-line error, metrics.jsonl
    holds epoch 1 only, and --resume redoes epoch 2 (its checkpoint was never written)."""
    from multitag import fileio

    run, real_append, calls = tmp_path / "run", fileio.append_line, []

    def append(path, line):
        calls.append(path)
        if len(calls) == 2:
            raise fileio.disk_full_error(path)
        real_append(path, line)

    monkeypatch.setattr(engine, "append_line", append)
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        train("demo", data=str(digits_csv), out=run, overrides=THREE_EPOCHS, log=lambda *a: None)
    assert [r["epoch"] for r in metrics_of(run)] == [1]
    monkeypatch.undo()
    train(resume=run, log=lambda *a: None)
    assert [r["epoch"] for r in metrics_of(run)] == [1, 2, 3]


def test_resume_drops_a_metrics_line_cut_short(digits_csv, tmp_path, monkeypatch):
    """A partial last line (power loss, or a version before append_line) does not break --resume."""
    run = tmp_path / "run"
    interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=str(digits_csv), out=run, overrides=THREE_EPOCHS, log=lambda *a: None)
    monkeypatch.undo()
    with open(run / engine.METRICS_FILE, "a") as f:
        f.write('{"epoch": 2, "train_lo')
    train(resume=run, log=lambda *a: None)
    assert [r["epoch"] for r in metrics_of(run)] == [1, 2, 3]


def test_a_kill_between_the_checkpoint_files_resumes_from_the_tensors_own_state(digits_csv, tmp_path, monkeypatch):
    """Ctrl-C (or a kill) after epoch 2's checkpoint.safetensors is in place but before checkpoint.json
    is replaced: the JSON still says epoch 1. --resume must take the state saved inside the tensors
    file (epoch 2), not train epoch 2 a second time on top of its own result (found by the kill
    campaign in benchmarks/reliability_report.py)."""
    reference = train("demo", data=str(digits_csv), out=tmp_path / "reference", overrides=THREE_EPOCHS,
                      log=lambda *a: None)
    run, real_write_json = tmp_path / "run", engine.write_json

    def write_json(path, data):
        if Path(path).name == TRAIN_META and data["state"]["epoch"] == 2:
            raise KeyboardInterrupt
        real_write_json(path, data)

    monkeypatch.setattr(engine, "write_json", write_json)
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=str(digits_csv), out=run, overrides=THREE_EPOCHS, log=lambda *a: None)
    assert json.loads((run / TRAIN_META).read_text())["state"]["epoch"] == 1     # the stale copy
    monkeypatch.undo()
    train(resume=run, log=lambda *a: None)
    assert_same_result(run, reference)


# --- Ctrl-C ------------------------------------------------------------------------------------------

def interrupt_in_epoch(monkeypatch, epoch_index: int) -> None:
    """Make epoch ``epoch_index`` (0-based) raise KeyboardInterrupt half-way, as Ctrl-C does."""
    real = engine.train_one_epoch

    def epoch(*args, **kwargs):
        if args[-1] == epoch_index:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", epoch)


def test_ctrl_c_exits_130_naming_the_kept_epoch_and_the_resume_command(digits_csv, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupt_in_epoch(monkeypatch, 1)
    argv = ["train", "demo", "--data", str(digits_csv), "--out", str(run), *as_flags(THREE_EPOCHS)]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"multitag train: interrupted; the checkpoint of epoch 1 is kept: "
                   f"continue with `multitag train --resume {run}`")
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in metrics_of(run)] == [1, 2, 3]


def test_ctrl_c_without_out_points_at_the_logged_run_directory(digits_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)           # the default run directory is runs/<recipe>-<time> here
    interrupt_in_epoch(monkeypatch, 0)
    assert main(["train", "demo", "--data", str(digits_csv), *as_flags(THREE_EPOCHS)]) == 130
    captured = capsys.readouterr()
    [run_dir] = list((tmp_path / "runs").iterdir())
    assert f"run directory: runs/{run_dir.name}" in captured.out
    assert "continue with `multitag train --resume RUN_DIR`" in captured.err.splitlines()[-1]


def test_a_kill_before_the_first_checkpoint_resumes_from_epoch_one_with_one_line_each(digits_csv, tmp_path,
                                                                                      monkeypatch):
    """Killed between epoch 1's metrics line and its checkpoint: the old line went twice into the history."""
    run = tmp_path / "run"

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=str(digits_csv), out=run, overrides=THREE_EPOCHS, log=lambda *a: None)
    monkeypatch.undo()
    assert [r["epoch"] for r in metrics_of(run)] == [1] and not (run / TRAIN_STATE).exists()
    (run / ".tmpAb12Cd").write_bytes(b"x" * 100)                # what killed weight writes leave
    (run / ".model.safetensors.k3j_x9.tmp").write_bytes(b"")
    logs = []
    train(resume=run, log=logs.append)
    assert [r["epoch"] for r in metrics_of(run)] == [1, 2, 3]
    assert not any(p.name.startswith(".") for p in run.iterdir())
    assert any("no checkpoint yet" in line for line in logs) and any("removed 2 temporary" in line for line in logs)
