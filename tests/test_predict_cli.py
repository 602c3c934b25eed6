"""`multitag predict` over files, folders and globs: CSV/JSON output, unreadable files listed, not fatal."""
import csv
import io
import json
import re
import shutil

import pytest

from multitag.cli import main
from multitag.errors import UserError

CLASSES = [f"d{i}" for i in range(10)]


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


@pytest.fixture
def folder(digits_csv, tmp_path):
    """3 good images (one in a subfolder), a truncated PNG, a text file and a hidden file."""
    images = digits_csv.parent / "images"
    (tmp_path / "sub").mkdir()
    for i, dst in enumerate(["a.png", "b.png", "sub/c.png"]):
        shutil.copy(images / f"test_{i:05d}.png", tmp_path / dst)
    (tmp_path / "broken.png").write_bytes((images / "test_00003.png").read_bytes()[:100])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    return tmp_path


def predict(capsys, *argv):
    rc = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_folder_to_csv_lists_unreadable_files(trained, folder, capsys):
    # batch size 2 puts the broken file in a batch with a good one: that one must still be predicted
    rc, out, err = predict(capsys, trained, folder, "--format", "csv", "--batch-size", "2")
    assert rc == 0 and "2 of 5 files could not be read" in err
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames == ["image", "labels", *CLASSES, "error"]
    rows = {r["image"].removeprefix(str(folder) + "/"): r for r in reader}
    assert set(rows) == {"a.png", "b.png", "sub/c.png", "broken.png", "notes.txt"}   # hidden file skipped
    assert "truncated" in rows["broken.png"]["error"] and rows["notes.txt"]["error"]
    for name in ("a.png", "b.png", "sub/c.png"):
        r = rows[name]
        assert r["error"] == "" and all(0 <= float(r[c]) <= 1 for c in CLASSES)
        assert set(r["labels"].split("|")) - {""} <= set(CLASSES)


def test_glob_and_json_output(trained, folder, capsys):
    rc, out, _ = predict(capsys, trained, f"{folder}/*.png", folder / "missing.png", "--format", "json")
    rows = json.loads(out)
    assert rc == 0 and [r["image"].rsplit("/", 1)[1] for r in rows] == ["a.png", "b.png", "broken.png", "missing.png"]
    assert rows[0]["error"] is None and set(rows[0]["scores"]) == set(CLASSES)
    assert rows[3]["error"] == "No such file or directory" and rows[3]["scores"] == {}
    # --json is kept as a synonym, and --top-k still applies
    rc, out, _ = predict(capsys, trained, folder / "a.png", "--json", "--top-k", "2")
    assert rc == 0 and len(json.loads(out)[0]["labels"]) == 2


def test_out_file_format_from_suffix(trained, folder, tmp_path, capsys):
    target = tmp_path / "preds.json"
    rc, out, err = predict(capsys, trained, folder / "a.png", "--out", target, "--threshold", "0.0")
    assert rc == 0 and out == "" and str(target) in err
    (row,) = json.loads(target.read_text())
    assert row["labels"] and len(row["labels"]) == 10               # threshold 0 keeps every class


def test_conflicting_output_formats_are_said(trained, folder, tmp_path, capsys):
    rc, out, err = predict(capsys, trained, folder / "a.png", "--json", "--format", "csv")
    assert rc != 0 and "--json means --format json" in err and len(err.strip().splitlines()) == 1
    target = tmp_path / "preds.json"
    rc, out, err = predict(capsys, trained, folder / "a.png", "--out", target, "--format", "csv")
    assert rc == 0 and "writing csv to" in err and "suggests json" in err
    assert target.read_text().startswith("image,")                  # what --format asked for


def test_nothing_readable_is_an_error(trained, folder, capsys):
    rc, out, err = predict(capsys, trained, folder / "notes.txt", "--format", "csv")
    assert rc == 2 and "none of the 1 file could be read" in err
    assert "notes.txt" in out                                        # the reason is still written


def test_an_out_that_cannot_be_written_is_refused_before_predicting(trained, folder, tmp_path, capsys, monkeypatch):
    from multitag import predict as predict_module

    monkeypatch.setattr(predict_module.Model, "predict_each", lambda *a, **k: pytest.fail("scored first"))
    rc, out, err = predict(capsys, trained, folder / "a.png", "--out", tmp_path)          # a directory
    assert rc == 2 and err.strip() == f"multitag predict: error: cannot write {tmp_path}: it is a directory; name a file in it instead"
    (tmp_path / "plain").write_text("")
    rc, out, err = predict(capsys, trained, folder / "a.png", "--out", tmp_path / "plain" / "p.csv")
    assert rc == 2 and "plain is a file, not a directory" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,fragment", [
    (["--top-k", "0"], "--top-k=0 is invalid; use a whole number from 1 to 10"),
    (["--top-k", "-1"], "--top-k=-1 is invalid"),
    (["--threshold", "2"], "--threshold='2' is invalid; use 'calibrated' or a number in [0, 1]"),
    (["--threshold", "nan"], "--threshold='nan' is invalid"),
    (["--threshold", "high"], "--threshold='high' is invalid"),
])
def test_a_threshold_or_top_k_that_picks_nothing_or_everything_is_refused(trained, folder, capsys, argv, fragment):
    rc, out, err = predict(capsys, trained, folder / "a.png", *argv)
    assert rc == 2 and fragment in err and out == ""


