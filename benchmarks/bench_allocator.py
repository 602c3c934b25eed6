"""glibc's malloc with freed memory kept (what the multitag CLI sets, multitag/allocator.py) vs glibc as it is.

    .venv/bin/python benchmarks/bench_allocator.py [--rounds 2] [--steps 6] [--only advanced_cnn,airbench]

The allocator is process-wide and cannot be switched back inside a process (the heap keeps what it
grew to), so every figure is its own process: benchmarks/profile_step.py's training step (the engine's
autocast, layer precisions and fused Adam, without the data pipeline) run with ``--allocator kept`` and
``--allocator default`` one after the other, rounds interleaved; a row shows the best round's img/s of each
and the peak RSS. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from multitag import allocator
from multitag.runtime import describe_cpu

STEP = Path(__file__).with_name("profile_step.py")
# (label, profile_step.py arguments): the recipes' models at their training sizes and batches, bf16 autocast +
# channels_last as the runtime picks on an AMX CPU, and the naive reference loop's fp32 NCHW.
CASES = {
    "advanced_cnn": ("ResNet-18 layout @128, batch 32, bf16 CL", "--model advanced_cnn --image-size 128"),
    "advanced_cnn_224": ("ResNet-18 layout @224, batch 32, bf16 CL", "--model advanced_cnn --image-size 224"),
    "advanced_cnn_fp32": ("ResNet-18 layout @128, batch 32, fp32 NCHW (the naive loop's)",
                          "--model advanced_cnn --image-size 128 --precision fp32 --nchw"),
    "efficientnet_lite0": ("EfficientNet-Lite0 @224, batch 32, bf16 CL, depthwise backward in fp32",
                           "--model efficientnet_lite0 --image-size 224 --tweaks fp32_depthwise"),
    "inception_resnet_v1_small": ("Inception-ResNet-v1 small @160, batch 64, bf16 CL",
                                  "--model inception_resnet_v1_small --image-size 160 --batch-size 64"),
    "airbench": ("airbench @32, batch 1024, bf16 CL (cifar10_speed)", "--model airbench --image-size 32 --batch-size 1024"),
    "simple_cnn": ("simple_cnn @32, batch 64, bf16 CL (small activations: no gain expected)",
                   "--model simple_cnn --image-size 32 --batch-size 64"),
}


def run_case(args: str, alloc: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, str(STEP), *args.split(), "--steps", str(steps), "--threads", str(threads),
           "--allocator", alloc, "--json"]
    env = allocator.without_user_choice()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help=f"comma-separated cases of: {', '.join(CASES)}")
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"bench_allocator: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    print(f"{os.cpu_count()} CPUs, {describe_cpu()}, {a.threads} threads, {a.steps} steps a round, "
          f"{a.rounds} rounds; load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':62s} {'default img/s':>13s} {'kept img/s':>10s} {'×':>6s} {'peak RSS MiB default → kept':>28s}")
    for name in names:
        label, args = CASES[name]
        best = {"default": None, "kept": None}
        for _ in range(a.rounds):
            for alloc in best:
                r = run_case(args, alloc, a.steps, a.threads)
                if best[alloc] is None or r["img_s"] > best[alloc]["img_s"]:
                    best[alloc] = r
        d, k = best["default"], best["kept"]
        print(f"{label:62s} {d['img_s']:13.1f} {k['img_s']:10.1f} {k['img_s'] / d['img_s']:5.2f}× "
              f"{d['peak_rss_mib']:>13,.0f} → {k['peak_rss_mib']:,.0f} ({k['peak_rss_mib'] / d['peak_rss_mib'] - 1:+.0%})",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
