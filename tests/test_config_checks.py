"""Settings are checked before any work (config_checks.py); a run directory is never trained into twice;
OneCycle works at every step count."""
import json

import pytest
import torch

from multitag.api import train
from multitag.cli import main
from multitag.config import StageConfig, list_recipes, load_config
from multitag.config_checks import check_config
from multitag.engine import CONFIG_FILE, build_scheduler, onecycle_pct_start
from multitag.errors import UserError

FAST = ["train.epochs=1", "train.batch_size=32", "train.precision=fp32", "train.channels_last=false",
        "train.report=false"]


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_bundled_recipe_passes(name):
    check_config(load_config(name))


@pytest.mark.parametrize("setting, named, must", [
    ("train.batch_size=0", "train.batch_size", "at least 1"),
    ("train.epochs=0", "train.epochs", "at least 1"),
    ("data.mean=[0.5,0.5]", "data.mean", "3 numbers"),
    ("data.std=[0,0,0]", "data.std", "positive"),
    ("optim.lr=-0.1", "optim.lr", "0 or more"),
    ("optim.lr=.nan", "optim.lr", "0 or more"),
    ("sched.pct_start=1.5", "sched.pct_start", "[0, 1)"),
    ("train.threads=-1", "train.threads", "0 (torch's default) or more"),
    ("data.oversample_to=-1", "data.oversample_to", "0 (off) or more"),
    ("train.early_stop_patience=-1", "train.early_stop_patience", "0 (off) or more"),
    ("train.eval_batch_size=-1", "train.eval_batch_size", "0 (= train.batch_size) or more"),
    ("train.accumulate=0", "train.accumulate", "at least 1"),
    ("aug.scale=[0.5,2]", "aug.scale", "≤ 1"),
    ("optim.betas=[0.9]", "optim.betas", "2 numbers"),
    ("data.split_fractions=[0.9,0.2,0]", "data.split_fractions", "sum to 1"),
    ("stages=[{epochs: 0}]", "stages.0.epochs", "at least 1"),
])
def test_out_of_range_values_are_one_sentence(setting, named, must):
    with pytest.raises(UserError) as err:
        check_config(load_config("demo", [setting]))
    message = str(err.value)
    assert named in message and must in message and "\n" not in message


@pytest.mark.parametrize("setting, closest", [
    ("sched.name=cosin", "cosine"), ("optim.name=adamm", "adam"), ("train.loss=focall", "focal"),
    ("train.precision=bf61", "bf16"), ("train.device=cpuu", "cpu"), ("train.class_weights=balance", "balanced"),
    ("data.on_bad_image=skipp", "skip"), ("data.format=cvs", "csv"), ("aug.preset=strog", "strong"),
    ("stages=[{sched: cosin}]", "cosine"),
])
def test_choice_typos_name_the_closest(setting, closest):
    with pytest.raises(UserError, match=f'did you mean "{closest}"'):
        check_config(load_config("demo", [setting]))


@pytest.mark.parametrize("recipe, setting, match", [
    ("demo", "train.loss=bce & train.label_smoothing=0.1", "label_smoothing applies to train.loss=ce"),
    ("cnn_rnn", "train.loss=asl", "train.loss does not apply to cnn_rnn"),
    ("cnn_rnn", "train.class_weights=balanced", "train.class_weights does not apply to cnn_rnn"),
    ("demo", "stages=[{freeze: [conv9.*]}]", "stages.0.freeze: freeze pattern \"conv9.\\*\" matches no parameter"),
])
def test_settings_that_would_do_nothing_are_refused(recipe, setting, match):
    with pytest.raises(UserError, match=match):
        check_config(load_config(recipe, setting.split(" & ")))


def test_flat_settings_a_staged_run_does_not_use_are_noted():
    from multitag.config_checks import unused_settings

    notes = unused_settings(load_config("voc_efficientnet_lite", ["train.epochs=1", "optim.lr=0.5", "sched.name=plateau"]))
    assert [n.split("=")[0] for n in notes] == ["train.epochs", "optim.lr", "sched.name"]
    assert "stages.0.epochs=" in notes[0] and "this run has 3 stage(s)" in notes[0]
    assert unused_settings(load_config("voc_efficientnet_lite")) == [] == unused_settings(load_config("demo"))


def test_valid_spellings_pass():
    for setting in ("train.channels_last=yes", "train.channels_last=true", "train.device=cuda:1",
                    "train.focal_alpha=null", "data.mean=[]", "stages=[{epochs: 2}]"):
        check_config(load_config("demo", [setting]))


def test_balanced_class_weights_are_shown_and_freezing_random_layers_is_noted(digits_csv, tmp_path):
    logs = []
    train("demo", data=digits_csv, out=tmp_path / "run", log=logs.append,
          overrides=FAST + ["train.class_weights=balanced", "stages=[{epochs: 1, freeze: [backbone]}, {epochs: 1}]"])
    (weights,) = [line for line in logs if line.startswith("class weights (balanced pos_weight")]
    assert weights.count(" ") > 10 and "d0" in weights
    assert any("note: stage stage1 freezes layers of a randomly initialised model" in line for line in logs)


