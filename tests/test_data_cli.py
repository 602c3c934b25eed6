"""`multitag data PATH` / multitag.inspect_data: the dataset as train reads it, its problems and exit status."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from image_bytes import png_header_only
from PIL import Image

import multitag
from multitag.cli import build_parser, main
from multitag.config import DataConfig
from multitag.data.prepare import prepare
from multitag.data.table import SPLITS


def write_png(path: Path, seed: int) -> None:
    """A small PNG whose bytes differ for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture
def broken_csv(tmp_path) -> Path:
    """Multi-label with its own split: "rare" has no val positive, img0 = dup (train / test), one file
    missing, one garbage, one cut short, one declaring 400 MP, one image without labels, difficult pairs."""
    images = tmp_path / "images"
    rows = []
    for i in range(12):
        write_png(images / f"img{i}.png", i)
        labels = ["a b", "b", "a c", "c rare", "a", "b c"][i % 6]
        rows.append([f"img{i}.png", labels, "c" if i == 1 else "", SPLITS[0] if i < 8 else SPLITS[1 + i % 2]])
    rows[10][1] = "a b"                   # val: img8 a c, img10 a b; test: img9 c rare, img11 b c
    (images / "dup.png").write_bytes((images / "img0.png").read_bytes())
    (images / "junk.png").write_bytes(b"<html>not an image</html>")
    (images / "cut.png").write_bytes((images / "img1.png").read_bytes()[:20])
    (images / "huge.png").write_bytes(png_header_only(20000, 20000))
    write_png(images / "empty.png", 99)
    rows += [["dup.png", "a b", "", "test"], ["gone.png", "a", "", "train"], ["junk.png", "b", "", "train"],
             ["cut.png", "c", "", "train"], ["huge.png", "a", "", "val"], ["empty.png", "", "", "train"]]
    return write_csv(tmp_path / "labels.csv", ["image", "labels", "difficult", "split"], rows)


def same_as_prepare(result: dict, cfg: DataConfig) -> None:
    """The survey's split sizes and per-class positives are those of the data train prepares."""
    prepared = prepare(cfg, log=lambda *a: None)
    t = prepared.table
    assert [r["name"] for r in result["per_class"]] == t.class_names
    assert result["multi_label"] == t.multi_label and result["num_classes"] == t.num_classes
    assert result["images"]["readable"] == len(prepared.rows("all"))
    for s in SPLITS:
        rows = prepared.rows(s)
        assert result["split"][s] == len(rows), s
        assert [r[s] for r in result["per_class"]] == t.positives(rows).sum(0).tolist(), s
    rows = prepared.rows("all")
    assert [r["ignored"] for r in result["per_class"]] == t.ignore[rows].sum(0).tolist()
    assert result["labels_per_image"] == np.bincount(t.positives(rows).sum(1)).tolist()


def test_problems_of_a_broken_csv_are_found_and_exit_1(broken_csv, tmp_path, capsys):
    result = multitag.inspect_data(str(broken_csv), log=lambda *a: None)
    same_as_prepare(result, DataConfig(path=str(broken_csv), on_bad_image="skip"))
    assert result["images"] == {"listed": 18, "readable": 14, "missing": 1, "unreadable": 3}
    p = result["problems"]
    assert [Path(x["path"]).name for x in p["missing"]] == ["gone.png"]
    assert [Path(x["path"]).name for x in p["unreadable"]] == ["junk.png", "cut.png"]
    assert [Path(x["path"]).name for x in p["too_large"]] == ["huge.png"] and "400,000,000" in p["too_large"][0]["reason"]
    (dup,) = p["duplicates"]
    assert [Path(x).name for x in dup["paths"]] == ["img0.png", "dup.png"]
    assert dup["splits"] == ["train", "test"] and dup["across_splits"] and dup["same_labels"]
    assert result["problem_count"] == 5
    rare = next(r for r in result["per_class"] if r["name"] == "rare")
    assert rare["flags"] == ["no val"] and rare["test"] == 1
    assert next(r for r in result["per_class"] if r["name"] == "c")["ignored"] == 1
    assert result["unlabelled"] == 1 and result["labels_per_image"][0] == 1
    assert any(w.startswith("no val positives of rare:") and "0.5" in w for w in result["warnings"])

    assert main(["data", str(broken_csv)]) == 1
    out = capsys.readouterr().out
    assert "1 missing file (train stops at the first; --set data.on_bad_image=skip leaves them out):" in out
    assert "junk.png: not an image file" in out and "leakage" in out and "5 problems found (exit status 1)" in out
    assert "1 image has no label: train keeps it as a negative of every class" in out

    assert main(["data", str(broken_csv), "--json", "--plot", str(tmp_path / "figs")]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in printed.items() if k != "plots"} == json.loads(json.dumps(result))
    assert set(printed["plots"]) == {"label_counts", "labels_per_image", "examples"}
    for path in printed["plots"].values():
        assert Image.open(path).format == "PNG" and Path(path).parent == tmp_path / "figs"


