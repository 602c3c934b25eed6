"""Split assignment: given splits, stratification, determinism, tiny tables, split.csv round trip."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

from multitag.data.split import assign_split, read_split_csv, write_split_csv
from multitag.data.table import LabelTable
from multitag.errors import UserError


def multi_label_table(n: int, c: int = 6, seed: int = 0, split=None) -> LabelTable:
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < np.linspace(0.05, 0.5, c)).astype(np.float32)
    return LabelTable([f"/d/{i}.jpg" for i in range(n)], targets, np.zeros((n, c), bool),
                      [f"c{j}" for j in range(c)], split=split, source="test table")


def single_label_table(classes: list[int], split=None) -> LabelTable:
    n, c = len(classes), max(classes) + 1
    targets = np.eye(c, dtype=np.float32)[classes]
    return LabelTable([f"/d/{i}.jpg" for i in range(n)], targets, np.zeros((n, c), bool),
                      [f"k{j}" for j in range(c)], split=split, multi_label=False, source="test table")


def test_multi_label_sizes_stratification_and_determinism():
    table = multi_label_table(1000)
    split = assign_split(table, seed=3)
    assert Counter(split) == {"train": 700, "val": 150, "test": 150}
    parts = np.array(split)
    overall = table.targets.mean(0)
    for part in ("train", "val", "test"):
        assert np.abs(table.targets[parts == part].mean(0) - overall).max() < 0.02
    assert assign_split(table, seed=3) == split
    assert assign_split(table, seed=4) != split


def test_single_label_stratified():
    table = single_label_table([k for k in range(4) for _ in range(50)])
    parts = np.array(assign_split(table, seed=0))
    for part, size in (("train", 140), ("val", 30), ("test", 30)):
        assert (parts == part).sum() == size
    for part, size in (("val", 30), ("test", 30)):
        per_class = np.bincount(table.targets[parts == part].argmax(1), minlength=4)
        assert np.abs(per_class - size / 4).max() <= 1  # 7 or 8 of each class


def test_single_label_fallback_is_reported():
    table = single_label_table([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])  # class 3 has one image
    notes = []
    split = assign_split(table, log=notes.append)
    assert any("shuffled, not stratified" in n for n in notes)
    with pytest.warns(UserWarning, match="not stratified"):
        assert assign_split(table) == split


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_tiny_tables_get_train_and_val(n):
    for table in (multi_label_table(n), single_label_table([i % 2 for i in range(n)])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts = Counter(assign_split(table))
        assert counts["train"] >= 1 and counts["val"] >= 1
        assert counts["test"] >= (1 if n >= 3 else 0)


def test_one_image_is_an_error():
    with pytest.raises(UserError, match="at least 2"):
        assign_split(multi_label_table(1))


def test_given_split_used_as_is():
    given = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert assign_split(multi_label_table(10, split=given)) == given
    notes = []                      # fractions the data's own split overrules are said to do nothing
    assert assign_split(multi_label_table(10, split=given), (0.5, 0.25, 0.25), log=notes.append) == given
    assert len(notes) == 1 and "data.split_fractions is not used" in notes[0]
    notes.clear()
    assign_split(multi_label_table(10, split=given), log=notes.append)
    assert notes == []


def test_given_split_without_val_carves_val_from_train():
    given = ["train"] * 85 + ["test"] * 15
    notes = []
    split = assign_split(multi_label_table(100, split=given), log=notes.append)
    assert split[85:] == ["test"] * 15  # test rows untouched
    assert Counter(split[:85]) == {"train": 70, "val": 15}
    assert "no val rows" in notes[0]
    single = single_label_table([i % 3 for i in range(60)], split=["train"] * 60)
    assert Counter(assign_split(single)) == {"train": 49, "val": 11}


def test_bad_fractions():
    with pytest.raises(UserError, match="sum to 1"):
        assign_split(multi_label_table(10), fractions=(0.8, 0.3, 0.1))
    with pytest.raises(UserError, match="train > 0"):
        assign_split(multi_label_table(10), fractions=(0.0, 0.5, 0.5))
    with pytest.raises(UserError, match="val >= 0"):
        assign_split(multi_label_table(10), fractions=(1.2, -0.2, 0.0))


def test_val_fraction_zero_makes_no_val_split():
    assert Counter(assign_split(multi_label_table(100), fractions=(0.8, 0.0, 0.2))) == {"train": 80, "test": 20}
    assert set(assign_split(multi_label_table(10), fractions=(1.0, 0.0, 0.0))) == {"train"}
    given = ["train"] * 85 + ["test"] * 15                       # train/ and test/ folders: nothing carved
    assert assign_split(multi_label_table(100, split=given), fractions=(1.0, 0.0, 0.0)) == given
    with_val = ["train"] * 80 + ["val"] * 5 + ["test"] * 15      # a table's own val rows are kept
    assert assign_split(multi_label_table(100, split=with_val), fractions=(1.0, 0.0, 0.0)) == with_val


def test_split_csv_round_trip(tmp_path):
    table = multi_label_table(20)
    split = assign_split(table)
    path = tmp_path / "run" / "split.csv"
    write_split_csv(path, table, split)
    assert path.read_text().splitlines()[0] == "image,split"
    assert read_split_csv(path) == dict(zip(table.paths, split))
    assert [p.name for p in path.parent.iterdir()] == ["split.csv"]  # no temp file left


def test_read_split_csv_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_split_csv(tmp_path / "none.csv")
    bad = tmp_path / "s.csv"
    bad.write_text("image,split\n/a.jpg,train\n/a.jpg,val\n")
    with pytest.raises(UserError, match="s.csv row 3 repeats image"):
        read_split_csv(bad)
    bad.write_text("image,split\n/a.jpg,dev\n")
    with pytest.raises(UserError, match='split "dev"'):
        read_split_csv(bad)