def test_a_bad_setting_stops_training_before_anything_is_written(digits_csv, tmp_path, isolated_cache):
    """Before the cache is built or config.yaml written, so --resume is never left with a broken config."""
    cached = set(isolated_cache.rglob("*"))
    with pytest.raises(UserError, match="sched.name"):
        train("demo", data=digits_csv, out=tmp_path / "run", overrides=FAST + ["sched.name=cosin"], log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    assert set(isolated_cache.rglob("*")) == cached


def test_an_existing_run_is_refused_and_overwrite_replaces_it(digits_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "demo", "--data", str(digits_csv), "--out", str(out)] + [a for s in FAST for a in ("--set", s)]
    assert main(args) == 0
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args + ["--set", "train.seed=1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == weights          # untouched
    assert main(args + ["--set", "train.seed=1", "--overwrite"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]                            # not appended to the old run's
    assert "seed: 1" in (out / CONFIG_FILE).read_text()
    with pytest.raises(UserError, match="only one"):
        train(resume=out, overwrite=True)


def _steps_through(total: int, pct_start: float) -> int:
    """Runs OneCycle (built as training builds it) over ``total`` steps; returns the steps taken."""
    cfg = load_config("demo", [f"sched.pct_start={pct_start}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    scheduler, per_batch = build_scheduler(cfg, opt, StageConfig(epochs=1, lr=0.1, sched="onecycle"), total)
    assert per_batch
    for _ in range(total - 1):
        opt.step()
        scheduler.step()
    return total


@pytest.mark.parametrize("total, pct_start", [(4, 0.25), (2, 0.5), (5, 0.2), (10, 0.1), (3, 1 / 3), (40, 0.25)])
def test_onecycle_runs_when_the_warm_up_is_one_step(total, pct_start):
    assert _steps_through(total, pct_start) == total        # torch alone: ZeroDivisionError at 4 × 0.25


def test_onecycle_keeps_pct_start_unless_it_is_one_step():
    assert onecycle_pct_start(0.25, 40) == 0.25
    assert onecycle_pct_start(0.25, 4) == 0.5 and onecycle_pct_start(0.5, 2) == 0.0


def test_training_at_a_size_the_model_cannot_take_is_one_sentence(digits_csv, tmp_path):
    with pytest.raises(UserError, match="data.image_size=8 or more"):
        train("demo", data=digits_csv, out=tmp_path / "run", overrides=FAST + ["data.image_size=4"], log=lambda *a: None)


def test_a_run_that_failed_before_its_first_epoch_can_be_trained_over(digits_csv, tmp_path):
    """Bad data stops a run after config.yaml is written; the fixed command must then work as typed."""
    bad = tmp_path / "bad.csv"
    header, *rows = digits_csv.read_text().splitlines()
    bad.write_text("\n".join([header] + [f"{digits_csv.parent}/{r}" for r in rows] + ["missing.png,d1,train"]) + "\n")
    with pytest.raises(UserError, match="missing.png"):
        train("demo", data=bad, out=tmp_path / "run", overrides=FAST, log=lambda *a: None)
    assert (tmp_path / "run" / CONFIG_FILE).exists()
    train("demo", data=digits_csv, out=tmp_path / "run", overrides=FAST, log=lambda *a: None)


def test_a_missing_weights_file_is_said_before_any_work(tmp_path):
    with pytest.raises(UserError, match="weights file .*typo.pth does not exist.*nothing is downloaded"):
        check_config(load_config("resnet34_staged", [f"model.weights={tmp_path / 'typo.pth'}"]))


def test_a_weights_file_of_an_unknown_type_is_said_before_any_work(tmp_path):
    """It was found only when the weights were read, after the image cache was built."""
    (tmp_path / "resnet34.npz").write_bytes(b"not read")
    with pytest.raises(UserError, match="resnet34.npz has an unknown type '.npz'; use .safetensors, .pt"):
        check_config(load_config("resnet34_staged", [f"model.weights={tmp_path / 'resnet34.npz'}"]))


def test_a_key_in_the_wrong_section_names_the_section_that_has_it():
    with pytest.raises(UserError, match='"train.lr" \\(did you mean "optim.lr" or "stages.N.lr"\\?\\)'):
        load_config("demo", ["train.lr=1e-3"])


@pytest.mark.parametrize("settings, match", [
    (["model.name=timm/resnet18", "model.args.pretrained=true"], "no packaged pretrained weights.*model.weights=FILE"),
    (["model.weights_prefix=student."], "model.weights_prefix selects keys of model.weights, which is not set"),
    (["model.name=timm/resnet_nonexistent_xyz"], "unknown timm architecture"),
])
def test_weights_and_model_settings_are_checked_before_any_work(settings, match):
    with pytest.raises(UserError, match=match):
        check_config(load_config("demo", settings))


def test_model_args_pretrained_true_with_a_weights_file_passes(tmp_path):
    """The file is the pretrained weights: true is what the user means, not a request to download."""
    weights = tmp_path / "r18.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    check_config(load_config("demo", ["model.name=timm/resnet18", "model.args.pretrained=true",
                                      f"model.weights={weights}", "model.weights_prefix=model."]))


def test_training_without_data_writes_nothing(tmp_path, capsys):
    """`multitag train demo` without --data used to write RUN_DIR/config.yaml before saying so."""
    assert main(["train", "demo", "--out", str(tmp_path / "run")]) != 0
    captured = capsys.readouterr()
    assert "no data given; pass --data PATH" in captured.err and "run directory" not in captured.out
    assert not (tmp_path / "run").exists()
