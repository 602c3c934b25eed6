"""`multitag bench` end to end on tiny sizes (digit mosaics, one step, 32 px): every section's rows
come back and print. No timing is asserted: the figures depend on the machine and its load."""
from __future__ import annotations

import json

import pytest
import torch

from multitag.bench import BenchOptions, print_bench, run_bench
from multitag.cli import main
from multitag.errors import UserError

TINY = ["--data", "digits", "--model", "simple_cnn", "--images", "16", "--batch-size", "8", "--image-size", "32",
        "--steps", "1", "--rounds", "1", "--scaling", "1,2", "--inference-rounds", "1"]


def test_bench_cli_json_has_every_row(capsys):
    assert main(["bench", *TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r["name"])
    assert set(by_section) == {"training", "pipeline", "optimizer", "inference", "scaling"}
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
    assert result["machine"]["runtime_chosen"]
    assert "load_average_end" in result["machine"]

    print_bench(result)                       # the human table prints every row
    out = capsys.readouterr().out
    for r in rows:
        assert r["name"][:12] in out


def test_bench_refuses_too_few_images():
    with pytest.raises(UserError, match="--images"):
        run_bench(BenchOptions(images=4, batch_size=8), log=lambda *a: None)


def test_bench_scaling_text_is_checked(capsys):
    assert main(["bench", "--scaling", "1,x"]) == 2
    assert "--scaling" in capsys.readouterr().err


def test_profile_step_script_runs_tiny():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
    out = subprocess.run([sys.executable, str(script), "--model", "simple_cnn", "--image-size", "32", "--batch-size", "4",
                          "--steps", "1", "--threads", "1", "--precision", "fp32"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "img/s" in out and "convolution_backward" in out and "mkldnn_convolution" in out
