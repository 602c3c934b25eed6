"""Where one training step's time goes (issue 9): throughput, the top ops, and each conv's forward vs backward.

    .venv/bin/python benchmarks/profile_step.py [--model advanced_cnn] [--image-size 128] [--batch-size 32]
        [--precision bf16|fp32] [--tweaks fp32_depthwise,nchw_odd_batchnorm] [--nchw] [--threads 2] [--compile]
        [--allocator kept|default] [--no-profile] [--json]

The step is multitag's chosen CPU step without the data pipeline: autocast (bf16) or not, channels_last
unless --nchw, fused Adam, BCE on random multi-label targets, with glibc's malloc keeping freed memory as
the CLI sets it (multitag/allocator.py; ``--allocator default`` leaves glibc as it is). Run it on an idle machine: with other jobs
on the cores, 2-thread kernels are descheduled and the breakdown says more about the load than the step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile

from multitag import allocator
from multitag.models import build_model
from multitag.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="advanced_cnn")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--nchw", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tweaks", default="", help="layer tweaks, comma-separated (multitag/layer_tweaks.py)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--allocator", choices=["kept", "default"], default="kept",
                    help="kept: glibc keeps freed memory, as the multitag CLI sets it; default: glibc as it is")
    ap.add_argument("--no-profile", action="store_true", help="throughput only")
    ap.add_argument("--json", action="store_true", help="print the throughput as one JSON line (no profile)")
    a = ap.parse_args()
    if a.allocator == "kept":
        allocator.keep_freed_memory()
    torch.set_num_threads(a.threads)
    fmt = torch.contiguous_format if a.nchw else torch.channels_last
    rt = Runtime(torch.device("cpu"), a.precision, channels_last=not a.nchw,
                 layer_tweaks=tuple(t for t in a.tweaks.split(",") if t))
    model = rt.prepare_model(build_model(a.model, 20).train())        # the engine's autocast and layer precisions
    net = torch.compile(model) if a.compile else model
    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size).contiguous(memory_format=fmt)
    y = (torch.rand(a.batch_size, 20) < 0.1).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()


    def step():
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            out = net(x)                                                  # (B, 20) logits
        loss_fn(out.float(), y).backward()
        opt.step()

    start = time.perf_counter()
    step(), step()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - start) / a.steps
    if a.json:
        print(json.dumps({"img_s": a.batch_size / dt, "warm_up_s": warm, "allocator": allocator.state,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "load": os.getloadavg()[0]}))
    else:
        print(f"{a.model} @{a.image_size} px, batch {a.batch_size}, {rt.describe()}, "
              f"{a.threads} thread{'s' * (a.threads > 1)}{', compiled' if a.compile else ''}: "
              f"{a.batch_size / dt:.1f} img/s ({dt * 1e3:.0f} ms/step; "
              f"warm-up {warm:.1f} s); malloc: {allocator.state}; load average {os.getloadavg()[0]:.2f}")
    if a.no_profile or a.json:
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print("\nshare of the step's self CPU time, top ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.self_cpu_time_total / total:6.1%}  {e.key}")
    print("\nconvolutions by input shape, ms per call (forward = mkldnn_convolution):")
    convs = [e for e in prof.key_averages(group_by_input_shape=True)
             if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward")]
    for e in sorted(convs, key=lambda e: -e.self_cpu_time_total)[:14]:
        shapes = " ".join(str(s) for s in e.input_shapes[:3] if s)
        print(f"  {e.self_cpu_time_total / 1e3 / e.count:7.1f}  {e.key[6:]:22s} {shapes}")


if __name__ == "__main__":
    main()
