"""Where a training step stands against the conv peak (issue 9, RESULTS run Q): each part of it timed alone.

    .venv/bin/python benchmarks/conv_parts.py [--model advanced_cnn] [--image-size 224] [--batch-size 32]
        [--precision bf16|fp32] [--tweaks fused_batchnorm,max_pool_kernel,matmul_weight_grad] [--threads 2] [--rounds 4] [--json]

1. The whole training step (autocast or not, channels_last, fused AdamW, BCE on random targets, the layer
   tweaks named) and the same step with one layer class swapped for nn.Identity — BatchNorm, ReLU — timed
   interleaved, best round: what those memory-bound layers cost, and at what GFLOP/s (multitag/ceiling.py's
   count) the rest runs. (timm's BatchNormAct2d, in EfficientNet, carries its activation: that goes with it.)
   Where they apply, also the step without one of multitag's levers — timm's stem order (ReLU before the
   max-pool, models/resnet_stem.py), oneDNN's conv gradients on the smallest maps instead of the GEMMs
   measured faster there (matmul_conv.py), ATen's BatchNorm, add and ReLU instead of the fused kernel
   (fused_batchnorm.py), ATen's max-pool instead of multitag's (max_pool.py) — in the same interleaved rounds: what each lever is worth here, free of the
   drift between runs that hides a few per cent (RESULTS run R).
2. Each distinct 3x3 conv of a ResNet's stages at this image size (multitag.ceiling.conv_shapes, each
   stage's first conv strided from the stage before): forward, and the input and weight gradients each by
   oneDNN and by matmul_conv's GEMMs, in GFLOP/s and ms.
The figures beside multitag bench's ceiling section: how far below its peak each part runs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # runs from a bare checkout too

from multitag.ceiling import DTYPES, best_seconds, conv_shapes, training_flops  # noqa: E402
from multitag.inference_speed import time_calls  # noqa: E402
from multitag.matmul_conv import input_grad_by_matmul, weight_grad_by_matmul  # noqa: E402
from multitag.models import build_model  # noqa: E402
from multitag.models.resnet_stem import PoolFirstResNet, relu_before_pool  # noqa: E402
from multitag.runtime import Runtime, describe_cpu  # noqa: E402


def without(model: nn.Module, cls: type) -> nn.Module:
    """A copy of ``model`` with every ``cls`` layer replaced by nn.Identity."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, cls):
                setattr(parent, name, nn.Identity())
    return model


# the step without each of multitag's own kernels (cpu_kernels.py) and GEMM gradients, by the tweak that brings it in
WITHOUT_LEVER = {"fused_batchnorm": "with ATen's BatchNorm, add, ReLU", "max_pool_kernel": "with ATen's max-pool",
                 "matmul_weight_grad": "with oneDNN's conv gradients"}


def step_rows(model: nn.Module, rt: Runtime, x: torch.Tensor, y: torch.Tensor, rounds: int) -> list[dict]:
    """The training step with and without BatchNorm / ReLU, and without each lever that applies: ms,
    img/s, and the GFLOP/s of what is left."""
    loss_fn = lambda logits, t, ignore: F.binary_cross_entropy_with_logits(logits.float(), t)  # noqa: E731
    flops = training_flops(model, loss_fn, x, y)
    variants = {"whole step": model, "without BatchNorm": without(model, nn.modules.batchnorm._BatchNorm),
                "without ReLU": without(model, nn.ReLU)}
    if type(model) is PoolFirstResNet:
        variants["with timm's stem order"] = relu_before_pool(copy.deepcopy(model))
    runtimes = {k: rt for k in variants}
    for tweak, part in WITHOUT_LEVER.items():              # multitag's own levers, each left out once
        if tweak in rt.layer_tweaks:
            variants[part] = copy.deepcopy(model)
            runtimes[part] = dataclasses.replace(rt, layer_tweaks=tuple(t for t in rt.layer_tweaks if t != tweak))
    nets = {k: runtimes[k].prepare_model(v).train() for k, v in variants.items()}
    optims = {k: torch.optim.AdamW(v.parameters(), 1e-4, fused=True) for k, v in nets.items()}
    xs = rt.prepare_input(x)

    def step(k: str):
        def run(inputs: torch.Tensor) -> None:
            with rt.autocast():
                loss = loss_fn(nets[k](inputs), y, None)
            optims[k].zero_grad()
            loss.backward()
            optims[k].step()
        return run

    # interleaved (a burst of load slows one round of each), fastest round
    best = {k: fastest for k, (_, fastest) in time_calls({k: step(k) for k in nets}, xs, rounds).items()}
    whole = best["whole step"]
    return [{"part": k, "ms": 1000 * t, "img_s": len(x) / t, "saves": None if k == "whole step" else 1 - t / whole,
             "gflop_s_of_the_rest": len(x) * flops / t / 1e9} for k, t in best.items()]


