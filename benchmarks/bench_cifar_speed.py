"""CIFAR-10 time to accuracy (issue 9): train the cifar10_speed recipe, print the wall time to 86.8 % and to 94 %.

    .venv/bin/python benchmarks/bench_cifar_speed.py [--data ../shared/data/cifar10] [--out runs/cifar10-speed]
        [--set train.epochs=8 ...]          # extra recipe overrides, passed to `multitag train`
    .venv/bin/python benchmarks/bench_cifar_speed.py --run runs/cifar10-speed     # only read a finished run

Time to X = the sum of the epochs' `seconds` (training + val scoring) up to the first epoch whose TEST
accuracy reaches X. The per-epoch test accuracy comes from `train.track_test=true`, a benchmark
measurement that is logged only (its scoring time, `test_seconds`, is not counted; the epoch kept as
the result is picked on val). Data preparation (decode-once cache, runtime measurement) is reported
apart: it is paid once per machine and dataset, not per run. The final line is `multitag eval --split
test` of the kept model, which is what a user of the run gets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from multitag.runtime import describe_cpu  # noqa: E402

TARGETS = (0.868, 0.94)              # the simple_cnn reference's 86.80 %, and airbench94's 94 %


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    meta = json.loads((run / "model.json").read_text())
    print(f"run {run}: {meta['model']['name']} on {meta['runtime']}, {len(rows)} epochs")
    print("epoch  seconds  cumulative  val_acc  test_acc")
    elapsed, reached = 0.0, {}
    for r in rows:
        elapsed += r["seconds"]
        test = r.get("test_accuracy")
        val = f"{r['val_accuracy']:7.4f}" if "val_accuracy" in r else "      -"      # "-": trained without val
        print(f"{r['epoch']:5d}  {r['seconds']:7.1f}  {elapsed:10.1f}  {val}  "
              + (f"{test:8.4f}" if test is not None else "       -"))
        for target in TARGETS:
            if test is not None and test >= target and target not in reached:
                reached[target] = (r["epoch"], elapsed)
    if not any("test_accuracy" in r for r in rows):
        print("no per-epoch test accuracy in metrics.jsonl: train with --set train.track_test=true")
    for target in TARGETS:
        if target in reached:
            epoch, seconds = reached[target]
            print(f"time to {target:.1%} test accuracy: {seconds:.0f} s ({seconds / 60:.1f} min), epoch {epoch}")
        else:
            best = max((r.get("test_accuracy") or 0.0 for r in rows), default=0.0)
            print(f"time to {target:.1%} test accuracy: not reached (best {best:.2%} after {elapsed:.0f} s)")
    out = subprocess.run([sys.executable, "-m", "multitag.cli", "eval", str(run), "--split", "test", "--json"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0:
        result = json.loads(out.stdout)
        acc = result.get("accuracy", result.get("metrics", {}).get("accuracy"))
        kept = "best val" if meta.get("best_value") is not None else "last, no val split:"
        print(f"kept model ({kept} epoch {meta['best_epoch']}): multitag eval --split test accuracy {acc}")
    else:
        print(f"multitag eval failed: {out.stderr.strip().splitlines()[-1:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "cifar10-speed"))
    ap.add_argument("--run", help="only report on this finished run directory")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    args = ap.parse_args()
    print(f"CPU: {describe_cpu()}; load average at start: {load_average()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.run:
        cmd = [sys.executable, "-m", "multitag.cli", "train", "cifar10_speed", "--data", args.data, "--out", args.out,
               "--set", "train.track_test=true"] + [x for s in args.set for x in ("--set", s)]
        print("$ multitag " + " ".join(cmd[3:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        print(f"whole command: {wall:.0f} s (includes data preparation and the per-epoch test scoring); "
              f"load average at end: {load_average()}")
    report(Path(args.run or args.out))


if __name__ == "__main__":
    main()
