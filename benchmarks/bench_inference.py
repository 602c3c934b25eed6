"""Inference speed on this machine: eager PyTorch (fp32 NCHW / channels_last, bf16), ONNX Runtime fp32 and int8.

    python benchmarks/bench_inference.py                  # trains a 1-epoch demo run in a temp dir
    python benchmarks/bench_inference.py --run RUN_DIR    # a trained run (copied: the run is not modified)

One process, one model, the same images (the run's val split, normalised) for every backend.
Only the model call is timed (tensor in, logits out); decoding and resizing are the same code for
every backend. Calls are interleaved across backends (round-robin) so that load from other
processes on a shared machine hits them alike; each figure is a median.

  latency     batch 1, milliseconds per call: median, and the fastest call
  throughput  batch 32, images per second: of the median call, and of the fastest call

On a machine shared with other jobs the median moves with their load (a 2-thread op waits for
its slower thread whenever another process holds a core), so the load average is printed and
the fastest call is shown beside the median: it is what the backend does when it has the cores.
PyTorch's OpenMP threads busy-wait by default, and on a loaded machine that made its median
latency 100x its best here (ResNet-18 @128, load 6 on 2 CPUs); `OMP_WAIT_POLICY=PASSIVE` (set
before Python starts) avoids it. ORT's sessions are opened with spinning off (multitag/predict.py).

Rows: "onnx int8" is `multitag export --int8` (static QDQ); "onnx int8 dynamic" is ORT's dynamic
quantisation of the same file, shown because it is what the issue first asked for. The val column
is the run's validation mAP (accuracy for single-label runs) with that backend; it is what
`multitag export --int8` records in model.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from multitag.inference_speed import inference_rows  # noqa: E402  (the timing core, shared with `multitag bench`)
from multitag.openmp import wait_setting  # noqa: E402
from multitag.runtime import describe_cpu  # noqa: E402

RUN_FILES = ("model.json", "model.safetensors", "split.csv")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="trained run directory (default: train a 1-epoch demo run in a temp dir)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per backend (default 30)")
    p.add_argument("--threads", type=int, default=0, help="torch and ORT threads (default: torch's default)")
    return p.parse_args(argv)


def demo_run(tmp: Path) -> Path:
    """A 1-epoch demo-recipe run on built-in digit mosaics: enough for timing, not for accuracy."""
    from multitag import api
    from multitag.demo_data import make_digit_mosaics

    csv_path = make_digit_mosaics(tmp / "digits", {"train": 120, "val": 40, "test": 40}, seed=1)
    return api.train("demo", data=str(csv_path), out=tmp / "run",
                     overrides=["train.epochs=1", "train.precision=fp32"], log=lambda *a: None)


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy(src / name, dst / name)
    return dst


def main(argv=None) -> None:
    import onnxruntime

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    def log(*a):
        print(*a, file=sys.stderr)       # stdout keeps only the table

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(args.run) if args.run else demo_run(tmp)
        run = copy_run(source, tmp / "bench")
        rows = inference_rows(run, args.rounds, log)
        meta = json.loads((run / "model.json").read_text())

    print(f"run: {source}  model: {meta['model']['name']} ({meta['model'].get('num_parameters', '?'):,} params) "
          f"@{meta['input_size']}px, {len(meta['class_names'])} classes")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {torch.get_num_threads()}, "
          f"CPU: {describe_cpu()}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"OpenMP wait: {wait_setting()}")
    metric_name = "val mAP" if meta["multi_label"] else "val acc"
    print(f"{'':<31} {'batch 1 ms':>17} {'batch 32 img/s':>17}")
    print(f"{'backend':<31} {'median':>8} {'best':>8} {'median':>8} {'best':>8} {metric_name:>8} {'max|Δlogit|':>12}")
    for r in rows:
        val = f"{r['val_metric']:.4f}" if r["val_metric"] is not None else "-"
        print(f"{r['backend']:<31} {r['batch1_ms_median']:>8.2f} {r['batch1_ms_best']:>8.2f} "
              f"{r['batch32_img_s_median']:>8.0f} {r['batch32_img_s_best']:>8.0f} {val:>8} "
              f"{r['max_abs_logit_diff']:>12.2e}")


if __name__ == "__main__":
    main()
