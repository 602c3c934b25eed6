"""Inference speed of one run on every backend: eager PyTorch (NCHW, channels_last, bf16), ONNX Runtime
fp32, and ONNX Runtime int8 (static QDQ, as `multitag export --int8` writes it, and ORT's dynamic
quantisation). Used by `multitag bench` and benchmarks/bench_inference.py.

One model, the same images (the run's val split, normalised) for every backend. Only the model
call is timed (tensor in, logits out): decoding and resizing are the same code for every backend.
Calls are interleaved across backends (round-robin), so load from other processes on a shared
machine hits them alike; each figure is a median, with the fastest call beside it.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from multitag.runtime import Runtime

REFERENCE = "torch eager fp32 channels_last"     # what `multitag predict --backend torch` runs


def backends(run: Path, log) -> tuple[dict, dict, torch.Tensor]:
    """Export the run (fp32 + static int8, plus a dynamic int8 file) and return {name: logits
    function}, {name: val metric or None when not measured}, and 32 normalised val images."""
    from multitag.evaluation import prepare_for
    from multitag.export import check_images, export_onnx, write_int8
    from multitag.predict import ONNX_MODEL, OnnxBackend, TorchBackend, load

    result = export_onnx(run, int8=True, log=log)
    model = load(run, device="cpu", backend="torch")
    prepared = prepare_for(model, None, log)
    dynamic = write_int8(model, run / ONNX_MODEL, run / "model.dynamic.onnx", prepared, "dynamic", log)
    nchw = copy.deepcopy(model.network).to(memory_format=torch.contiguous_format)
    cpu = torch.device("cpu")
    fns = {"torch eager fp32 NCHW": TorchBackend(nchw, Runtime(cpu, "fp32", False)),
           REFERENCE: model.logits,
           "torch eager bf16 channels_last": TorchBackend(model.network, Runtime(cpu, "bf16", True)),
           "onnx fp32": load(run, device="cpu", backend="onnx").logits,
           "onnx int8 (static)": load(run, device="cpu", backend="onnx-int8").logits,
           "onnx int8 dynamic": OnnxBackend(run / "model.dynamic.onnx", cpu)}
    static = result["int8"]
    metric = {"torch eager fp32 NCHW": static["val_fp32"], REFERENCE: static["val_fp32"],
              "torch eager bf16 channels_last": None, "onnx fp32": static["val_fp32"],
              "onnx int8 (static)": static["val_int8"], "onnx int8 dynamic": dynamic["val_int8"]}
    images = check_images(model, prepared, "val", 32)
    images = images.repeat(-(-32 // len(images)), 1, 1, 1)[:32]        # fewer than 32 val images: repeat
    return fns, metric, images


def time_calls(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, fastest) seconds per call of each function on ``x``, calls interleaved across functions."""
    for fn in fns.values():                       # warm-up: ORT and oneDNN pick kernels on first calls
        for _ in range(3):
            fn(x)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def inference_rows(run: Path, rounds: int, log) -> list[dict]:
    """One row per backend: batch-1 latency (ms) and batch-32 throughput (img/s), median and best,
    the val metric, the largest logit difference from the reference, and the speed-up over eager
    fp32 NCHW (today's PyTorch default) at batch 32."""
    fns, metric, images = backends(run, log)
    latency = time_calls(fns, images[:1], rounds)
    batch = time_calls(fns, images, max(3, rounds // 3))
    reference = fns[REFERENCE](images)
    base = len(images) / batch["torch eager fp32 NCHW"][0]
    rows = []
    for name, fn in fns.items():
        (b1, b1_best), (b32, b32_best) = latency[name], batch[name]
        rows.append({"backend": name, "batch1_ms_median": 1000 * b1, "batch1_ms_best": 1000 * b1_best,
                     "batch32_img_s_median": len(images) / b32, "batch32_img_s_best": len(images) / b32_best,
                     "val_metric": metric[name], "max_abs_logit_diff": float((fn(images) - reference).abs().max()),
                     "speedup_vs_eager_nchw": len(images) / b32 / base})
    return rows