def test_listing_is_capped_and_a_clean_set_exits_0(tmp_path, capsys):
    rows = [[f"img{i}.png", "a" if i % 2 else "b"] for i in range(6)]
    for i, (name, _) in enumerate(rows):
        write_png(tmp_path / name, i)
    clean = write_csv(tmp_path / "clean.csv", ["image", "labels"], rows)
    assert main(["data", str(clean)]) == 0
    assert "no problems found" in capsys.readouterr().out

    gone = write_csv(tmp_path / "gone.csv", ["image", "labels"], rows + [[f"gone{i}.png", "a"] for i in range(15)])
    assert main(["data", str(gone)]) == 1
    out = capsys.readouterr().out
    assert out.count("gone") == 10 + 1 and "  ... and 5 more (--json lists all)" in out   # 10 listed + the header
    assert "15 missing files" in out


def test_stratified_split_and_set_overrides_match_train(tmp_path, capsys):
    rows = []
    for i in range(40):
        write_png(tmp_path / "images" / f"{i}.png", 1000 + i)
        rows.append([f"{i}.png", " ".join(n for n, on in (("x", i % 2), ("y", i % 3 == 0), ("z", i % 5 == 0)) if on)])
    data = write_csv(tmp_path / "labels.csv", ["image", "labels"], rows)
    result = multitag.inspect_data(str(data), overrides=["data.split_seed=3", "train.epochs=2"], log=print)
    assert "note: only data.* settings change how the data is read; train.epochs=2 do not" in capsys.readouterr().out
    same_as_prepare(result, DataConfig(path=str(data), split_seed=3))
    assert result["split"]["from"] == "stratified" and result["split"]["seed"] == 3
    assert (result["split"]["train"], result["split"]["val"], result["split"]["test"]) == (28, 6, 6)


def test_folder_per_class_single_label(tmp_path, capsys):
    for c, n in (("cat", 8), ("dog", 6)):
        for i in range(n):
            write_png(tmp_path / "pets" / c / f"{i}.png", 100 * len(c) + i + (50 if c == "dog" else 0))
    result = multitag.inspect_data(str(tmp_path / "pets"), plot=tmp_path / "figs", log=lambda *a: None)
    same_as_prepare(result, DataConfig(path=str(tmp_path / "pets")))
    assert result["format"] == "folder" and not result["multi_label"] and result["problem_count"] == 0
    assert [r["all"] for r in result["per_class"]] == [8, 6]
    assert set(result["plots"]) == {"label_counts", "examples"}     # one label per image: no histogram to draw
    # one image of each class, from train, and one the class really has
    prepared = prepare(DataConfig(path=str(tmp_path / "pets")), log=lambda *a: None)
    table, train = prepared.table, set(prepared.rows("train").tolist())
    for name, path in result["examples"].items():
        row = table.paths.index(path)
        assert table.targets[row, table.class_names.index(name)] == 1 and row in train
    assert set(result["examples"]) == {"cat", "dog"}
    assert Image.open(result["plots"]["examples"]).size[0] > 200
    assert main(["data", str(tmp_path / "pets")]) == 0
    assert "single-label" in capsys.readouterr().out


