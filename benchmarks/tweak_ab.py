"""One layer tweak's worth on the training step: the step with and without it, interleaved in one process.

    .venv/bin/python benchmarks/tweak_ab.py --tweak fused_batchnorm [--others matmul_weight_grad]
        [--model advanced_cnn] [--image-size 128] [--batch-size 32] [--precision bf16|fp32] [--threads 2]
        [--rounds 8] [--steps 3] [--json]

Both models are copies of one (same weights), prepared by the runtime as channels_last with ``--others``
on, one of them with ``--tweak`` too; each round times ``--steps`` training steps (BCE on random targets,
fused Adam) of each, and the fastest round counts. On these shared hosts a lever of a few per cent shows only
this way: run-to-run drift between two bench runs is as large (benchmarks/RESULTS.md, runs R and S).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multitag import allocator  # noqa: E402
from multitag.inference_speed import time_calls  # noqa: E402
from multitag.models import build_model  # noqa: E402
from multitag.runtime import Runtime, describe_cpu  # noqa: E402


def names(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def ab(model_name: str, tweak: str, others: tuple[str, ...], image_size: int, batch: int, threads: int,
       rounds: int, steps: int, precision: str = "bf16") -> dict:
    base = build_model(model_name, 20).train()
    x = torch.randn(batch, 3, image_size, image_size)
    y = (torch.rand(batch, 20) < 0.1).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    kinds = {"without": others, "with": (tweak, *others)}
    rts = {k: Runtime(torch.device("cpu"), precision, True, threads, t) for k, t in kinds.items()}
    nets = {k: rts[k].prepare_model(copy.deepcopy(base)) for k in kinds}
    optims = {k: torch.optim.Adam(n.parameters(), 1e-3, fused=True) for k, n in nets.items()}

    def run(k: str):
        def steps_of(inputs: torch.Tensor) -> None:
            for _ in range(steps):
                optims[k].zero_grad(set_to_none=True)
                with rts[k].autocast():
                    loss = loss_fn(nets[k](inputs).float(), y)
                loss.backward()
                optims[k].step()
        return steps_of

    with rts["with"].thread_count():
        best = {k: fastest / steps for k, (_, fastest) in
                time_calls({k: run(k) for k in kinds}, rts["with"].prepare_input(x), rounds).items()}
    return {"cpu": describe_cpu(), "model": model_name, "image_size": image_size, "batch_size": batch,
            "precision": precision, "threads": threads, "tweak": tweak, "others": list(others),
            "img_s": {k: batch / t for k, t in best.items()}, "speed_up": best["without"] / best["with"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tweak", required=True, help="the layer tweak under test (multitag/layer_tweaks.py)")
    ap.add_argument("--others", default="", help="tweaks on in both, comma-separated")
    ap.add_argument("--model", default="advanced_cnn")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed call")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    allocator.keep_freed_memory()
    r = ab(a.model, a.tweak, names(a.others), a.image_size, a.batch_size, a.threads, a.rounds, a.steps, a.precision)
    if a.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['cpu']}; {a.model} @{a.image_size} px, batch {a.batch_size}, {a.precision} channels_last"
          f"{' + ' + a.others if a.others else ''}, {a.threads} threads, best of {a.rounds} rounds")
    print(f"  without {a.tweak}: {r['img_s']['without']:.1f} img/s   with: {r['img_s']['with']:.1f} img/s"
          f"   {r['speed_up']:.3f}x")


if __name__ == "__main__":
    main()
