"""`multitag bench` end to end on tiny sizes (digit mosaics, one step, 32 px): every section's rows
come back and print. No timing is asserted: the figures depend on the machine and its load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multitag import bench
from multitag.bench import BenchOptions, print_bench, run_bench
from multitag.cli import main
from multitag.errors import UserError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """benchmarks/``name`` run with this interpreter, its output captured."""
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


TINY = ["--data", "digits", "--model", "simple_cnn", "--images", "16", "--batch-size", "8", "--image-size", "32",
        "--steps", "1", "--rounds", "1", "--scaling", "1,2", "--inference-rounds", "1"]


def test_bench_cli_json_has_every_row(capsys):
    assert main(["bench", *TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r["name"])
    assert set(by_section) == {"training", "ceiling", "pipeline", "optimizer", "inference", "scaling"}
    training = by_section["training"]
    assert training[0] == "naive PyTorch loop (reference)"
    assert sum(name.endswith("[chosen]") for name in training) == 1
    assert {"naive PyTorch loop, 1 thread", "multitag, unfused optimizer", "multitag, decode every epoch"} <= set(training)
    if torch.get_num_threads() > 1:           # each runtime candidate is also timed with one thread
        assert any(name.startswith("multitag, cpu bf16 channels_last, 1 thread") for name in training)
    assert by_section["pipeline"] == ["multitag pipeline alone", "naive DataLoader alone"]
    assert {"onnx fp32", "onnx int8 (static)", "torch eager fp32 NCHW", "torch eager fp32 channels_last"} \
        <= set(by_section["inference"])
    assert [r["images"] for r in rows if r["section"] == "scaling"] == [16, 32]
    for r in rows:
        if r["section"] in ("training", "pipeline"):
            assert r["img_s"] > 0 and r["ratio"] > 0
    ceiling = {(r["precision"], r["threads"]): r for r in rows if r["section"] == "ceiling"}
    assert ceiling[("fp32", 1)]["name"] == "fp32, 1 thread: every FLOP at the conv peak"   # the naive 1-thread row's
    naive = rows[0]
    for r in rows:
        if r["section"] == "training":                # achieved GFLOP/s over its own precision's and threads' peak
            peak = ceiling[(r["precision"], r["threads"])]
            assert r["gflop_s"] == pytest.approx(r["img_s"] * peak["gflop_per_image"])
            assert r["of_peak"] == pytest.approx(r["gflop_s"] / peak["gflop_s"])
    for r in ceiling.values():
        assert r["ratio"] == pytest.approx(r["gflop_s"] / r["gflop_per_image"] / naive["img_s"])
    assert result["machine"]["runtime_chosen"]
    assert "load_average_end" in result["machine"]

    print_bench(result)                       # the human table prints every row
    out = capsys.readouterr().out
    for r in rows:
        assert r["name"][:12] in out
    chosen = next(r for r in rows if r["name"].endswith("[chosen]"))
    assert f"computes at {chosen['of_peak']:.0%} of this machine's conv peak for them" in out
    assert 0 <= result["machine"]["round_spread"] < 1
    assert ("noisy machine" in out) == (result["machine"]["round_spread"] > bench.NOISY_SPREAD)
    result["machine"]["round_spread"] = 0.25
    print_bench(result)
    assert "noisy machine: a system's median round ran up to 25% slower" in capsys.readouterr().out


def test_a_noisy_machine_is_called_so():
    rows = [{"section": "training", "name": "a", "img_s": 100.0, "img_s_median": 95.0},
            {"section": "training", "name": "b", "img_s": 50.0, "img_s_median": 40.0},
            {"section": "pipeline", "name": "c", "img_s": 10.0, "img_s_median": 1.0}]     # not a training row
    assert bench.round_spread(rows) == 0.2
    assert bench.round_spread(rows[2:]) is None


def test_bench_refuses_too_few_images():
    with pytest.raises(UserError, match="--images"):
        run_bench(BenchOptions(images=4, batch_size=8), log=lambda *a: None)


def test_bench_scaling_text_is_checked(capsys):
    assert main(["bench", "--scaling", "1,x"]) == 2
    assert "--scaling" in capsys.readouterr().err


def test_profile_step_script_runs_tiny():
    out = run_script("profile_step.py", "--model", "simple_cnn", "--image-size", "32", "--batch-size", "4",
                     "--steps", "1", "--threads", "1", "--precision", "fp32", timeout=120).stdout
    assert "img/s" in out and "convolution_backward" in out and "mkldnn_convolution" in out


def test_conv_parts_script_runs_tiny():
    """benchmarks/conv_parts.py: the step with and without BatchNorm / ReLU, and every conv shape's five parts."""
    out = json.loads(run_script("conv_parts.py", "--model", "simple_cnn", "--image-size", "32", "--batch-size", "4",
                                "--threads", "1", "--rounds", "1", "--precision", "fp32", "--json", timeout=120).stdout)
    assert [r["part"] for r in out["step"]] == ["whole step", "without BatchNorm", "without ReLU"]
    assert all(r["ms"] > 0 and r["gflop_s_of_the_rest"] > 0 for r in out["step"])
    assert len(out["convs"]) == 7                 # four stages' convs and the three strided ones between them
    assert all(v > 0 for r in out["convs"] for k, v in r.items() if k != "conv")
    assert {"input gradient (matmul) ms", "weight gradient (matmul) ms"} <= set(out["convs"][0])
    assert "flags" in out["cpu"]


