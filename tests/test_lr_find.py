"""`multitag lr-find`: the learning-rate range test on the tiny digits data, and its parts."""
import csv
import json

import numpy as np
import pytest

from multitag.api import lr_find
from multitag.cli import main
from multitag.errors import UserError
from multitag.lr_find import centred_mean

FAST = ["train.batch_size=32", "train.precision=fp32"]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_centred_mean_keeps_the_minimum_where_it_is():
    """A causal average would move a dip's minimum later (to a higher rate); the centred one does not."""
    x = np.linspace(-1, 1, 41)
    dip = x ** 2 + 0.05 * np.cos(37 * x)            # lowest near the middle, with ripple
    smoothed = centred_mean(dip, 7)
    assert smoothed.shape == dip.shape
    assert abs(int(np.argmin(smoothed)) - 20) <= 1
    np.testing.assert_allclose(centred_mean(np.full(9, 2.5), 5), 2.5)


def test_sweep_writes_the_curve_and_suggests_a_tenth_of_the_best_rate(digits_csv, tmp_path):
    out = tmp_path / "lr"
    result = lr_find("demo", data=str(digits_csv), out=out, overrides=FAST, start=1e-5, end=1.0, steps=12,
                     log=lambda *a: None)
    table = rows(out / "lr_find.csv")
    assert len(table) == result.steps <= 12 and result.steps >= 5
    lrs = np.array([float(r["lr"]) for r in table])
    np.testing.assert_allclose(lrs, np.geomspace(1e-5, 1.0, 12)[:len(lrs)], rtol=1e-4)
    smoothed = np.array([float(r["smoothed_loss"]) for r in table])
    assert result.min_loss_lr == pytest.approx(lrs[np.argmin(smoothed)], rel=1e-4)
    assert result.suggested_lr == pytest.approx(result.min_loss_lr / 10)
    assert result.setting == f"optim.lr={result.suggested_lr:.2g}"
    assert (out / "lr_find.png").stat().st_size > 1000
    assert not (out / "model.safetensors").exists()           # not a run: nothing is kept of the weights


def test_a_loss_that_blows_up_ends_the_sweep_early(digits_csv, tmp_path):
    result = lr_find("demo", data=str(digits_csv), out=tmp_path / "lr", steps=40, start=1e-3, end=1e6,
                     overrides=[*FAST, "optim.name=sgd", "optim.momentum=0.9"], log=lambda *a: None)
    assert result.stopped_early and result.steps < 40


def test_cli_sweeps_one_stage_of_a_staged_recipe(digits_csv, tmp_path, capsys):
    stages = "stages=[{name: head, epochs: 1, lr: 0.01, freeze: [backbone]}, {name: all, epochs: 1, lr: 0.001}]"
    argv = ["lr-find", "demo", "--data", str(digits_csv), "--out", str(tmp_path / "lr"), "--steps", "8",
            "--set", stages, *(a for s in FAST for a in ("--set", s))]
    assert main([*argv, "--stage", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["setting"].startswith("stages.1.lr=") and result["steps"] <= 8
    assert main([*argv, "--stage", "2"]) == 2
    assert "--stage 2: the recipe has 2 stages (0 to 1)" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,fragment", [
    ({"start": 1.0, "end": 0.1}, "0 < --start < --end"),
    ({"steps": 2}, "--steps must be at least 5"),
])
def test_bad_sweeps_are_one_sentence(digits_csv, tmp_path, kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        lr_find("demo", data=str(digits_csv), out=tmp_path / "lr", overrides=FAST, log=lambda *a: None, **kwargs)


def test_no_data_is_said_before_the_folder_is_made(tmp_path):
    logs = []
    with pytest.raises(UserError, match="no data given; pass --data PATH"):
        lr_find("demo", out=tmp_path / "lr", overrides=FAST, log=logs.append)
    assert not (tmp_path / "lr").exists() and logs == []       # no "lr-find folder: ..." of a sweep that never ran
