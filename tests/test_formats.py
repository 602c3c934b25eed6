"""Readers: every format, auto-detection, and the user errors for malformed inputs.

Tiny datasets are built in tmp_path; readers only check that image files exist, so the
"images" are empty files. Real-data tests skip when ../shared/data is absent.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from multitag.data.formats import FORMATS, detect_format, read_table
from multitag.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def labels_of(table) -> dict[str, set[str]]:
    return {os.path.basename(p): set(table.labels_of(i)) for i, p in enumerate(table.paths)}


def ignored_of(table) -> dict[str, set[str]]:
    return {os.path.basename(p): {table.class_names[j] for j in np.flatnonzero(table.ignore[i])}
            for i, p in enumerate(table.paths)}


def user_error(match: str, fn, *args, **kwargs) -> str:
    """Run fn, expect a one-line UserError whose message contains ``match``; return the message."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    return message


# --- CSV, delimited labels ---------------------------------------------------------------------

@pytest.mark.parametrize("field", ['"cat dog"', '"cat,dog"', "cat|dog", "cat;dog", '"cat , dog"'])
def test_csv_delimiters(tmp_path, field):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        touch(tmp_path / name)
    csv = write(tmp_path / "labels.csv", f"image,labels\na.jpg,{field}\nb.jpg,bird\nc.jpg,\n")
    assert detect_format(csv) == "csv" and detect_format(tmp_path) == "csv"
    table = read_table(csv)
    assert table.class_names == ["bird", "cat", "dog"]
    assert labels_of(table) == {"a.jpg": {"cat", "dog"}, "b.jpg": {"bird"}, "c.jpg": set()}
    assert table.targets.dtype == np.float32 and table.ignore.dtype == bool
    assert table.multi_label and table.split is None
    assert all(os.path.isabs(p) for p in table.paths)
    assert table.source == f"csv {csv}"


def test_csv_delimiter_allows_spaces_in_names(tmp_path):
    touch(tmp_path / "a.jpg")
    table = read_table(write(tmp_path / "l.csv", "image,tags\na.jpg,dining table|potted plant\n"))
    assert table.class_names == ["dining table", "potted plant"]
    assert table.extra["label_delimiter"] == "|"


def test_csv_mixed_delimiters_is_an_error(tmp_path):
    touch(tmp_path / "a.jpg"), touch(tmp_path / "b.jpg")
    csv = write(tmp_path / "l.csv", "image,labels\na.jpg,x|y\nb.jpg,x;y\n")
    user_error("l.csv mixes label delimiters", read_table, csv)