def test_the_python_api_checks_its_choices_and_wants_a_list(tiny_model, folder):
    from multitag.errors import UserError

    image = str(folder / "a.png")
    for kwargs in ({"top_k": 0}, {"top_k": 11}, {"top_k": 1.5}, {"threshold": -0.1}, {"threshold": "abc"}):
        with pytest.raises(UserError, match="is invalid"):
            tiny_model.predict([image], **kwargs)
        with pytest.raises(UserError, match="is invalid"):
            next(tiny_model.predict_each([image], **kwargs))
    with pytest.raises(UserError, match="give top_k or threshold, not both"):   # the threshold would be ignored
        tiny_model.predict([image], threshold=0.3, top_k=2)
    from PIL import Image
    import numpy as np

    for single in (image, Image.open(image), np.zeros((32, 32, 3), np.uint8)):
        with pytest.raises(UserError, match=r"takes a list of images, got one .*; pass \[image\]"):
            tiny_model.predict(single)
    assert len(tiny_model.predict([image], top_k=10)[0].labels) == 10
    assert tiny_model.predict([image], threshold="0")[0].labels                 # a number as a string, as the CLI
    from multitag.predict import load

    with pytest.raises(UserError, match="is a file of a run; pass the run directory"):
        load(tiny_model.run_dir / "model.json")


def test_an_object_that_is_no_image_fails_alone_and_scores_want_a_prepared_batch(tiny_model, folder):
    import io

    import numpy as np
    import torch

    good = str(folder / "a.png")
    out = list(tiny_model.predict_each([good, np.zeros((8, 8, 3)), None, good]))
    assert [p.error is None for p in out] == [True, False, False, True]
    assert "dtype float64" in out[1].error and "NoneType" in out[2].error
    (from_file,) = tiny_model.predict([io.BytesIO((folder / "a.png").read_bytes())])   # an upload's file object
    assert from_file.scores == pytest.approx(out[0].scores, abs=1e-5)     # batch of 1 vs 2: float noise
    size = tiny_model.input_size
    for batch in (torch.zeros(1, 3, size, size, dtype=torch.uint8), torch.zeros(1, 3, size + 1, size + 1), [1]):
        with pytest.raises(UserError, match="normalised float"):
            tiny_model.scores(batch)


def test_a_threshold_given_to_a_single_label_model_is_said_to_be_unused(trained, folder, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "multi_label": False, "thresholds": None}))
    rc, out, err = predict(capsys, run, folder / "a.png", "--threshold", "0.9", "--format", "json")
    assert rc == 0 and "warning: the threshold applies to multi-label models" in err and err.count("threshold applies") == 1
    from multitag.predict import load

    with pytest.warns(UserWarning, match="threshold applies to multi-label models"):
        load(run).predict([str(folder / "a.png")], threshold=0.9)
    assert len(json.loads(out)[0]["labels"]) == 1


def test_a_stale_onnx_warning_is_one_line_and_cuda_asked_on_a_cpu_names_the_option(trained, folder, tmp_path,
                                                                                     capsys, monkeypatch):
    import torch

    from multitag.export import export_onnx

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    export_onnx(run, log=lambda *a: None)
    meta = json.loads((run / "model.json").read_text())
    meta["export"]["onnx"]["weights_sha256"] = "0" * 64           # as if retrained after the export
    (run / "model.json").write_text(json.dumps(meta))
    rc, out, err = predict(capsys, run, folder / "a.png")
    assert rc == 0 and "multitag predict: warning: " in err and "UserWarning" not in err and "predict.py" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = predict(capsys, run, folder / "a.png", "--device", "cuda")
    assert rc == 2 and "device=cuda was asked for but no CUDA GPU is visible; use device=auto or cpu" in err
    assert "train.device" not in err


def test_a_changed_model_onnx_is_refused_in_one_line(trained, folder, tmp_path, capsys):
    from multitag.export import export_onnx

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    export_onnx(run, log=lambda *a: None)
    with open(run / "model.onnx", "ab") as f:        # edited after the export
        f.write(b"\0")
    rc, out, err = predict(capsys, run, folder / "a.png")
    assert rc == 2 and out == ""
    assert re.fullmatch(rf"multitag predict: error: {re.escape(str(run / 'model.onnx'))} does not match the run's "
                        r"model.json \(sha256 [0-9a-f]{12}…, recorded [0-9a-f]{12}…\); "
                        rf"export again with multitag export {re.escape(str(run))}\.\n", err), err


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_out_of_range_in_one_line(trained, capsys, port):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(trained), "--port", port])
    assert exit_.value.code == 2 and f"argument --port: '{port}' is not a port" in capsys.readouterr().err


def test_one_file_under_two_spellings_is_predicted_once(folder, monkeypatch):
    from multitag.predict import expand_images

    monkeypatch.chdir(folder.parent)
    first = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))[0]
    rel = f"{folder.name}/{first.name}"
    assert expand_images([rel, f"./{rel}", str(first), str(folder)])[0] == rel
    assert len(expand_images([rel, f"./{rel}", str(first), str(folder)])) == len(expand_images([str(folder)]))