def conv_rows(image_size: int, batch: int, precision: str, reps: int) -> list[dict]:
    """Per 3x3 conv shape: forward, input gradient and weight gradient, each of the two by oneDNN and by matmul."""
    dtype = DTYPES[precision]
    stages = conv_shapes(image_size)
    shapes = []                                   # (c_in, c_out, input map, stride)
    for i, (c, size) in enumerate(stages):
        if i:
            shapes.append((stages[i - 1][0], c, stages[i - 1][1], 2))
        shapes.append((c, c, size, 1))
    rows = []
    for cin, cout, size, stride in shapes:
        cl = torch.channels_last
        x = torch.randn(batch, cin, size, size, dtype=dtype).contiguous(memory_format=cl)
        w = torch.randn(cout, cin, 3, 3, dtype=dtype).contiguous(memory_format=cl)
        g = torch.randn_like(F.conv2d(x, w, None, stride, 1))
        out = g.shape[-1]
        flops = 2 * batch * cout * cin * 9 * out * out

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [1, 1], [1, 1], False,
                                                               [0, 0], 1, mask)
        parts = {"forward": lambda: F.conv2d(x, w, None, stride, 1),
                 "input gradient (oneDNN)": backward([True, False, False]),
                 "input gradient (matmul)": lambda: input_grad_by_matmul(g, w, x.shape, (stride,) * 2, (1, 1), (1, 1)),
                 "weight gradient (oneDNN)": backward([False, True, False]),
                 "weight gradient (matmul)": lambda: weight_grad_by_matmul(g, x, (3, 3), (stride,) * 2, (1, 1), (1, 1))}
        with torch.no_grad():
            times = {k: best_seconds(f, reps) for k, f in parts.items()}
        rows.append({"conv": f"{cin}->{cout} 3x3/{stride} on {size}x{size} (out {out}x{out})",
                     **{f"{k} GFLOP/s": flops / t / 1e9 for k, t in times.items()},
                     **{f"{k} ms": 1000 * t for k, t in times.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="advanced_cnn")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--tweaks", default="", help="layer tweaks, comma-separated (multitag/layer_tweaks.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    rt = Runtime(torch.device("cpu"), a.precision, True, a.threads, tuple(t for t in a.tweaks.split(",") if t))
    model = build_model(a.model, 20, pretrained=False)
    x, y = torch.randn(a.batch_size, 3, a.image_size, a.image_size), torch.rand(a.batch_size, 20)
    with rt.thread_count():
        steps = step_rows(model, rt, x, y, a.rounds)
        convs = conv_rows(a.image_size, a.batch_size, a.precision, a.rounds)
    if a.json:
        print(json.dumps({"cpu": describe_cpu(), "options": vars(a), "step": steps, "convs": convs}))
        return
    print(f"{describe_cpu()}; {a.model} @{a.image_size} px, batch {a.batch_size}, {rt.describe()}")
    width = max(len(r["part"]) for r in steps)
    for r in steps:
        print(f"  {r['part']:{width}s} {r['ms']:8.1f} ms {r['img_s']:8.1f} img/s  "
              + ("" if r["saves"] is None else f"saves {r['saves']:.0%} of the step; " if r["saves"] >= 0
                 else f"costs {-r['saves']:.0%} more; ")
              + f"training FLOPs at {r['gflop_s_of_the_rest']:,.0f} GFLOP/s")
    print("  conv shape                                   GFLOP/s: forward    input grad     weight grad   (oneDNN / matmul)")
    for r in convs:
        v = [r[f"{k} GFLOP/s"] for k in ("forward", "input gradient (oneDNN)", "input gradient (matmul)",
                                         "weight gradient (oneDNN)", "weight gradient (matmul)")]
        print(f"  {r['conv']:44s} {v[0]:14,.0f} {v[1]:7,.0f} / {v[2]:<6,.0f} {v[3]:6,.0f} / {v[4]:,.0f}")


if __name__ == "__main__":
    main()