def test_csv_columns_case_and_aliases_split_difficult_images_dir(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg", "4.jpg"):
        touch(tmp_path / "images" / name)  # VOC layout: labels.csv + images/
    csv = write(tmp_path / "labels.csv",
                "FileName,Label,Difficult,Split\n"
                "1.jpg,car person,chair,train\n"
                "2.jpg,car,car,Valid\n"          # listed as both: the positive wins
                "3.jpg,person,,validation\n"
                "4.jpg,,car,TEST\n")
    table = read_table(csv)
    assert table.split == ["train", "val", "val", "test"]
    assert labels_of(table)["1.jpg"] == {"car", "person"}
    assert ignored_of(table) == {"1.jpg": {"chair"}, "2.jpg": set(), "3.jpg": set(), "4.jpg": {"car"}}
    assert table.class_names == ["car", "chair", "person"]
    assert table.paths[0] == str(tmp_path / "images" / "1.jpg")


def test_csv_single_label_column(tmp_path):
    touch(tmp_path / "a.jpg"), touch(tmp_path / "b.jpg")
    table = read_table(write(tmp_path / "l.csv", "image,label\na.jpg,cat\nb.jpg,dog\n"))
    assert not table.multi_label
    multi = read_table(write(tmp_path / "l.csv", "image,labels\na.jpg,cat\nb.jpg,dog\n"))
    assert multi.multi_label


def test_csv_given_classes_set_order_and_unknown_label(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write(tmp_path / "l.csv", "image,labels\na.jpg,dog cat\n")
    table = read_table(csv, classes=["dog", "cat", "bird"])
    assert table.class_names == ["dog", "cat", "bird"]
    assert table.targets.tolist() == [[1, 1, 0]]
    message = user_error('label "dog" is not one of the 2 classes (cat, dgo)', read_table, csv, classes=["cat", "dgo"])
    assert "l.csv row 2" in message and 'did you mean "dgo"' in message


def test_csv_image_root_and_absolute_paths(tmp_path):
    touch(tmp_path / "pics" / "a.jpg")
    absolute = touch(tmp_path / "elsewhere" / "b.jpg")
    csv = write(tmp_path / "ann" / "l.csv", f"image,labels\na.jpg,x\n{absolute},y\n")
    table = read_table(csv, image_root=str(tmp_path / "pics"))
    assert table.paths == [str(tmp_path / "pics" / "a.jpg"), str(absolute)]


# --- CSV, one-hot ------------------------------------------------------------------------------

def test_csv_onehot(tmp_path):
    touch(tmp_path / "a.png"), touch(tmp_path / "b.png")
    csv = write(tmp_path / "l.csv", "image,split,zebra,ant\na.png,train,1,0\nb.png,val,1.0,1\n")
    assert detect_format(csv) == "csv_onehot"
    table = read_table(csv)
    assert table.class_names == ["zebra", "ant"]  # column order, not sorted
    assert table.targets.tolist() == [[1, 0], [1, 1]]
    assert table.split == ["train", "val"]


def test_csv_onehot_bad_value_names_column_and_row(tmp_path):
    touch(tmp_path / "a.png"), touch(tmp_path / "b.png")
    csv = write(tmp_path / "l.csv", "image,cat,dog\na.png,1,0\nb.png,0,2\n")
    message = user_error('column "dog" has value "2"', read_table, csv)
    assert "l.csv row 3" in message


# --- folder per class --------------------------------------------------------------------------

def test_folder_flat(tmp_path):
    touch(tmp_path / "cat" / "1.JPG"), touch(tmp_path / "cat" / "sub" / "2.png")
    touch(tmp_path / "dog" / "3.webp"), touch(tmp_path / "dog" / "notes.txt")
    touch(tmp_path / "dog" / ".hidden.jpg"), touch(tmp_path / ".cache" / "x.jpg")
    assert detect_format(tmp_path) == "folder"
    table = read_table(tmp_path)
    assert table.class_names == ["cat", "dog"]
    assert labels_of(table) == {"1.JPG": {"cat"}, "2.png": {"cat"}, "3.webp": {"dog"}}
    assert not table.multi_label and table.split is None
    assert table.source == f"folder {tmp_path}"


def test_folder_with_split_folders(tmp_path):
    for split in ("train", "valid", "test"):
        touch(tmp_path / split / "cat" / f"{split}.jpg"), touch(tmp_path / split / "dog" / f"{split}.jpg")
    table = read_table(tmp_path)
    assert table.class_names == ["cat", "dog"]
    assert table.split == ["train", "train", "val", "val", "test", "test"]


def test_folder_class_named_train_is_a_class(tmp_path):
    touch(tmp_path / "train" / "1.jpg"), touch(tmp_path / "boat" / "2.jpg")
    table = read_table(tmp_path)
    assert table.class_names == ["boat", "train"] and table.split is None


def test_folder_classes_are_those_of_all_splits(tmp_path):
    """A rare class missing from test is common: the classes are the union, and the gap is noted."""
    touch(tmp_path / "train" / "cat" / "1.jpg"), touch(tmp_path / "train" / "dog" / "2.jpg")
    touch(tmp_path / "test" / "cat" / "3.jpg")
    (tmp_path / "test" / "dog").mkdir()                       # empty: dog has images in train
    table = read_table(tmp_path)
    assert table.class_names == ["cat", "dog"] and table.split == ["train", "train", "test"]
    assert table.extra["notes"] == ["test/ has no images of dog"]
    (tmp_path / "val" / "bird").mkdir(parents=True)           # a class no split has images of
    user_error("val/bird contains no images", read_table, tmp_path)


def test_folder_of_one_class_is_refused_with_the_folder_that_holds_the_classes(tmp_path):
    touch(tmp_path / "animals" / "cat" / "1.jpg"), touch(tmp_path / "animals" / "dog" / "2.jpg")
    message = user_error("one class folder (animals)", read_table, tmp_path)
    assert f"pass --data {tmp_path / 'animals'}" in message


def test_symlinked_folders_inside_a_class_are_followed_once(tmp_path):
    touch(tmp_path / "data" / "cat" / "1.jpg"), touch(tmp_path / "data" / "dog" / "2.jpg")
    touch(tmp_path / "extra" / "3.jpg")
    (tmp_path / "data" / "dog" / "more").symlink_to(tmp_path / "extra")
    (tmp_path / "extra" / "loop").symlink_to(tmp_path / "data" / "dog")     # a cycle must not hang
    table = read_table(tmp_path / "data")
    assert sorted(Path(p).name for p in table.paths) == ["1.jpg", "2.jpg", "3.jpg"]


# --- COCO --------------------------------------------------------------------------------------

def coco_dataset(root: Path) -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        touch(root / "images" / name)
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 18, "iscrowd": 1},  # crowd still counts
        ],
    }
    return write(root / "annotations.json", json.dumps(data))


