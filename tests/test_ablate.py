"""The ablation runner: grid parsing, key validation, a complete table, skipping and resuming."""
import csv
import json

import pytest

from multitag import api
from multitag.ablate import TABLE_CSV, TABLE_MD, Variant, ablate, expand_variants, load_grid, parse_vary
from multitag.cli import main
from multitag.errors import UserError

FAST = ["train.epochs=1", "train.precision=fp32", "train.channels_last=false", "train.batch_size=32"]


def test_parse_vary_expands_shorthands_and_keeps_lists():
    assert parse_vary("loss=bce,asl") == ("train.loss", ["bce", "asl"])
    assert parse_vary("aug.scale=[0.5, 1],[1,1]") == ("aug.scale", ["[0.5, 1]", "[1,1]"])
    with pytest.raises(UserError, match="KEY=VALUE1,VALUE2"):
        parse_vary("loss")


def test_grid_file_and_variant_names(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("variants:\n  baseline: {}\n  weighted: {train.class_weights: balanced, aug.scale: [1, 1]}\n"
                    "vary:\n  loss: [bce, asl]\n")
    vary, variants = load_grid(grid)
    out = expand_variants(vary, variants)
    assert [v.name for v in out] == ["baseline,train.loss=bce", "baseline,train.loss=asl",
                                     "weighted,train.loss=bce", "weighted,train.loss=asl"]
    assert out[2].overrides == ["train.class_weights=balanced", "aug.scale=[1, 1]", "train.loss=bce"]
    plain = tmp_path / "plain.yaml"
    plain.write_text("data.oversample_to: [0, 600]\n")       # a bare mapping is the vary grid
    assert load_grid(plain) == ({"data.oversample_to": [0, 600]}, {})
    assert Variant("model.name=timm/resnet18", []).dirname == "model.name=timm_resnet18"
    with pytest.raises(UserError, match="share the run directory"):
        expand_variants({"loss": ["bce", "bce"]})


def test_unknown_key_fails_before_training(digits_csv, tmp_path):
    with pytest.raises(UserError, match='did you mean "train.loss"'):
        ablate("demo", str(digits_csv), {"train.los": ["bce"]}, FAST, tmp_path / "abl", log=lambda *a: None)
    assert not (tmp_path / "abl").exists()


def test_a_bad_value_in_any_variant_fails_before_the_first_trains(digits_csv, tmp_path):
    with pytest.raises(UserError, match='variant .*sched.name "cosin".*did you mean "cosine"'):
        ablate("demo", str(digits_csv), {"sched.name": ["onecycle", "cosin"]}, FAST, tmp_path / "abl",
               log=lambda *a: None)
    assert not (tmp_path / "abl").exists()


def test_a_variant_and_set_naming_one_key_is_refused(digits_csv, tmp_path):
    with pytest.raises(UserError, match="variant big sets data.image_size, which --set also sets"):
        ablate("demo", str(digits_csv), {}, FAST + ["data.image_size=32"], tmp_path / "abl", log=lambda *a: None,
               variants={"big": {"data.image_size": 40}})


def test_variants_of_one_model_share_the_first_ones_runtime(digits_csv, tmp_path, monkeypatch):
    from multitag import engine

    measured, real = [], engine.choose_runtime
    monkeypatch.setattr(engine, "choose_runtime", lambda *a, **k: measured.append(1) or real(*a, **k))
    over = ["train.epochs=1", "train.batch_size=32", "data.image_size=32"]      # precision: measured (auto)
    out = ablate("demo", str(digits_csv), {"loss": ["bce", "asl"], "model.args.hidden": [32, 64]}, over,
                 tmp_path / "abl", log=lambda *a: None)
    runtimes = {d.name: json.loads((d / "model.json").read_text())["runtime"] for d in out.iterdir() if d.is_dir()}
    assert len(runtimes) == 4 and len(measured) == 2          # once per model shape, not per loss
    for hidden in (32, 64):                                   # each shape's two losses ran on one runtime
        shared = [r for name, r in runtimes.items() if f"hidden={hidden}" in name]
        assert len(shared) == 2 and shared[0] == shared[1]


def test_ablation_table_then_skip_then_resume(digits_csv, tmp_path, monkeypatch):
    out = tmp_path / "abl"
    args = ["ablate", "demo", "--data", str(digits_csv), "--vary", "loss=bce,asl", "--out", str(out)]
    for item in FAST:
        args += ["--set", item]
    assert main(args + ["--json"]) == 0

    rows = list(csv.DictReader((out / TABLE_CSV).open()))
    assert [r["variant"] for r in rows] == ["train.loss=bce", "train.loss=asl"]
    rare = [k for k in rows[0] if k.startswith("f1_")]
    assert len(rare) == 3
    for r in rows:
        assert r["split"] == "test" and r["status"] == "ok" and r["epochs"] == "1"
        assert all(0 <= float(r[k]) <= 1 for k in ("mAP", "micro_f1", "macro_f1", "CF1", *rare))
        assert float(r["train_seconds"]) > 0
        n_train = sum(s["split"] == "train" for s in csv.DictReader((out / r["variant"] / "split.csv").open()))
        assert int(r["steps"]) in (n_train // 32, -(-n_train // 32))     # one epoch of batches of 32
    md = (out / TABLE_MD).read_text()
    assert "| train.loss=asl |" in md and "test split at thresholds calibrated on val" in md
    config = json.loads((out / "train.loss=asl" / "model.json").read_text())["recipe"]
    assert config["train"]["loss"] == "asl" and config["train"]["report"] is False

    calls = []
    monkeypatch.setattr(api, "train", lambda *a, **kw: calls.append(kw) or pytest.fail("should not train"))
    assert main(args) == 0                                        # everything finished: nothing trains
    assert calls == [] and list(csv.DictReader((out / TABLE_CSV).open())) == rows
    logs = []                                                     # another grid in the same folder: said
    ablate("demo", str(digits_csv), {"loss": ["bce"]}, FAST, out, log=logs.append)
    assert any("listed other variants (train.loss=asl)" in line for line in logs) and calls == []

    monkeypatch.undo()
    meta_path = out / "train.loss=asl" / "model.json"             # as if killed after the last checkpoint
    meta = json.loads(meta_path.read_text())
    del meta["metrics"]
    meta_path.write_text(json.dumps(meta))
    logs = []
    ablate("demo", str(digits_csv), {"loss": ["bce", "asl"]}, FAST, out, log=logs.append)
    assert any("train.loss=bce: finished before, skipped" in line for line in logs)
    assert any("train.loss=asl: resuming from its checkpoint" in line for line in logs)
    assert list(csv.DictReader((out / TABLE_CSV).open())) == rows     # the resumed run scores the same

    with pytest.raises(UserError, match="other settings"):     # same --out, different budget
        ablate("demo", str(digits_csv), {"loss": ["bce"]}, FAST + ["train.epochs=2"], out, log=lambda *a: None)
