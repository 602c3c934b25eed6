"""Training engine: best-epoch restore, checkpoint round-trip, resume reproducibility, NaN handling."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import multitag.engine as engine
from multitag.api import evaluate, train
from multitag.checkpoint import MODEL_META, MODEL_WEIGHTS, TRAIN_META
from multitag.errors import UserError
from multitag.predict import load

FAST = ["train.epochs=3", "train.batch_size=32", "data.image_size=32", "train.precision=fp32",
        "train.channels_last=false", "sched.name=cosine", "sched.warmup_epochs=0.5"]


def test_fit_keeps_best_epoch_and_writes_run_dir(digits_csv, tmp_path):
    run = train("demo", data=digits_csv, out=tmp_path / "run", overrides=FAST, log=lambda *a: None)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    meta = json.loads((run / MODEL_META).read_text())
    best = max(rows, key=lambda r: r["val_mAP"])
    assert meta["best_epoch"] == best["epoch"] and meta["best_value"] == pytest.approx(best["val_mAP"])
    assert len(meta["thresholds"]) == 10 and meta["class_names"][0] == "d0"
    assert (run / "split.csv").exists() and (run / "config.yaml").exists()
    # model.safetensors holds the best epoch's weights, which load() rebuilds without unpickling
    model = load(run)
    weights = load_file(str(run / MODEL_WEIGHTS))
    for k, v in model.network.state_dict().items():
        assert torch.equal(v, weights[k])
    assert meta["metrics"]["val"]["mAP"] == pytest.approx(best["val_mAP"], abs=1e-6)


@pytest.mark.parametrize("layout", [[], ["train.channels_last=true", "train.precision=bf16"]],
                         ids=["nchw-fp32", "channels_last-bf16"])
def test_resume_after_kill_reproduces_uninterrupted_run(digits_csv, tmp_path, stop_after_checkpoint, layout):
    over = FAST + layout          # channels_last: Adam's moments must come back in the weights' layout
    full = train("demo", data=digits_csv, out=tmp_path / "full", overrides=over, log=lambda *a: None)

    undo = stop_after_checkpoint(2)      # the second run dies right after epoch 2's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train("demo", data=digits_csv, out=tmp_path / "killed", overrides=over, log=lambda *a: None)
    assert json.loads((tmp_path / "killed" / TRAIN_META).read_text())["state"]["epoch"] == 2
    undo()

    resumed = train(resume=tmp_path / "killed", log=lambda *a: None)
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(resumed / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [1, 2, 3]
    assert np.allclose([r["val_mAP"] for r in la], [r["val_mAP"] for r in lb], atol=1e-6)


def test_restored_optimizer_state_takes_the_parameters_layout():
    """Fused AdamW pairs a weight with its moments by memory order: moments read back from the file
    (NCHW) for a channels_last weight must be laid out like it, or the next step updates garbage."""
    from multitag.checkpoint import optimizer_tensors, restore_optimizer

    def adamw(p):
        return torch.optim.AdamW([p], lr=0.1, fused=True)

    torch.manual_seed(0)
    start, grads = torch.randn(4, 3, 5, 5), [torch.randn(4, 3, 5, 5) for _ in range(2)]
    unbroken, resumed = (torch.nn.Parameter(start.clone().contiguous(memory_format=torch.channels_last))
                         for _ in range(2))
    opt_a, opt_b = adamw(unbroken), adamw(resumed)
    for p, opt in ((unbroken, opt_a), (resumed, opt_b)):
        p.grad = grads[0].contiguous(memory_format=torch.channels_last)
        opt.step()
    tensors, meta = optimizer_tensors(opt_b)
    opt_b = adamw(resumed)
    restore_optimizer(opt_b, {k: v.contiguous() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    for p, opt in ((unbroken, opt_a), (resumed, opt_b)):
        p.grad = grads[1].contiguous(memory_format=torch.channels_last)
        opt.step()
    assert torch.equal(unbroken, resumed)


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(digits_csv, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.build_loss

    def loss_that_explodes(*args, **kw):
        inner = real(*args, **kw)

        def fn(logits, y, ignore):
            calls["n"] += 1
            out = inner(logits, y, ignore)
            return out * float("nan") if calls["n"] > 4 else out   # batch 5 = epoch 2 (3 batches/epoch)
        return fn

    monkeypatch.setattr(engine, "build_loss", loss_that_explodes)
    with pytest.raises(engine.TrainingDiverged, match="became nan at epoch 2"):
        train("demo", data=digits_csv, out=tmp_path / "nan", overrides=FAST + ["train.batch_size=40"],
              log=lambda *a: None)
    state = json.loads((tmp_path / "nan" / TRAIN_META).read_text())["state"]
    assert state["epoch"] == 1 and (tmp_path / "nan" / MODEL_WEIGHTS).exists()


def test_resume_needs_a_run_dir(tmp_path):
    with pytest.raises(UserError, match="no config.yaml"):
        train(resume=tmp_path)


def copy_dataset(src_csv, dst):
    import shutil

    shutil.copytree(src_csv.parent, dst)
    return dst / "labels.csv"


def test_bad_images_error_or_skip_with_list(digits_csv, tmp_path):
    csv = copy_dataset(digits_csv, tmp_path / "data")
    (csv.parent / "images" / "train_00003.png").write_bytes(b"not a png at all")
    (csv.parent / "images" / "train_00007.png").unlink()
    with pytest.raises(UserError, match="train_00007.png") as err:
        train("demo", data=csv, out=tmp_path / "strict", overrides=FAST, log=lambda *a: None)
    assert "\n" not in str(err.value) and "on_bad_image=skip" in str(err.value)

    logs = []
    run = train("demo", data=csv, out=tmp_path / "lenient", overrides=FAST + ["data.on_bad_image=skip"],
                log=logs.append)
    skipped = (run / "skipped.txt").read_text()
    assert "train_00003.png" in skipped and "train_00007.png" in skipped
    assert any("skipped 2 of 200 images" in line for line in logs)
    meta = json.loads((run / MODEL_META).read_text())
    assert meta["data"]["skipped"] == 2


@pytest.mark.parametrize("optim,sched", [("sgd", "plateau"), ("adam", "onecycle"), ("adamw", "none")])
def test_optimizers_and_schedules(digits_csv, tmp_path, optim, sched):
    over = FAST + [f"optim.name={optim}", f"sched.name={sched}", "optim.lr=0.01", "train.grad_clip=1.0",
                   "sched.patience=0", "sched.factor=0.1"]
    run = train("demo", data=digits_csv, out=tmp_path / "run", overrides=over, log=lambda *a: None)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    if sched == "none":
        assert lrs == [0.01] * 3
    elif sched == "onecycle":
        assert lrs[-1] < 0.01 * 0.01            # annealed to ~0 at the end
    else:   # plateau, patience 0: epoch 3 runs at a tenth of the LR iff epoch 2 did not beat epoch 1
        # (ReduceLROnPlateau's default improvement test in mode max: > best · (1 + 1e-4))
        cut = rows[1]["val_mAP"] <= rows[0]["val_mAP"] * (1 + 1e-4)
        assert lrs[:2] == [0.01, 0.01]
        assert lrs[2] == pytest.approx(0.001 if cut else 0.01)


def test_early_stopping_stops_and_reports_best(digits_csv, tmp_path, monkeypatch):
    # A validation metric that never improves after epoch 1 must stop training after `patience` epochs.
    values = iter([0.9, 0.5, 0.4, 0.3, 0.2])
    real = engine.evaluate_scores

    def fake(*a, **k):
        out = real(*a, **k)
        if "thresholds" not in k and len(a) < 5:
            out["mAP"] = next(values)
        return out

    monkeypatch.setattr(engine, "evaluate_scores", fake)
    run = train("demo", data=digits_csv, out=tmp_path / "run",
                overrides=FAST + ["train.epochs=5", "train.early_stop_patience=2"], log=lambda *a: None)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert json.loads((run / MODEL_META).read_text())["best_epoch"] == 1


def test_training_without_a_val_split_keeps_the_last_epoch(tmp_path):
    from multitag.demo_data import make_digit_mosaics

    digits_csv = make_digit_mosaics(tmp_path / "digits", {"train": 120, "val": 0, "test": 40}, seed=1)   # no val rows
    logs = []
    over = FAST + ["data.split_fractions=[0.85, 0.0, 0.15]", "train.report=true"]
    run = train("demo", data=digits_csv, out=tmp_path / "run", overrides=over, log=logs.append)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not any(k.startswith("val_") for r in rows for k in r)
    meta = json.loads((run / MODEL_META).read_text())
    assert meta["best_epoch"] == 3 and meta["best_value"] is None and meta["thresholds"] is None
    assert any("no val split" in line and "thresholds stay at 0.5" in line for line in logs)
    assert ",val" not in (run / "split.csv").read_text()
    page = (run / "report" / "index.html").read_text()                # on the test split
    assert "last epoch 3 (no val split)" in page and "val mAP —" not in page
    from multitag.report import choose_split

    class NoEval:                     # no val and no test rows: one note, the training images
        def rows(self, split):
            return [0, 1] if split == "train" else []

    split, notes = choose_split(NoEval(), "test", calibrated=False)
    assert split == "train" and len(notes) == 2 and "no test or val split" in notes[0] and "optimistic" in notes[1]
    assert evaluate(run, split="test", log=lambda *a: None)["mAP"] > 0
    for bad, name in (("sched.name=plateau", "plateau"), ("train.early_stop_patience=2", "early_stop")):
        with pytest.raises(UserError, match=name) as err:
            train("demo", data=digits_csv, out=tmp_path / name, overrides=over + [bad], log=lambda *a: None)
        assert "needs a val split" in str(err.value) and "\n" not in str(err.value)


def test_eval_batch_size_defaults_to_the_training_batch():
    from multitag.config import load_config

    assert engine.resolved_config(load_config("demo", ["train.batch_size=24"])).train.eval_batch_size == 24
    assert engine.resolved_config(load_config("demo", ["train.eval_batch_size=100"])).train.eval_batch_size == 100


def test_bf16_training_fits_thresholds_on_the_fp32_scores_predict_uses(digits_csv, tmp_path):
    """Train's thresholds are the ones `multitag calibrate` fits afterwards: both on fp32 val scores
    (bf16 scores would put them a rounding step off the scores predict compares them with)."""
    from multitag.evaluation import calibrate_run

    run = train("demo", data=digits_csv, out=tmp_path / "run", log=lambda *a: None,
                overrides=["train.epochs=1", "train.batch_size=32", "train.precision=bf16"])
    fitted = json.loads((run / MODEL_META).read_text())
    assert " bf16 " in fitted["runtime"]
    refit = calibrate_run(run, log=lambda *a: None)
    np.testing.assert_allclose(fitted["thresholds"], refit, atol=1e-6)