def test_coco(tmp_path):
    path = coco_dataset(tmp_path)
    assert detect_format(path) == "coco" and detect_format(tmp_path) == "coco"
    table = read_table(path)
    assert table.class_names == ["person", "dog"]  # by category id
    assert labels_of(table) == {"a.jpg": {"person"}, "b.jpg": {"dog"}, "c.jpg": set()}
    assert table.source == f"coco {path}"


def test_coco_image_root_and_unknown_category(tmp_path):
    touch(tmp_path / "pics" / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"image_id": 1, "category_id": 1}]}
    path = write(tmp_path / "ann" / "instances.json", json.dumps(data))
    assert read_table(path, image_root=str(tmp_path / "pics")).targets.tolist() == [[1.0]]
    data["annotations"][0]["category_id"] = 7
    write(path, json.dumps(data))
    user_error("category_id 7", read_table, path, image_root=str(tmp_path / "pics"))


def test_coco_corrupt_and_missing_key(tmp_path):
    user_error("bad.json is not valid JSON", read_table, write(tmp_path / "bad.json", '{"images": ['))
    user_error('no "annotations" field', read_table, write(tmp_path / "x.json", '{"images": [], "categories": []}'))


# --- Pascal VOC --------------------------------------------------------------------------------

def voc_xml(filename: str, objects: list[tuple[str, int]]) -> str:
    body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    return f"<annotation><filename>{filename}</filename>{body}</annotation>"


def test_voc_root_with_difficult(tmp_path):
    touch(tmp_path / "JPEGImages" / "1.jpg"), touch(tmp_path / "JPEGImages" / "2.jpg")
    write(tmp_path / "Annotations" / "1.xml", voc_xml("1.jpg", [("dog", 0), ("cat", 1)]))
    write(tmp_path / "Annotations" / "2.xml", voc_xml("2.jpg", [("dog", 1), ("dog", 0), ("cat", 1)]))
    assert detect_format(tmp_path) == "voc"
    table = read_table(tmp_path)
    assert table.class_names == ["cat", "dog"]
    assert labels_of(table) == {"1.jpg": {"dog"}, "2.jpg": {"dog"}}  # non-difficult dog wins
    assert ignored_of(table) == {"1.jpg": {"cat"}, "2.jpg": {"cat"}}


