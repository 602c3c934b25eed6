"""The `multitag` command end to end on a tiny real dataset, and its one-line user errors."""
import json

import pytest

from multitag.cli import main

FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "train.precision=fp32"]


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(digits_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "demo", "--data", str(digits_csv), "--out", str(out), *FAST]) == 0
    return out


def test_train_calibrate_eval_predict(trained, digits_csv, capsys):
    cal = run_json(capsys, "calibrate", str(trained))
    assert len(cal["thresholds"]) == 10 and all(0 < t < 1 for t in cal["thresholds"])

    ev = run_json(capsys, "eval", str(trained), "--split", "test")
    assert ev["split"] == "test" and ev["num_images"] == 40
    assert {"mAP", "at_0.5", "calibrated", "top3", "per_class"} <= ev.keys()
    assert 0 <= ev["mAP"] <= 1 and 0 <= ev["calibrated"]["CF1"] <= 1

    images = digits_csv.parent / "images"
    preds = run_json(capsys, "predict", str(trained), str(images / "test_00000.png"), str(images / "test_00001.png"))
    assert len(preds) == 2 and set(preds[0]["scores"]) == {f"d{i}" for i in range(10)}
    top = run_json(capsys, "predict", str(trained), str(images / "test_00000.png"), "--top-k", "3")
    assert len(top[0]["labels"]) == 3

    # the human-readable table prints too
    assert main(["eval", str(trained)]) == 0
    assert "calibrated" in capsys.readouterr().out


def test_listing_commands(capsys):
    models = run_json(capsys, "models")
    assert {"simple_cnn", "advanced_cnn"} <= {m["name"] for m in models}
    by_name = {m["name"]: m for m in models}
    # ResNet-18 at 224 px: 1.82 GMACs as torchvision and timm list it, so 3.6 GFLOPs; the RNN is not counted
    assert 3.5 < by_name["advanced_cnn"]["gflops"] < 3.7 and not by_name["advanced_cnn"]["gflops_partial"]
    assert by_name["cnn_rnn"]["gflops_partial"]
    assert "demo" in {r["name"] for r in run_json(capsys, "recipes")}
    assert main(["models"]) == 0
    assert "3.63 GFLOPs @224px" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["train", "demo", "--set", "train.epoch=2", "--data", "x.csv"], 'did you mean "train.epochs"'),
    (["train", "dmeo"], 'did you mean "demo"'),
    (["train", "demo", "--data", "/nonexistent/labels.csv"], "/nonexistent/labels.csv"),
    (["eval", "/nonexistent/run"], "/nonexistent/run"),
    (["predict", "/nonexistent/run", "x.png"], "/nonexistent/run"),
])
def test_user_errors_are_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.count("\n") == 0 and "Traceback" not in err