def test_conv_parts_times_the_step_without_each_lever_that_applies():
    """A ResNet with the matmul tweak: also the step in timm's stem order and without each tweak's lever."""
    out = json.loads(run_script("conv_parts.py", "--model", "advanced_cnn", "--image-size", "32", "--batch-size", "2",
                                "--threads", "1", "--rounds", "1", "--tweaks", "fused_batchnorm,max_pool_kernel,matmul_weight_grad",
                                "--json", timeout=180).stdout)
    assert [r["part"] for r in out["step"]] == ["whole step", "without BatchNorm", "without ReLU",
                                                "with timm's stem order", "with ATen's BatchNorm, add, ReLU",
                                                "with ATen's max-pool", "with oneDNN's conv gradients"]
    assert all(r["ms"] > 0 for r in out["step"])


def test_tweak_ab_script_runs_tiny():
    """benchmarks/tweak_ab.py: the step with and without one tweak, the others on in both."""
    out = json.loads(run_script("tweak_ab.py", "--tweak", "matmul_weight_grad", "--model", "advanced_cnn",
                                "--image-size", "32", "--batch-size", "2", "--threads", "1", "--rounds", "1",
                                "--steps", "1", "--json", timeout=180).stdout)
    assert set(out["img_s"]) == {"without", "with"} and all(v > 0 for v in out["img_s"].values())
    assert out["tweak"] == "matmul_weight_grad" and out["speed_up"] > 0


def test_batchnorm_kernels_script_runs_tiny():
    """benchmarks/batchnorm_kernels.py: every ResNet-18 map at this size, the three BatchNorm tails, both kernels."""
    from multitag import cpu_kernels
    if cpu_kernels.unavailable_reason():
        pytest.skip("no C++ compiler for the fused BatchNorm kernel")
    out = json.loads(run_script("batchnorm_kernels.py", "--image-size", "32", "--batch-size", "2", "--threads", "1",
                                "--rounds", "1", "--json", timeout=180).stdout)
    assert [r["map"] for r in out["rows"][::3]] == ["2x64x16x16", "2x64x8x8", "2x128x4x4", "2x256x2x2", "2x512x1x1"]
    assert [r["tail"] for r in out["rows"][:3]] == ["BN", "BN+ReLU", "BN+add+ReLU"]
    assert all(r["ATen ms"] > 0 and r["fused ms"] > 0 and r["fused speed-up"] > 0 for r in out["rows"])


def test_bench_allocator_script_runs_tiny():
    """benchmarks/bench_allocator.py: one case, each allocator in its own process, one row with both."""
    out = run_script("bench_allocator.py", "--only", "simple_cnn", "--rounds", "1", "--steps", "1",
                     "--threads", "1").stdout
    row = next(line for line in out.splitlines() if line.startswith("simple_cnn @32"))
    default, kept, ratio = row.split()[-7:-4]               # ... img/s img/s ratio× RSS → RSS (±%)
    assert float(default) > 0 and float(kept) > 0 and ratio.endswith("×")
    bad = run_script("bench_allocator.py", "--only", "simple_cnnn", timeout=60, check=False)
    assert bad.returncode != 0 and "unknown case 'simple_cnnn'" in bad.stderr


