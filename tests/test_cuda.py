"""The CUDA path end to end: what the CPU tests check, run where a GPU is (they skip elsewhere).

The same code trains on CUDA (the measured runtime, bf16 autocast where the GPU has it, train rows held
on the GPU as uint8, augmentation there), and a CUDA run's model predicts on the CPU what it predicts
on the GPU. Run by benchmarks/gpu_check.sh on a lent GPU machine; CI has no GPU, so here they skip.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multitag.api import evaluate, train
from multitag.checkpoint import MODEL_META
from multitag.predict import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = ["train.epochs=2", "train.batch_size=32", "data.image_size=32", "train.channels_last=false",
        "sched.name=cosine", "train.report=false"]


def _losses(run) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fp32_training_on_cuda_follows_the_cpu_run(digits_csv, tmp_path):
    """Same seed, data order and augmentation draws (CPU generator) on both devices: per-epoch losses
    agree to what TF32 convolutions and cuDNN's summation order move them by."""
    runs = {dev: train("demo", data=digits_csv, out=tmp_path / dev, log=lambda *a: None,
                       overrides=FAST + ["train.precision=fp32", f"train.device={dev}"]) for dev in ("cpu", "cuda")}
    assert json.loads((runs["cuda"] / MODEL_META).read_text())["runtime"].startswith("cuda")
    np.testing.assert_allclose(_losses(runs["cuda"]), _losses(runs["cpu"]), atol=0.02)


def test_auto_runtime_on_cuda_trains_and_the_model_predicts_alike_on_cpu(digits_csv, tmp_path):
    run = train("demo", data=digits_csv, out=tmp_path / "run", log=lambda *a: None,
                overrides=FAST + ["train.precision=auto", "train.channels_last=auto", "train.device=cuda"])
    meta = json.loads((run / MODEL_META).read_text())
    assert meta["runtime"].startswith("cuda") and np.isfinite(_losses(run)).all()
    images = sorted(str(p) for p in digits_csv.parent.glob("images/*.png"))[:16]
    assert len(images) == 16
    on_gpu = load(run, device="cuda", backend="torch").predict_scores(images)
    on_cpu = load(run, device="cpu", backend="torch").predict_scores(images)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3)       # the predictor runs fp32 (TF32 convs on CUDA)


def test_cifar_speed_recipe_on_cuda_holds_train_rows_on_the_gpu(tiny_cifar, tmp_path, monkeypatch):
    """The airbench path the CUDA time-to-accuracy figure uses: rows on the GPU, lookahead, EMA, TTA."""
    from multitag.data import loader as loader_module

    held = []
    real_init = loader_module.DeviceCache.__init__

    def spy(self, cache, rows, device):
        held.append(device.type)
        real_init(self, cache, rows, device)

    monkeypatch.setattr(loader_module.DeviceCache, "__init__", spy)
    run = train("cifar10_speed", data=str(tiny_cifar), out=tmp_path / "run", log=lambda *a: None,
                overrides=["train.epochs=2", "train.batch_size=16", "train.eval_batch_size=32", "train.ema=0.9",
                           "train.track_test=true", "optim.lr=0.2", "train.device=cuda"])
    assert "cuda" in held
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    kept = rows[json.loads((run / MODEL_META).read_text())["best_epoch"] - 1]
    # the kept model scored again through `multitag eval` (fp32 predictor) vs its epoch's tracked score
    assert evaluate(run, split="test", log=lambda *a: None)["accuracy"] == pytest.approx(kept["test_accuracy"],
                                                                                        abs=0.05)


def test_matmul_gradient_tweak_runs_on_cuda_tensors(tmp_path, monkeypatch):
    """The runtime also times the layer tweaks on CUDA: the small-map conv's gradient plan is measured there
    (synchronised), and its GEMM gradients stay on the GPU and agree with cuDNN's to bf16 rounding."""
    import copy

    from multitag import matmul_conv
    from multitag.layer_tweaks import apply_tweaks

    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))

    torch.manual_seed(0)
    plain = torch.nn.Conv2d(256, 512, 3, 2, 1, bias=False).cuda().to(memory_format=torch.channels_last)
    kept = copy.deepcopy(plain)
    assert apply_tweaks(kept, ("matmul_weight_grad",)) == 1
    x = torch.randn(4, 256, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ys = [plain(xs[0]), kept(xs[1])]                       # (4, 512, 4, 4)
    g = torch.randn_like(ys[0])
    measured = matmul_conv.plan_for(g.to(torch.bfloat16), xs[1].to(torch.bfloat16), kept.weight.to(torch.bfloat16),
                                    [2, 2], [1, 1], [1, 1])
    assert len(json.loads((tmp_path / "conv_grad_plans.json").read_text())) == 1 and len(measured) == 2
    monkeypatch.setattr(matmul_conv, "plan_for", lambda *a: matmul_conv.Plan(True, True))     # both GEMMs
    for y in ys:
        y.backward(g)
    assert xs[1].grad.device.type == "cuda" and kept.weight.grad.device.type == "cuda"
    for got, want in [(xs[1].grad, xs[0].grad), (kept.weight.grad, plain.weight.grad)]:
        torch.testing.assert_close(got, want, rtol=2 ** -6, atol=4e-3 * want.abs().max().item())


def test_fused_batchnorm_tweak_leaves_cuda_tensors_to_the_layers_own_ops():
    """The kernel is for CPUs: on CUDA a tweaked ResNet block computes exactly what timm's does."""
    import copy

    import timm

    from multitag.layer_tweaks import apply_tweaks

    torch.manual_seed(0)
    plain = timm.models.resnet.BasicBlock(64, 64).cuda().to(memory_format=torch.channels_last).train()
    kept = copy.deepcopy(plain)
    assert apply_tweaks(kept, ("fused_batchnorm",)) == 3                # the block and its two BatchNorms
    x = torch.randn(4, 64, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(plain(x), kept(x))