def test_demo_mosaics(digits_csv):
    result = multitag.inspect_data(str(digits_csv), log=lambda *a: None)
    same_as_prepare(result, DataConfig(path=str(digits_csv)))
    assert (result["split"]["train"], result["split"]["val"], result["split"]["test"]) == (120, 40, 40)
    assert result["problem_count"] == 0 and result["num_classes"] == 10 and result["split"]["from"] == "data"


def test_errors_and_help(tmp_path, capsys):
    assert main(["data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", str(tmp_path), "--set", "data.formatt=csv"]) == 2
    assert 'did you mean "data.format"' in capsys.readouterr().err
    helptext = build_parser()._subparsers._group_actions[0].choices["data"].format_help()
    assert "exit status: 0 when no problems were found, 1 when some were" in " ".join(helptext.split())


def test_too_few_images_after_the_missing_ones_names_them(tmp_path, capsys):
    """One of three listed images is there: the split cannot be made, and the missing files are why."""
    write_png(tmp_path / "a.png", 0)
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "labels"], [["a.png", "cat"], ["b.png", "dog"], ["c.png", "cat"]])
    assert main(["data", str(csv_path)]) == 2
    assert f"has 1 image(s) (2 more listed files missing, e.g. {tmp_path / 'b.png'}); a train and a val" in capsys.readouterr().err


def test_a_split_with_no_readable_image_is_what_train_refuses(tmp_path, capsys):
    """val's only image is unreadable: train stops for want of val images, it does not 'keep the last epoch'."""
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / name, len(name) + ord(name[0]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [["a.png", "cat", "train"], ["b.png", "dog", "train"], ["c.png", "cat dog", "test"], ["bad.png", "dog", "val"]]
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "labels", "split"], rows)
    assert main(["data", str(csv_path), "--json"]) == 1
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert 'no readable val images: train stops with "no usable val images after the split"' in warnings
    assert not any("keeps the last epoch" in w for w in warnings)
    with pytest.raises(multitag.errors.UserError, match="no usable val images after the split"):
        multitag.train("demo", data=str(csv_path), out=tmp_path / "run", overrides=["data.on_bad_image=skip"],
                       log=lambda *a: None)


@pytest.mark.skipif(not (SHARED_DATA / "voc2007" / "labels.csv").exists(), reason="../shared/data/voc2007 not present")
def test_real_voc2007(capsys):
    assert main(["data", str(SHARED_DATA / "voc2007"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # labels.csv's official train/val lists, less the 3 images this copy lacks (2,501 / 2,510 in VOC2007)
    assert (result["split"]["train"], result["split"]["val"], result["split"]["test"]) == (2500, 2508, 0)
    assert result["num_classes"] == 20 and result["images"]["readable"] == 5008
    assert sum(r["ignored"] for r in result["per_class"]) > 0 and result["unlabelled"] == 0


def test_headers_are_read_on_as_many_threads_as_the_cache_decodes_with(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import multitag.data.cache as cache
    from multitag.data import overview

    threads = []

    class Pool(ThreadPoolExecutor):
        def __init__(self, workers):
            threads.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(cache, "usable_cores", lambda: 5)
    monkeypatch.setattr(overview, "ThreadPoolExecutor", Pool)
    write_png(tmp_path / "a.png", 0)
    assert [kind for kind, _, _ in overview.check_files([str(tmp_path / "a.png")])] == [""]
    assert threads == [5]


def test_each_class_is_shown_by_a_train_image_with_the_fewest_labels(tmp_path):
    rows = [["a.png", "cat dog", "train"], ["b.png", "cat", "train"], ["d.png", "dog cat", "train"],
            ["c.png", "dog", "val"], ["e.png", "cat", "val"], ["f.png", "bird", "val"]]
    for i, (name, _, _) in enumerate(rows):
        write_png(tmp_path / name, i)
    labels = write_csv(tmp_path / "labels.csv", ["image", "labels", "split"], rows)
    result = multitag.inspect_data(str(labels), log=lambda *a: None)
    shown = {name: Path(path).name for name, path in result["examples"].items()}
    # cat: b alone beats a (two labels); dog: the first train image, not val's c that has it alone;
    # bird: only in val, so from val
    assert shown == {"bird": "f.png", "cat": "b.png", "dog": "a.png"}