def test_voc_flat_folder_and_corrupt_xml(tmp_path):
    touch(tmp_path / "1.jpg")
    write(tmp_path / "1.xml", voc_xml("1.jpg", [("bird", 0)]))
    assert detect_format(tmp_path) == "voc"
    assert read_table(tmp_path).class_names == ["bird"]
    write(tmp_path / "2.xml", "<annotation><filename>2.jpg</filename>")
    user_error("2.xml is not valid XML", read_table, tmp_path)


# --- YOLO --------------------------------------------------------------------------------------

@pytest.mark.parametrize("names_file,text", [
    ("data.yaml", "nc: 3\nnames: [car, bus, bike]\n"),
    ("data.yaml", "names:\n  0: car\n  1: bus\n  2: bike\n"),
    ("classes.txt", "car\nbus\nbike\n"),
    ("obj.names", "car\nbus\nbike\n"),
])
def test_yolo_names_files(tmp_path, names_file, text):
    write(tmp_path / names_file, text)
    touch(tmp_path / "images" / "a.jpg"), touch(tmp_path / "images" / "b.jpg"), touch(tmp_path / "images" / "c.jpg")
    write(tmp_path / "labels" / "a.txt", "0 0.5 0.5 0.1 0.1\n2 0.1 0.1 0.1 0.1\n0 0.2 0.2 0.1 0.1\n")
    write(tmp_path / "labels" / "b.txt", "")  # empty file: no positives; c has no file at all
    assert detect_format(tmp_path) == "yolo"
    table = read_table(tmp_path)
    assert table.class_names == ["car", "bus", "bike"]
    assert labels_of(table) == {"a.jpg": {"car", "bike"}, "b.jpg": set(), "c.jpg": set()}


def test_yolo_split_layouts_and_bad_class_id(tmp_path):
    write(tmp_path / "data.yaml", "names: [a, b]\n")
    for split in ("train", "val"):
        touch(tmp_path / "images" / split / f"{split}.png")
        write(tmp_path / "labels" / split / f"{split}.txt", "1 0.5 0.5 0.2 0.2\n")
    assert detect_format(tmp_path / "data.yaml") == "yolo"
    table = read_table(tmp_path / "data.yaml")
    assert table.split == ["train", "val"] and table.targets.tolist() == [[0, 1], [0, 1]]
    write(tmp_path / "labels" / "val" / "val.txt", "5 0.5 0.5 0.2 0.2\n")
    user_error("class id 5 is outside the 2 names", read_table, tmp_path)


def test_yolo_roboflow_layout(tmp_path):
    write(tmp_path / "data.yaml", "names: [a, b]\n")
    touch(tmp_path / "train" / "images" / "x.jpg"), write(tmp_path / "train" / "labels" / "x.txt", "0 .5 .5 .1 .1\n")
    touch(tmp_path / "valid" / "images" / "y.jpg"), (tmp_path / "valid" / "labels").mkdir()
    table = read_table(tmp_path)
    assert table.split == ["train", "val"] and table.targets.tolist() == [[1, 0], [0, 0]]


# --- auto-detection and forcing ----------------------------------------------------------------

def test_detect_csv_in_folder_beats_images_subfolder(tmp_path):
    touch(tmp_path / "images" / "a.jpg")
    write(tmp_path / "labels.csv", "image,labels\na.jpg,x\n")
    assert detect_format(tmp_path) == "csv"
    assert read_table(tmp_path).class_names == ["x"]


def test_unknown_format_and_misspelled_format(tmp_path):
    write(tmp_path / "readme.md", "hi")
    message = user_error("cannot tell the data format", read_table, tmp_path)
    assert "--set data.format=" in message and all(f in message for f in FORMATS)
    user_error('did you mean "coco"', read_table, tmp_path, format="coc")
    user_error('on_missing must be "error" or "skip"', read_table, tmp_path, on_missing="ignore")