def test_help_for_every_command(capsys):
    for cmd in ("train", "eval", "predict", "calibrate", "models", "recipes", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: multitag " + cmd in capsys.readouterr().out


def test_python_api_round_trip(trained, digits_csv):
    import numpy as np
    from PIL import Image

    import multitag

    model = multitag.load(trained)
    path = digits_csv.parent / "images" / "test_00003.png"
    pil = Image.open(path)
    by_path, by_pil, by_array = model.predict([str(path), pil, np.asarray(pil)])
    # every input kind goes through the same preprocessing, so the scores are identical
    assert by_path.scores == by_pil.scores == by_array.scores
    result = multitag.evaluate(trained, split="val")
    assert result["split"] == "val" and result["num_images"] == 40


def test_eval_json_stays_valid_json_when_a_class_has_no_positives(tiny_run, digits_csv, tmp_path, capsys):
    """A class absent from the split has an undefined AP (NaN); --json writes it as "nan", because a
    bare NaN is not JSON (strict parsers, jq and JavaScript's JSON.parse reject it)."""
    import csv

    rows = [r for r in csv.DictReader(open(digits_csv)) if r["split"] == "test"]
    with open(tmp_path / "no_d0.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "labels", "split"])
        for r in rows:
            out.writerow([digits_csv.parent / r["image"], " ".join(x for x in r["labels"].split() if x != "d0"), "test"])
    assert main(["eval", str(tiny_run), "--data", str(tmp_path / "no_d0.csv"), "--no-report", "--json"]) == 0
    text = capsys.readouterr().out
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert "nan" in json.dumps(result)


def test_split_names_and_empty_splits_are_explained(tiny_run, digits_csv, tmp_path, capsys):
    import csv
    import shutil

    assert main(["eval", str(tiny_run), "--split", "tst"]) != 0
    assert 'did you mean "test"' in capsys.readouterr().err
    run = tmp_path / "run"                          # a copy whose split.csv was lost, on data without a split
    shutil.copytree(tiny_run, run)
    (run / "split.csv").unlink()
    with open(tmp_path / "nosplit.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "labels"])
        for r in csv.DictReader(open(digits_csv)):
            out.writerow([digits_csv.parent / r["image"], r["labels"]])
    assert main(["eval", str(run), "--data", str(tmp_path / "nosplit.csv"), "--no-report"]) != 0
    err = capsys.readouterr().err
    assert "split.csv" in err and "is missing" in err and "--split all" in err
    assert main(["calibrate", str(run), "--data", str(tmp_path / "nosplit.csv")]) != 0
    err = capsys.readouterr().err
    assert "calibrate fits on the val split" in err and "--split" not in err


def test_labels_that_differ_only_in_case_are_noted(digits_csv, tmp_path):
    import csv

    from multitag.config import DataConfig
    from multitag.data.prepare import prepare

    with open(tmp_path / "cased.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "labels"])
        for i, r in enumerate(csv.DictReader(open(digits_csv))):
            labels = r["labels"].replace("d1", "D1") if i % 2 else r["labels"]
            out.writerow([digits_csv.parent / r["image"], labels])
    logs = []
    prepare(DataConfig(path=str(tmp_path / "cased.csv"), image_size=32), log=logs.append)
    assert any("differ only in case" in line and "D1 / d1" in line for line in logs)


def test_calibrate_keeps_the_thresholds_of_classes_without_val_positives(tiny_run, digits_csv, tmp_path):
    import csv
    import shutil

    from multitag.api import calibrate

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "model.json").read_text())["thresholds"]
    with open(tmp_path / "no_d9.csv", "w", newline="") as f:     # val images without a d9 on them
        out = csv.writer(f)
        out.writerow(["image", "labels", "split"])
        for r in csv.DictReader(open(digits_csv)):
            if "d9" not in r["labels"].split():
                out.writerow([digits_csv.parent / r["image"], r["labels"], "val"])
    logs = []
    after = calibrate(run, data=str(tmp_path / "no_d9.csv"), log=logs.append)
    assert after[9] == before[9] and after[:9] != before[:9]
    assert any("kept the earlier thresholds of d9" in line for line in logs)


def test_eval_on_other_data_writes_its_own_report_and_keeps_the_runs(tiny_run, digits_csv, tmp_path, capsys):
    import csv
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    own = (run / "report" / "index.html").read_text()
    with open(tmp_path / "other.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "labels", "split"])
        for r in csv.DictReader(open(digits_csv)):
            out.writerow([digits_csv.parent / r["image"], r["labels"], r["split"]])
    result = run_json(capsys, "eval", str(run), "--data", str(tmp_path / "other.csv"))
    assert result["report"] == str(run / f"report-{tmp_path.name}-other.csv" / "index.html")
    assert (run / "report" / "index.html").read_text() == own
    (tmp_path / "second").mkdir()              # another dataset whose file has the same name: its own folder
    shutil.copy(tmp_path / "other.csv", tmp_path / "second" / "other.csv")
    second = run_json(capsys, "eval", str(run), "--data", str(tmp_path / "second" / "other.csv"))["report"]
    assert second == str(run / "report-second-other.csv" / "index.html")
    assert (run / f"report-{tmp_path.name}-other.csv" / "index.html").exists()
    assert run_json(capsys, "eval", str(run), "--data", str(digits_csv))["report"] == str(run / "report" / "index.html")


def test_eval_on_val_writes_report_at_val_and_keeps_the_test_report(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    own = (run / "report" / "index.html").read_text()
    result = run_json(capsys, "eval", str(run), "--split", "val")
    assert result["report"] == str(run / "report@val" / "index.html")
    assert (run / "report" / "index.html").read_text() == own                  # the test report the app shows
    page = (run / "report@val" / "index.html").read_text()
    assert "metric (% on val)" in page
    assert json.loads((run / "report@val" / "metrics.json").read_text())["split"] == "val"
    assert main(["eval", str(run), "--split", "vall"]) == 2                    # a split name is checked first
    assert 'unknown split "vall"' in capsys.readouterr().err and not (run / "report@vall").exists()


def test_calibrate_brings_model_json_and_the_report_to_the_new_thresholds(tiny_run, digits_csv, tmp_path, capsys):
    import csv
    import shutil

    from multitag.api import calibrate
    from multitag.evaluation import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "report@val").mkdir()                           # an earlier `eval --split val`: named as out of date
    with open(tmp_path / "no_d9.csv", "w", newline="") as f:                  # val without d9: other thresholds
        out = csv.writer(f)
        out.writerow(["image", "labels", "split"])
        for r in csv.DictReader(open(digits_csv)):
            if "d9" not in r["labels"].split():
                out.writerow([digits_csv.parent / r["image"], r["labels"], r["split"]])
    logs = []
    before = json.loads((run / "model.json").read_text())["thresholds"]
    after = calibrate(run, data=str(tmp_path / "no_d9.csv"), log=logs.append)
    assert after != before
    quiet = {"log": lambda *a: None}
    stored = json.loads((run / "model.json").read_text())["metrics"]["val"]
    val = evaluate_run(run, data=str(tmp_path / "no_d9.csv"), split="val", **quiet)     # the val fitted on
    assert stored["calibrated"] == pytest.approx(val["calibrated"])
    report = json.loads((run / "report" / "metrics.json").read_text())
    test = evaluate_run(run, split="test", **quiet)                            # still test, at val's thresholds
    assert report["split"] == "test" and report["calibrated"] == pytest.approx(test["calibrated"])
    assert any("report@val still shows metrics at the earlier thresholds" in line for line in logs)


def test_an_empty_split_names_its_cause_and_the_split_there_is(tiny_run, digits_csv, tmp_path, capsys):
    import csv

    rows = list(csv.DictReader(open(digits_csv)))

    def data(name, keep, split):
        with open(tmp_path / name, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["image", "labels", "split"])
            for r in rows:
                if keep(r):
                    out.writerow([digits_csv.parent / r["image"], r["labels"], split(r)])
        return str(tmp_path / name)

    no_test = data("no_test.csv", lambda r: r["split"] != "test", lambda r: r["split"])
    assert main(["eval", str(tiny_run), "--data", no_test, "--no-report"]) != 0
    assert "use --split val" in capsys.readouterr().err
    test_as_val = data("test_as_val.csv", lambda r: r["split"] == "test", lambda r: "val")
    assert main(["eval", str(tiny_run), "--data", test_as_val, "--split", "val", "--no-report"]) != 0
    err = capsys.readouterr().err
    assert "the data marks 40 images val" in err and "split.csv lists them under another split" in err


def test_json_output_into_a_closed_pipe_ends_quietly():
    """`multitag models --json | head -c 20`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "multitag.cli", "models", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()             # before the child prints (it is still importing): as head does, early
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
