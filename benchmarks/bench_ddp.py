"""Distributed sanity run (issue 10): one training run three ways, side by side.

  plain     `multitag train ...`                              (no process group)
  ddp x1    `torchrun --nproc-per-node 1 -m multitag.cli train ...`   (DDP, one process)
  ddp xN    `torchrun --nproc-per-node N -m multitag.cli train ...`   (DDP, N processes; skipped for N=1)

Same recipe, seed and global batch, so the val metric should agree to noise (BatchNorm statistics
are per process without train.sync_bn) and the throughput shows what DDP costs or gains here.
NCCL on a CUDA machine (one GPU per process), gloo on the CPU. Prints a markdown table for
benchmarks/RESULTS.md.

  python benchmarks/bench_ddp.py                        # digits mosaics, demo recipe, N=2
  python benchmarks/bench_ddp.py --nproc 1              # a 1-GPU machine: plain vs DDP x1
  python benchmarks/bench_ddp.py --recipe advanced_cnn --data ../shared/data/voc2007 --set data.image_size=128
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def run(label: str, launcher: list[str], args: list[str], out: Path) -> dict:
    cmd = [*launcher, "-m", "multitag.cli", "train", *args, "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)   # -m multitag from the checkout
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "model.json").read_text())
    monitor = meta["monitor"]
    later = rows[1:] or rows                                   # epoch 1 pays warm-up costs
    return {"label": label, "img_s": statistics.median(r["train_img_per_s"] for r in later),
            "epoch_s": statistics.median(r["seconds"] for r in later), "wall_s": wall,
            "monitor": monitor, "last": rows[-1][f"val_{monitor}"], "best": meta["best_value"],
            "runtime": meta["runtime"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--data", help="dataset path (default: built-in digit mosaics, 2400/600/600)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the ddp xN row (default 2)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/bench_ddp")
    a = p.parse_args()
    data = a.data
    if data is None:
        from multitag.api import demo_data_dir
        from multitag.demo_data import make_digit_mosaics

        data = str(make_digit_mosaics(demo_data_dir()))
    sets = [f"train.epochs={a.epochs}", "train.report=false", *a.overrides]
    args = [a.recipe, "--data", data, *[f for s in sets for f in ("--set", s)]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    out = Path(a.out)
    results = [run("plain", [sys.executable], args, out / "plain"),
               run("ddp x1", [*torchrun, "--nproc-per-node=1"], args, out / "ddp1")]
    if a.nproc > 1:
        results.append(run(f"ddp x{a.nproc}", [*torchrun, f"--nproc-per-node={a.nproc}"], args, out / f"ddp{a.nproc}"))
    m = results[0]["monitor"]
    print(f"| run | runtime | train img/s | s/epoch | wall s | last val {m} | best val {m} |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['runtime']} | {r['img_s']:.0f} | {r['epoch_s']:.2f} | {r['wall_s']:.0f} | "
              f"{r['last']:.4f} | {r['best']:.4f} |")


if __name__ == "__main__":
    main()