def test_device_data_pack_and_unpack_give_back_the_same_files(tmp_path):
    """benchmarks/device_data.py carries the data to a GPU machine: a CIFAR-style folder and a VOC-style
    subset (spread over both official splits, with their labels.csv rows) come back byte for byte."""
    import csv

    data = tmp_path / "data"
    for i in range(3):
        for split in ("train", "test"):
            (data / "cifar10" / split / f"c{i}").mkdir(parents=True)
            (data / "cifar10" / split / f"c{i}" / f"{i}.jpg").write_bytes(bytes([i]) * (i + 5) + split.encode())
    (data / "voc2007" / "images").mkdir(parents=True)
    rows = [(f"{n:06d}.jpg", "cat", "", "train" if n < 10 else "val") for n in range(16)]
    for name, *_ in rows:
        (data / "voc2007" / "images" / name).write_bytes(name.encode() * 3)
    with open(data / "voc2007" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "labels", "difficult", "split"), *rows])

    run = lambda *args: run_script("device_data.py", *args, timeout=60)
    run("pack", "--data", str(data), "--out", str(tmp_path / "packed"), "--voc-train", "4", "--voc-val", "2", "--no-wheels")
    run("unpack", str(tmp_path / "packed"), str(tmp_path / "back"))
    for p in (data / "cifar10").rglob("*.jpg"):
        assert (tmp_path / "back" / p.relative_to(data)).read_bytes() == p.read_bytes()
    with open(tmp_path / "back" / "voc2007" / "labels.csv", newline="") as f:
        kept = list(csv.DictReader(f))
    assert [r["split"] for r in kept] == ["train"] * 4 + ["val"] * 2
    assert [r["image"] for r in kept][:4] == ["000000.jpg", "000002.jpg", "000004.jpg", "000006.jpg"]  # spread
    for r in kept:
        assert (tmp_path / "back" / "voc2007" / "images" / r["image"]).read_bytes() == r["image"].encode() * 3
    assert len(list((tmp_path / "back" / "voc2007" / "images").iterdir())) == 6


def test_bench_cache_script_runs_tiny(tmp_path):
    """benchmarks/bench_cache.py on six small JPEGs: every measurement row, and the machine named."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for i in range(6):
        Image.fromarray(rng.randint(0, 255, (40, 48, 3)).astype(np.uint8)).save(tmp_path / f"{i}.jpg")
    out = run_script("bench_cache.py", "--data", str(tmp_path), "--size", "32", "--batch", "4", "--repeats", "1").stdout
    assert out.startswith("CPU: ") and "flags" in out.splitlines()[0]
    assert "data: 6 images" in out
    for row in ("(a) decode+resize epoch from files, 2 threads", "(b) first cache build, 1 worker",
                "(b) reopen the built cache", "(c) warm-cache epoch of batch gathers, channels_last"):
        assert row in out


def test_bench_inference_script_runs_tiny(tiny_run):
    """benchmarks/bench_inference.py on the tiny demo run, one round: a row per backend, timed, and ONNX
    fp32's logits within float rounding of PyTorch's."""
    out = run_script("bench_inference.py", "--run", str(tiny_run), "--rounds", "1", "--threads", "1").stdout
    assert "CPU: " in out and "OpenMP wait: " in out
    rows = {}
    for backend in ("torch eager fp32 NCHW", "onnx fp32", "onnx int8 (static)"):
        rows[backend] = next(line for line in out.splitlines() if line.startswith(backend))[31:].split()
        assert float(rows[backend][0]) > 0                                 # batch-1 median ms
    assert float(rows["onnx fp32"][-1]) < 1e-3                             # max |Δlogit| vs PyTorch


def test_bench_cifar_speed_script_runs_tiny(tiny_cifar, tmp_path):
    """benchmarks/bench_cifar_speed.py trains the cifar10_speed recipe (2 epochs, batch 16, on a 3-class
    CIFAR-shaped folder) with per-epoch test accuracy, and its time-to lines agree with metrics.jsonl.
    The runtime is fixed (fp32 channels_last): measuring it took 14 of the test's 36 s and is tested in
    test_runtime.py."""
    run = tmp_path / "run"
    out = run_script("bench_cifar_speed.py", "--data", str(tiny_cifar), "--out", str(run),
                     "--set", "train.epochs=2", "--set", "train.batch_size=16",
                     "--set", "train.precision=fp32", "--set", "train.channels_last=true").stdout
    assert out.startswith("CPU: ")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("test_accuracy" in r for r in rows)
    first = next((r["epoch"] for r in rows if r["test_accuracy"] >= 0.868), None)
    line = next(x for x in out.splitlines() if x.startswith("time to 86.8% test accuracy"))
    assert line.endswith(f"epoch {first}") if first else "not reached" in line
    assert "multitag eval --split test accuracy" in out
    report = out.splitlines()[-(5 + len(rows)):]            # run, header, one line per epoch, two targets, eval
    assert report[0].startswith("run ") and run_script("bench_cifar_speed.py", "--run", str(run)).stdout.splitlines()[1:] == report


def test_tta_gain_script_scores_a_run_both_ways(tiny_run):
    """benchmarks/tta_gain.py: the same weights scored with one view and with flip TTA, the run untouched."""
    before = (tiny_run / "model.json").read_text()
    out = run_script("tta_gain.py", str(tiny_run), timeout=180).stdout
    rows = [line for line in out.splitlines() if line.startswith(("| one view", "| flip TTA"))]
    assert len(rows) == 2 and "mAP" in out
    assert (tiny_run / "model.json").read_text() == before