def test_forced_format(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write(tmp_path / "l.csv", "image,cat\na.jpg,1\n")
    assert read_table(csv, format="csv_onehot").class_names == ["cat"]
    message = user_error("has no labels column", read_table, csv, format="CSV")
    assert "csv_onehot" in message


# --- malformed inputs --------------------------------------------------------------------------

def test_missing_path(tmp_path):
    user_error("nope.csv does not exist", read_table, tmp_path / "nope.csv")


def test_empty_and_header_only_csv(tmp_path):
    user_error("empty.csv is empty", read_table, write(tmp_path / "empty.csv", ""))
    user_error("head.csv has a header but no rows", read_table, write(tmp_path / "head.csv", "image,labels\n\n"))


def test_missing_column_names_found_and_closest(tmp_path):
    csv = write(tmp_path / "l.csv", "imge,labels\na.jpg,x\n")
    message = user_error("l.csv has no image column", read_table, csv)
    assert "columns: imge, labels" in message and 'rename column "imge" to "image"' in message


def test_duplicate_rows_name_both_rows(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write(tmp_path / "l.csv", "image,labels\na.jpg,x\nb.jpg,y\n./a.jpg,z\n")
    touch(tmp_path / "b.jpg")
    message = user_error("both list image", read_table, csv)
    assert "l.csv rows 2 and 4" in message and "merge" in message


def test_missing_image_error_and_skip(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write(tmp_path / "l.csv", "image,labels\na.jpg,x\ngone.jpg,y\n")
    message = user_error("l.csv row 3: image file gone.jpg not found", read_table, csv)
    assert str(tmp_path / "images" / "gone.jpg") in message  # names the places it tried
    table = read_table(csv, on_missing="skip")
    assert len(table) == 1 and table.extra["skipped"] == [(str(tmp_path / "gone.jpg"), "file not found")]
    assert table.class_names == ["x"]


def test_paths_relative_to_another_folder_need_image_root_and_windows_paths_resolve(tmp_path):
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    touch(tmp_path / "pics" / "a.jpg")
    touch(tmp_path / "pics" / "sub" / "b.jpg")
    csv = write(tmp_path / "ann" / "l.csv", "image,labels\na.jpg,x\nsub\\b.jpg,y\n")
    message = user_error("image file a.jpg not found", read_table, csv)
    assert "data.image_root" in message and "skip" not in message     # skipping would drop every row
    table = read_table(csv, image_root=str(tmp_path / "pics"))
    assert table.paths == [str(tmp_path / "pics" / "a.jpg"), str(tmp_path / "pics" / "sub" / "b.jpg")]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_separated_files_read(tmp_path, sep):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    csv = write(tmp_path / ("l.tsv" if sep == "\t" else "l.csv"), f"image{sep}labels\na.jpg{sep}x y\nb.jpg{sep}y\n")
    table = read_table(csv)
    assert table.class_names == ["x", "y"] and table.labels_of(0) == ["x", "y"]


@pytest.mark.parametrize("text, match", [
    ("image,cat,cat\na.jpg,1,0\n", 'two columns named "cat"'),
    ("image,labels,Labels\na.jpg,cat,dog\n", 'two columns named "Labels"'),
    ("image,labels\na.jpg,\"car,dog\"\nb.jpg,car dog\n", 'row 3: "car dog" reads as one label'),
    ("image,labels\na.jpg,\"['car', 'dog']\"\n", "looks like part of a list"),
    ("image,car,dog,difficult\na.jpg,1,0,cat\n", 'row 2: difficult label "cat" is not a class'),
    ("image,labels,is_valid\na.jpg,car,maybe\n", 'is_valid is "maybe"'),
    (",image,cat,dog\n0,a.jpg,1,0\n1,b.jpg,0,1\n", "column 1 has no name"),
    ("a.jpg,cat\nb.jpg,dog\n", "starts with a row of data"),
])
def test_label_columns_read_another_way_than_written_are_refused(tmp_path, text, match):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    message = user_error(match, read_table, write(tmp_path / "l.csv", text))
    assert "\n" not in message


def test_comma_separated_names_with_spaces_and_fastai_is_valid(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        touch(tmp_path / name)
    text = "image,labels,is_valid\na.jpg,\"traffic light,car\",False\nb.jpg,traffic light,True\nc.jpg,car,0\n"
    table = read_table(write(tmp_path / "l.csv", text))
    assert table.class_names == ["car", "traffic light"] and table.split == ["train", "val", "train"]


def test_bad_split_value(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write(tmp_path / "l.csv", "image,labels,split\na.jpg,x,trian\n")
    message = user_error('l.csv row 2: split "trian"', read_table, csv)
    assert 'did you mean "train"' in message


def test_wrong_field_count(tmp_path):
    csv = write(tmp_path / "l.csv", "image,labels\na.jpg,x,y\n")
    user_error("l.csv row 2 has 3 fields", read_table, csv)


# --- real data (skipped without ../shared/data) ------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "voc2007" / "labels.csv").exists(), reason="../shared/data/voc2007 not present")
def test_real_voc2007_csv():
    table = read_table(SHARED_DATA / "voc2007" / "labels.csv")
    assert len(table) == 5008 and table.num_classes == 20 and table.class_names[0] == "aeroplane"
    assert table.split.count("train") == 2500 and table.split.count("val") == 2508
    assert table.ignore.sum() > 0 and not (table.ignore & (table.targets > 0)).any()
    assert detect_format(SHARED_DATA / "voc2007") == "csv"


@pytest.mark.skipif(not (SHARED_DATA / "cifar10").is_dir(), reason="../shared/data/cifar10 not present")
def test_real_cifar10_folders():
    start = time.perf_counter()
    table = read_table(SHARED_DATA / "cifar10")
    assert table.num_classes == 10 and not table.multi_label
    assert table.split.count("train") == 50000 and table.split.count("test") == 10000
    assert time.perf_counter() - start < 5


def test_voc_image_sets_give_the_official_split(tmp_path):
    for i, name in enumerate(["000001", "000002", "000003"]):
        write(tmp_path / "Annotations" / f"{name}.xml",
              f"<annotation><filename>{name}</filename><object><name>cat</name></object></annotation>")
        touch(tmp_path / "JPEGImages" / f"{name}.jpg")               # <filename> without suffix: .jpg
    write(tmp_path / "ImageSets" / "Main" / "train.txt", "000001\n000003\n")
    write(tmp_path / "ImageSets" / "Main" / "val.txt", "000002\n")
    assert read_table(tmp_path).split == ["train", "val", "train"]
    write(tmp_path / "ImageSets" / "Main" / "val.txt", "")
    user_error("1 of 3 annotations", read_table, tmp_path)


def test_yolo_data_yaml_folders_give_the_split(tmp_path):
    for split, name in (("train2017", "a"), ("train2017", "b"), ("val2017", "c")):
        touch(tmp_path / "images" / split / f"{name}.jpg")
        write(tmp_path / "labels" / split / f"{name}.txt", "1 0.5 0.5 0.2 0.2\n")
    write(tmp_path / "data.yaml", "path: .\ntrain: images/train2017\nval: images/val2017\nnames: {0: person, 1: car}\n")
    table = read_table(tmp_path)
    assert table.split == ["train", "train", "val"] and table.class_names == ["person", "car"]
    write(tmp_path / "data.yaml", "train: images/train2017\nval: images/train2017\nnames: [person, car]\n")
    assert read_table(tmp_path).split == ["train", "train"]          # coco128: val is train, counted once


def test_the_label_mode_is_explained_where_the_data_suggests_the_other(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        touch(tmp_path / name)
    table = read_table(write(tmp_path / "l.csv", "image,labels\na.jpg,cat\nb.jpg,dog\n"))
    assert table.multi_label and 'name it "label" for a single-label model' in table.extra["notes"][0]
    table = read_table(write(tmp_path / "l.csv", "image,label\na.jpg,cat\nb.jpg,\n"))
    assert table.multi_label and "row 3 has 0 labels" in table.extra["notes"][0]
    assert "notes" not in read_table(write(tmp_path / "l.csv", "image,label\na.jpg,cat\nb.jpg,dog\n")).extra
