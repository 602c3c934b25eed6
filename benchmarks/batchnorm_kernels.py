"""The fused BatchNorm kernel (multitag/fused_batchnorm.py) against ATen's, per ResNet-18 map (RESULTS run S).

    .venv/bin/python benchmarks/batchnorm_kernels.py [--image-size 224] [--batch-size 32] [--threads 2]
        [--rounds 10] [--compile] [--json]

For each map a ResNet-18 trains on at this image size (the stem's, then each stage's), bf16 channels_last
as autocast hands it on: forward + backward of BatchNorm alone, BatchNorm + ReLU, and BatchNorm + residual
add + ReLU (a BasicBlock's tail), each by ATen's kernels (nn.BatchNorm2d, `+`, torch.relu) and by the
fused kernel, timed interleaved (fastest round). ``--compile`` adds the same module under torch.compile
(inductor's generated kernels; the first call compiles). Also a copy of the map, for the memory's pace.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multitag import allocator, cpu_kernels, fused_batchnorm  # noqa: E402
from multitag.inference_speed import time_calls  # noqa: E402
from multitag.runtime import describe_cpu  # noqa: E402

TAILS = {"BN": (False, "none"), "BN+ReLU": (False, "relu"), "BN+add+ReLU": (True, "relu")}


def resnet18_maps(image_size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(N, C, H, W) of the stem's BatchNorm and of each stage's."""
    stem = -(-image_size // 2)
    side = -(-stem // 2)
    return [(batch, 64, stem, stem)] + [(batch, 64 << i, -(-side // (1 << i)), -(-side // (1 << i))) for i in range(4)]


class Tail(nn.Module):
    """act(BN(x) + residual?) by ATen's ops, or by the fused kernel (``fused``)."""

    def __init__(self, channels: int, residual: bool, act: str, fused: bool):
        super().__init__()
        self.bn, self.residual, self.act, self.fused = nn.BatchNorm2d(channels), residual, act, fused

    def forward(self, x, r):
        if self.fused:
            return fused_batchnorm.batchnorm_act(self.bn, x, r if self.residual else None, act=self.act)
        y = self.bn(x)
        y = y + r if self.residual else y
        return torch.relu(y) if self.act == "relu" else y


def rows(image_size: int, batch: int, rounds: int, compile_too: bool) -> list[dict]:
    out = []
    for shape in resnet18_maps(image_size, batch):
        x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
        r = torch.randn_like(x).requires_grad_()
        dy = torch.randn_like(x)
        for tail, (residual, act) in TAILS.items():
            kinds = {"ATen": Tail(shape[1], residual, act, False), "fused": Tail(shape[1], residual, act, True)}
            if compile_too:
                torch._dynamo.reset()        # a fresh graph per case: dynamo stops recompiling after 8
                kinds["inductor"] = torch.compile(Tail(shape[1], residual, act, False))

            def step(module):
                def run(inputs):
                    inputs.grad = r.grad = None
                    module(inputs, r).backward(dy)
                return run
            fns = {k: step(m.train()) for k, m in kinds.items()}
            fns["copy of the map"] = lambda inputs: inputs.detach().clone()
            best = {k: fastest for k, (_, fastest) in time_calls(fns, x, rounds).items()}
            row = {"map": "x".join(map(str, shape)), "tail": tail, **{f"{k} ms": 1000 * t for k, t in best.items()}}
            row["fused speed-up"] = best["ATen"] / best["fused"]
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time inductor's kernels for the same ops")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if reason := cpu_kernels.unavailable_reason():
        sys.exit(f"the fused BatchNorm kernel could not be built here ({reason}); install a C++ compiler")
    allocator.keep_freed_memory()
    torch.set_num_threads(a.threads)
    result = {"cpu": describe_cpu(), "threads": a.threads, "rows": rows(a.image_size, a.batch_size, a.rounds, a.compile)}
    if a.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['cpu']}; bf16 channels_last, forward + backward, {a.threads} threads")
    for row in result["rows"]:
        times = "  ".join(f"{k[:-3]} {v:7.2f}" for k, v in row.items() if k.endswith(" ms"))
        print(f"  {row['map']:>16} {row['tail']:<12} ms: {times}   fused {row['fused speed-up']:.2f}x")


if __name__ == "__main__":
    main()
