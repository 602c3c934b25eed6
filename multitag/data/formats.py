"""Readers: every supported on-disk label format → one ``LabelTable``.

Formats (``FORMATS``), one reader each, all with the same keyword arguments:

- ``csv``        ``read_csv``: header with an image column and a labels column whose field holds
                 several class names (``image,labels`` / ``filename,tags`` ...).
- ``csv_onehot`` ``read_csv_onehot``: an image column and one 0/1 column per class.
- ``folder``     ``read_folder``: ``root/<class>/*.jpg`` (single-label), optionally under
                 ``root/train|val|valid|validation|test/``.
- ``coco``       ``read_coco``: a COCO instances JSON (``images``, ``annotations``, ``categories``).
- ``voc``        ``read_voc``: Pascal VOC XML files (a folder of ``*.xml`` or a VOC root with
                 ``Annotations/`` and ``JPEGImages/``).
- ``yolo``       ``read_yolo``: ``images/`` + ``labels/*.txt`` (optionally with split sub-folders,
                 or ``train/images`` + ``train/labels``) and class names from ``data.yaml``,
                 ``classes.txt``, ``names``/``names.txt``/``*.names``.

Auto-detection (``detect_format``), first rule that matches wins:

- a file: ``.csv`` → ``csv`` if it has a labels/label/tags column, else ``csv_onehot``;
  ``.json`` → ``coco``; ``.yaml``/``.yml`` → ``yolo`` (the data.yaml of a YOLO dataset).
- a folder: has ``Annotations/`` or ``*.xml`` → ``voc``; has a YOLO class-names file and a
  ``labels/`` folder (or ``<split>/labels/``) → ``yolo``; has ``labels.csv`` or exactly one
  ``*.csv`` → that CSV, as above; has exactly one ``*.json`` → ``coco``; has sub-folders (or
  split/class sub-sub-folders) holding images → ``folder``.
  The CSV and JSON rules come before ``folder`` because such datasets keep their images in an
  ``images/`` sub-folder, which would otherwise look like a one-class folder dataset.

Label delimiter inside a CSV labels field, decided once per file: if any labels (or
difficult/ignore) field contains ``|``, ``;`` or ``,``, that character is the delimiter (so class
names may contain spaces, e.g. ``dining table|person``); two different ones in the same file is an
error; otherwise labels are separated by whitespace. Names are stripped of surrounding spaces.
Label fields evidently written another way are refused rather than read as odd classes: Python
lists (``['car', 'dog']``) and a space-separated row in a comma-separated file whose words are
labels too. The fields themselves are comma-separated, or ``;``/tab when the header holds one of
those and no comma (Excel in decimal-comma locales, TSV). A split column is ``split``/``subset``
(train/val/test) or fastai's ``is_valid`` (True = val, False = train). Two columns of one name are
refused.

Image paths are resolved against, in order: ``image_root`` (when given), the annotation file's
folder, and an ``images/`` folder beside it (plus format-specific places, see each reader); the
first existing file wins and the table holds absolute paths. A missing image raises a
``UserError`` unless ``on_missing="skip"``, which drops the row and records
``(path, "file not found")`` in ``table.extra["skipped"]``. Decoding images is not done here.

Every user mistake raises ``UserError`` with one sentence naming the file (and row) and the fix.
"""
from __future__ import annotations

import csv
import io
import json
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import yaml

from multitag.data.table import SPLITS, LabelTable
from multitag.errors import UserError, closest, did_you_mean

FORMATS = ("csv", "csv_onehot", "folder", "coco", "voc", "yolo")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
IMAGE_COLUMNS = ("image", "filename", "file", "path", "img")
LABEL_COLUMNS = ("labels", "label", "tags")
SPLIT_COLUMNS = ("split", "subset", "is_valid")    # is_valid: fastai's True/False column (True = val)
IGNORE_COLUMNS = ("difficult", "ignore")
LABEL_DELIMITERS = ("|", ";", ",")  # whitespace is the fallback when none of these appears
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
ON_MISSING = ("error", "skip")
YOLO_NAME_FILES = ("data.yaml", "data.yml", "classes.txt", "names", "names.txt")
FORCE_HINT = "--set data.format=NAME"


class _Row(NamedTuple):
    """One image as a reader saw it, before paths are resolved and labels encoded."""

    image: str  # as written in the source: relative to some base folder, or absolute
    positives: Sequence[str]
    ignored: Sequence[str]  # e.g. VOC "difficult"; a positive of the same class wins
    split: str | None
    where: str  # "…/labels.csv row 7": names the file (and row) in error messages


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def read_table(
    path: str | Path,
    format: str = "auto",
    *,
    image_root: str | None = None,
    classes: list[str] | None = None,
    on_missing: str = "error",
) -> LabelTable:
    """Read any supported dataset at ``path`` into a LabelTable.

    format:     "auto" (detect, see the module docstring) or one of FORMATS.
    image_root: extra folder tried first when resolving relative image paths.
    classes:    the class list (and column order) to use; a label outside it is an error.
                Default: the format's own list (COCO categories, YOLO names) or sorted names.
    on_missing: "error" (default) raises on a missing image file; "skip" drops the row and
                records it in ``table.extra["skipped"]``.
    """
    path = _existing(path)
    if on_missing not in ON_MISSING:
        raise UserError(
            f'on_missing must be "error" or "skip", not "{on_missing}"{did_you_mean(on_missing, ON_MISSING)}'
        )
    format = format.strip().lower()
    fmt = detect_format(path) if format == "auto" else _check_format(format)
    return READERS[fmt](path, image_root=image_root, classes=classes, on_missing=on_missing)


def detect_format(path: str | Path) -> str:
    """The format name of the dataset at ``path`` by the rules in the module docstring."""
    path = _existing(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return _csv_kind(path)
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise _unknown_format(path)
    if (path / "Annotations").is_dir() or _files_with_suffix(path, ".xml"):
        return "voc"
    if _yolo_names_file(path) is not None and _has_yolo_labels(path):
        return "yolo"
    csv_file = _find_data_file(path, ".csv", preferred="labels.csv")
    if csv_file is not None:
        return _csv_kind(csv_file)
    if _find_data_file(path, ".json") is not None:
        return "coco"
    if _looks_like_folder_dataset(path):
        return "folder"
    raise _unknown_format(path)


def _check_format(format: str) -> str:
    """``format`` if it names a reader, else a UserError with the closest name."""
    if format not in FORMATS:
        raise UserError(
            f'unknown data format "{format}"{did_you_mean(format, ("auto",) + FORMATS)}; '
            f"use auto or one of {', '.join(FORMATS)}"
        )
    return format


def _unknown_format(path: Path) -> UserError:
    return UserError(
        f"cannot tell the data format of {path}: expected a .csv or COCO .json file, or a folder "
        "with Pascal VOC .xml files, YOLO images/ + labels/ + data.yaml, a labels.csv, or one "
        f"sub-folder of images per class; force one with {FORCE_HINT} ({', '.join(FORMATS)})"
    )


# ---------------------------------------------------------------------------------------------
# CSV: delimited labels and one-hot
# ---------------------------------------------------------------------------------------------

class _CsvColumns(NamedTuple):
    """Indices of the special columns of a CSV header (None where absent)."""

    image: int
    label: int | None
    split: int | None
    ignore: int | None


def read_csv(path: str | Path, *, image_root: str | None = None, classes: list[str] | None = None,
             on_missing: str = "error") -> LabelTable:
    """A CSV with an image column and a delimited labels column (see the module docstring).

    Optional columns: ``split`` (train/val/test) and ``difficult``/``ignore`` (classes that are
    neither positive nor negative for that image). An empty labels field means no positives.
    The table is single-label (multi_label=False) only when the column is named ``label`` and
    every row has exactly one class and nothing ignored.
    """
    path = _data_file(path, ".csv", preferred="labels.csv")
    header, rows = _read_csv_rows(path)
    cols = _csv_columns(header, path, need_labels=True)
    fields = [f[cols.label] for _, f in rows]
    if cols.ignore is not None:
        fields += [f[cols.ignore] for _, f in rows]
    delimiter = detect_label_delimiter(fields, path)
    table_rows = [
        _Row(
            image=f[cols.image],
            positives=split_labels(f[cols.label], delimiter),
            ignored=split_labels(f[cols.ignore], delimiter) if cols.ignore is not None else (),
            split=_csv_split(f, cols, f"{path} row {n}", header),
            where=f"{path} row {n}",
        )
        for n, f in rows
    ]
    _check_label_names(table_rows, delimiter, path)
    column = header[cols.label]
    one_each = [len(set(r.positives)) == 1 and not r.ignored for r in table_rows]
    single = column.lower() == "label" and all(one_each)
    table = _build_table(
        table_rows, fmt="csv", path=path, bases=_bases(image_root, path.parent, path.parent / "images"),
        classes=classes, on_missing=on_missing, multi_label=not single,
        extra={"label_delimiter": delimiter or " "},
    )
    if classes is None:      # the mode follows the column name: say so where the data suggests the other one
        if column.lower() != "label" and all(one_each):
            table.extra["notes"] = [f'every row has one label, read as multi-label (sigmoid, mAP) since the column is '
                                    f'"{column}"; name it "label" for a single-label model (softmax, accuracy)']
        elif column.lower() == "label" and not all(one_each):
            odd = table_rows[one_each.index(False)]
            table.extra["notes"] = [f'read as multi-label: the column is "label", but {odd.where} has '
                                    f"{len(set(odd.positives))} labels (single-label needs exactly one per row)"]
    return table


def read_csv_onehot(path: str | Path, *, image_root: str | None = None, classes: list[str] | None = None,
                    on_missing: str = "error") -> LabelTable:
    """A CSV with an image column and one 0/1 column per class (header = class name).

    Every column other than image/split/difficult/ignore is a class column; a value other than
    0 or 1 in one is an error naming the column and row. Class order is the column order.
    """
    path = _data_file(path, ".csv", preferred="labels.csv")
    header, rows = _read_csv_rows(path)
    cols = _csv_columns(header, path, need_labels=False)
    special = {cols.image, cols.split, cols.ignore}
    class_cols = [j for j in range(len(header)) if j not in special]
    if not class_cols:
        raise UserError(f"{path} has no class columns (columns: {', '.join(header)}); add one 0/1 column per class")
    unnamed = [j + 1 for j in class_cols if not header[j]]
    if unnamed:      # pandas' to_csv writes its index as a first column without a name
        raise UserError(f"{path} column {unnamed[0]} has no name, so it has no class (an index column? save the "
                        "CSV without the index, e.g. to_csv(index=False), or name the column)")
    ignore_fields = [f[cols.ignore] for _, f in rows] if cols.ignore is not None else []
    delimiter = detect_label_delimiter(ignore_fields, path)
    table_rows = [
        _Row(
            image=f[cols.image],
            positives=[header[j] for j in class_cols if _onehot_value(f[j], header[j], f"{path} row {n}")],
            ignored=split_labels(f[cols.ignore], delimiter) if cols.ignore is not None else (),
            split=_csv_split(f, cols, f"{path} row {n}", header),
            where=f"{path} row {n}",
        )
        for n, f in rows
    ]
    return _build_table(
        table_rows, fmt="csv_onehot", path=path, bases=_bases(image_root, path.parent, path.parent / "images"),
        classes=classes, on_missing=on_missing, class_order=[header[j] for j in class_cols],
    )


def detect_label_delimiter(fields: Iterable[str], path: str | Path) -> str | None:
    """The one delimiter of a file's label fields: ``|``, ``;`` or ``,`` if present, else None (whitespace).

    Deciding once per file (not per row) keeps a one-label row from being read differently
    from its neighbours; two different delimiters in one file are refused, not guessed.
    """
    fields = [f for f in fields if f]
    seen = [d for d in LABEL_DELIMITERS if any(d in f for f in fields)]
    if len(seen) > 1:
        raise UserError(
            f"{path} mixes label delimiters ({' and '.join(repr(d) for d in seen)}); "
            "separate the labels in every row with the same one of space, comma, | or ;"
        )
    return seen[0] if seen else None


def split_labels(field: str, delimiter: str | None) -> list[str]:
    """Class names in one labels field; ``delimiter`` None splits on whitespace."""
    parts = field.split(delimiter) if delimiter else field.split()
    return [p.strip() for p in parts if p.strip()]


def _csv_kind(path: Path) -> str:
    """``csv`` when the header has a labels column, else ``csv_onehot``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
        header = next(csv.reader([first], delimiter=_field_delimiter(first)), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return "csv"  # let the reader raise the precise error
    lower = {h.strip().lower() for h in header}
    return "csv" if not header or lower & set(LABEL_COLUMNS) else "csv_onehot"


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The stripped header and (file line number, stripped fields) of each non-blank row."""
    text = _read_text(path, hint='it needs a header row such as "image,labels" and one row per image')
    # strict: an unclosed quote is an error instead of silently swallowing the following rows.
    reader = csv.reader(io.StringIO(text), strict=True, delimiter=_field_delimiter(text))
    start = 1                      # file line where the current record starts (records may span lines)
    try:
        header = [h.strip() for h in next(reader)]
        _check_distinct_columns(header, path)
        rows = []
        start = reader.line_num + 1
        for fields in reader:
            start, line = reader.line_num + 1, start
            if not any(f.strip() for f in fields):
                continue  # blank lines (often a trailing one) carry nothing
            if len(fields) != len(header):
                raise UserError(
                    f"{path} row {reader.line_num} has {len(fields)} fields but the header has "
                    f"{len(header)}; quote fields that contain commas"
                )
            rows.append((line, [f.strip() for f in fields]))
    except csv.Error as e:
        raise UserError(f"{path} row {start} is not valid CSV ({e}); fix the quoting") from None
    if not rows:
        raise UserError(f"{path} has a header but no rows; add one row per image")
    return header, rows


def _field_delimiter(text: str) -> str:
    """"," unless the header is one cell holding ";" or a tab and no comma: the CSV that Excel saves
    in locales with a decimal comma, or a TSV. (The label delimiter inside a field is another matter.)"""
    first = text.lstrip("\n").split("\n", 1)[0]
    if "," not in first:
        for d in (";", "\t"):
            if d in first:
                return d
    return ","


def _check_distinct_columns(header: list[str], path: Path) -> None:
    """Two columns of one name: one would be read and the other silently dropped (or, one-hot, both
    written into one class)."""
    seen: dict[str, str] = {}
    for name in header:
        if name.lower() in seen and name:
            raise UserError(f'{path} has two columns named "{name}" (columns: {", ".join(header)}); '
                            "rename or delete one of them")
        seen[name.lower()] = name


def _check_label_names(rows: list[_Row], delimiter: str | None, path: Path) -> None:
    """Refuse label fields that were evidently written another way than the file's delimiter reads
    them: a Python list ("['car', 'dog']"), or space-separated labels in a file whose other rows
    separate them with ``delimiter`` (that row would become one class named "car dog")."""
    names = {n for r in rows for n in (*r.positives, *r.ignored)}
    for row in rows:
        for name in (*row.positives, *row.ignored):
            if name[:1] == "[" or name[-1:] == "]" or (len(name) > 1 and name[0] == name[-1] and name[0] in "'\""):
                raise UserError(f'{row.where}: label "{name}" looks like part of a list ([...] or quotes); write '
                                "the labels as plain names separated by spaces (or by one of , | ;)")
            words = name.split()
            if delimiter and len(words) > 1 and all(w in names for w in words):
                raise UserError(f'{row.where}: "{name}" reads as one label, since this file separates labels with '
                                f'"{delimiter}", but its words are labels too; separate the labels with '
                                f'"{delimiter}" in every row')


def _csv_columns(header: list[str], path: Path, *, need_labels: bool) -> _CsvColumns:
    """Find the special columns by their accepted names (case-insensitive)."""
    hint = f", or use {FORCE_HINT.replace('NAME', 'csv_onehot')} for one 0/1 column per class"
    return _CsvColumns(
        image=_find_column(header, IMAGE_COLUMNS, path),
        label=_find_column(header, LABEL_COLUMNS, path, hint=hint) if need_labels else None,
        split=_find_column(header, SPLIT_COLUMNS, path, required=False),
        ignore=_find_column(header, IGNORE_COLUMNS, path, required=False),
    )


def _find_column(header: list[str], names: Sequence[str], path: Path, *, required: bool = True,
                 hint: str = "") -> int | None:
    """Index of the first header cell equal (case-insensitively) to one of ``names``."""
    lower = [h.lower() for h in header]
    for name in names:
        if name in lower:
            return lower.index(name)
    if not required:
        return None
    if any(_is_image(h) for h in header):
        raise UserError(f'{path} starts with a row of data ({", ".join(header)}), not a header; add a header row '
                        'such as "image,labels" above it')
    near = next(((c, n) for n in names if (c := closest(n, header)) is not None), None)
    fix = f'rename column "{near[0]}" to "{near[1]}"' if near else f'add a column named "{names[0]}"'
    raise UserError(
        f"{path} has no {names[0]} column (columns: {', '.join(header)}; accepted names: "
        f"{', '.join(names)}); {fix}{hint}"
    )


def _csv_split(fields: list[str], cols: _CsvColumns, where: str, header: list[str]) -> str | None:
    if cols.split is None:
        return None
    value = fields[cols.split]
    if header[cols.split].lower() == "is_valid":
        flag = value.strip().lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f'{where}: is_valid is "{value}"; write True (a val image) or False (a train image)')
        return "val" if flag in ("true", "1", "yes") else "train"
    return normalize_split(value, where)


def _onehot_value(value: str, column: str, where: str) -> bool:
    """True for 1, False for 0; anything else names the column, row and value."""
    if value in ("1", "1.0"):
        return True
    if value in ("0", "0.0"):
        return False
    raise UserError(
        f'{where}: column "{column}" has value "{value}" but a one-hot CSV needs 0 or 1 in every '
        f"class column; fix the value, or name the labels column \"labels\" for a "
        "delimited-labels CSV"
    )


def normalize_split(value: str, where: str) -> str:
    """``train``/``val``/``test`` for a split value (``valid``/``validation`` mean val), else a UserError."""
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        near = closest(value.strip().lower(), SPLIT_ALIASES)
        suggestion = f' (did you mean "{near}"?)' if near else ""
        raise UserError(
            f'{where}: split "{value}" is not train, val or test{suggestion}; fix the value '
            "(valid and validation also mean val)"
        )
    return split


# ---------------------------------------------------------------------------------------------
# Folder per class
# ---------------------------------------------------------------------------------------------

def read_folder(path: str | Path, *, image_root: str | None = None, classes: list[str] | None = None,
                on_missing: str = "error") -> LabelTable:
    """``root/<class>/**/*.jpg`` (single-label), or the same under ``root/<split>/``.

    Split folders (train, val/valid/validation, test) are recognised when they hold class
    folders rather than images, so a class that happens to be named "train" still works.
    The classes are those of all splits together (a split may lack one: noted in
    ``table.extra["notes"]``); at least two are needed. Hidden files and folders are skipped;
    symlinked folders are followed.
    """
    root = _data_dir(path, "folder")
    rows: list[_Row] = []
    have: dict[Path, set[str]] = {}          # split folder → the classes it has images of
    empty: list[Path] = []
    for split, top in _folder_layout(root):
        class_dirs = _subdirs(top)
        if not class_dirs:
            raise UserError(f"{top} has no class sub-folders; put each class's images in {top}/<class>/")
        have[top] = set()
        for class_dir in class_dirs:
            images = _list_images(class_dir)
            rows += [_Row(img, (class_dir.name,), (), split, img) for img in images]
            if images:
                have[top].add(class_dir.name)
            else:
                empty.append(class_dir)
    found = set().union(*have.values())
    for class_dir in empty:       # a class absent from one split (a rare class not in test) is fine
        if class_dir.name not in found:
            raise UserError(f"{class_dir} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), and no "
                            "other split has that class; add images or remove the folder")
    if len(found) == 1 and classes is None:
        raise _one_class_error(root, next(iter(found)))
    table = _build_table(rows, fmt="folder", path=root, bases=[], classes=classes,
                         on_missing=on_missing, multi_label=False)
    if len(have) > 1:              # split folders: say which lack a class, so empty per-class metrics are no surprise
        table.extra["notes"] = [f"{top.name}/ has no images of {', '.join(sorted(found - names))}"
                                for top, names in have.items() if found - names]
    return table


def _one_class_error(root: Path, name: str) -> UserError:
    """A single-label dataset of one class trains to a constant (loss 0, accuracy 1): refused, with the
    likely cause (--data one folder level too high) named."""
    inner = root / name
    nested = f"; if {inner} holds one folder per class, pass --data {inner}" if _subdirs(inner) else ""
    return UserError(f"{root} has one class folder ({inner.name}), and a single-label model needs at least two "
                     f"classes{nested}")


def _folder_layout(root: Path) -> list[tuple[str | None, Path]]:
    """(split, folder holding class folders) pairs: the split folders if any, else the root."""
    splits = _split_subdirs(root)
    if not splits or any(_has_direct_image(d) for d in splits.values()):
        return [(None, root)]
    others = [d.name for d in _subdirs(root) if d.name.lower() not in SPLIT_ALIASES]
    if others:
        raise UserError(
            f"{root} has split folders ({', '.join(d.name for d in splits.values())}) and other "
            f"folders ({', '.join(others)}); move every class folder under a split folder"
        )
    return list(splits.items())


def _looks_like_folder_dataset(root: Path) -> bool:
    """True when a sub-folder, or a sub-sub-folder (split/class), holds images."""
    for sub in _subdirs(root):
        if _has_direct_image(sub) or any(_has_direct_image(d) for d in _subdirs(sub)):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# COCO instances JSON
# ---------------------------------------------------------------------------------------------

def read_coco(path: str | Path, *, image_root: str | None = None, classes: list[str] | None = None,
              on_missing: str = "error") -> LabelTable:
    """A COCO instances JSON: a class is present when any annotation of it (crowd too) is on the image.

    Classes are the categories ordered by id; images without annotations have no positives.
    Images are looked for under image_root, the JSON's folder, ``images/`` beside it, and, for
    ``instances_<name>.json``, a ``<name>/`` folder beside the JSON or its parent (COCO layout).
    """
    path = _data_file(path, ".json")
    data = _load_json(path)
    images, annotations, categories = (_get(data, k, str(path), list) for k in ("images", "annotations", "categories"))
    cats = sorted(categories, key=lambda c: _get(c, "id", f"{path} categories", int))
    category_name = {}
    for c in cats:       # a repeated id would silently relabel every annotation of the first category
        name = _get(c, "name", f"{path} category id {c['id']}", str)
        if c["id"] in category_name:
            raise UserError(f'{path} has two categories with id {c["id"]} ("{category_name[c["id"]]}" and "{name}"); '
                            "give every category its own id")
        category_name[c["id"]] = name
    if len(set(category_name.values())) != len(category_name):
        raise UserError(f"{path} has two categories with the same name; give every category its own name")
    present: dict[int, set[str]] = defaultdict(set)
    for k, ann in enumerate(annotations):
        where = f"{path} annotations[{k}]"
        cat = _get(ann, "category_id", where, int)
        if cat not in category_name:
            raise UserError(
                f"{where} has category_id {cat}, which is not in categories; "
                "fix the annotation or add the category"
            )
        present[_get(ann, "image_id", where, (int, str))].add(category_name[cat])
    rows, seen = [], set()
    for k, img in enumerate(images):
        image_id = _get(img, "id", f"{path} images[{k}]", (int, str))
        where = f"{path} image id {image_id}"
        if image_id in seen:   # the id's annotations would silently go to only one of them
            raise UserError(f"{where} is used by more than one image (images[{k}] again); give every image its own id")
        seen.add(image_id)
        rows.append(_Row(_get(img, "file_name", where, str), sorted(present.pop(image_id, ())), (), None, where))
    if present:
        orphan = next(iter(present))
        twin = next((i for i in seen if str(i) == str(orphan)), None)
        kind = (f" ({type(orphan).__name__} {orphan!r} there, but {type(twin).__name__} {twin!r} in images: write "
                "both as numbers)") if twin is not None else ""
        raise UserError(
            f"{path} has annotations for image id {orphan!r}, which is not in images{kind}; "
            "fix the image_id or add the image"
        )
    stem = path.stem[len("instances_"):] if path.stem.startswith("instances_") else None
    coco_dirs = [path.parent / stem, path.parent.parent / stem] if stem else []
    return _build_table(
        rows, fmt="coco", path=path, bases=_bases(image_root, path.parent, path.parent / "images", *coco_dirs),
        classes=classes, on_missing=on_missing, class_order=list(category_name.values()),
    )


def _load_json(path: Path):
    text = _read_text(path, hint="export the COCO annotations again")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix or re-export the file"
        ) from None


def _get(obj, key: str, where: str, kind):
    """``obj[key]`` checked to be of ``kind``; a missing key or wrong type names the place."""
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(
            f'{where} has no "{key}" field, which a COCO instances file needs; '
            f"fix the file or force another format with {FORCE_HINT}"
        )
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = getattr(kind, "__name__", "a number or string")
        raise UserError(f'{where}: "{key}" is {repr(value)[:40]}, not {expected}; fix the file')
    return value


# ---------------------------------------------------------------------------------------------
# Pascal VOC XML
# ---------------------------------------------------------------------------------------------

def read_voc(path: str | Path, *, image_root: str | None = None, classes: list[str] | None = None,
             on_missing: str = "error") -> LabelTable:
    """Pascal VOC XML files: a folder of ``*.xml``, or a VOC root with ``Annotations/``.

    An object with ``<difficult>1</difficult>`` makes its class an ignore pair unless the image
    also has a non-difficult object of that class (then it is positive). The image named by
    ``<filename>`` (``.jpg`` added when it has no suffix) is looked for under image_root,
    ``JPEGImages/`` of the VOC root, and the XML folder. Classes are the sorted object names.
    ``ImageSets/Main/{train,val,test}.txt``, when present, give the split (each annotation must be
    in one of them).
    """
    root = _data_dir(path, "voc")
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    xml_files = _files_with_suffix(ann_dir, ".xml")
    if not xml_files:
        raise UserError(
            f"{ann_dir} contains no .xml files; "
            "point the data path at the VOC Annotations folder or its parent"
        )
    rows = [_voc_row(x) for x in xml_files]
    sets = _voc_image_sets(root)
    if sets is not None:
        rows = [r._replace(split=sets.get(Path(r.where).stem)) for r in rows]
        unlisted = [r for r in rows if r.split is None]
        if unlisted:
            raise UserError(f"{len(unlisted)} of {len(rows)} annotations (e.g. {unlisted[0].where}) are in none of "
                            f"{root / 'ImageSets' / 'Main'}'s train/val/test lists; add them to one, or move the "
                            "lists away to split automatically")
    return _build_table(
        rows, fmt="voc", path=ann_dir,
        bases=_bases(image_root, root / "JPEGImages", ann_dir, ann_dir.parent / "JPEGImages"),
        classes=classes, on_missing=on_missing,
    )


def _voc_image_sets(root: Path) -> dict[str, str] | None:
    """{image id: split} from a VOC root's ImageSets/Main/{train,val,test}.txt (the official split, as
    torchvision's VOCDetection reads it), or None without them. trainval.txt adds nothing to those."""
    folder = root / "ImageSets" / "Main"
    lists = {split: folder / f"{split}.txt" for split in SPLITS if (folder / f"{split}.txt").is_file()}
    if not lists:
        return None
    sets: dict[str, str] = {}
    for split, path in lists.items():
        for line in _read_text(path).split():
            if sets.setdefault(line, split) != split:
                raise UserError(f"image {line} is in both {sets[line]}.txt and {split}.txt of {folder}; "
                                "list every image in one split")
    return sets


def _voc_row(xml_path: Path) -> _Row:
    """One annotation file → its image, non-difficult classes and difficult-only classes."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise UserError(f"{xml_path} is not valid XML ({e}); fix or remove the file") from None
    root = tree.getroot()
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        raise UserError(f"{xml_path} has no <filename>; add the image's file name to it")
    if not Path(filename).suffix:          # some tools write the image id alone: VOC's images are .jpg
        filename += ".jpg"
    positives, difficult = set(), set()
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{xml_path} has an <object> without a <name>; add the class name or remove the object")
        is_difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        (difficult if is_difficult else positives).add(name)
    return _Row(filename, sorted(positives), sorted(difficult - positives), None, str(xml_path))


# ---------------------------------------------------------------------------------------------
# YOLO txt labels
# ---------------------------------------------------------------------------------------------

def read_yolo(path: str | Path, *, image_root: str | None = None, classes: list[str] | None = None,
              on_missing: str = "error") -> LabelTable:
    """A YOLO dataset: images/ + labels/ (each ``class_id cx cy w h`` per line) + class names.

    Layouts: ``images/``+``labels/``; ``images/<split>/``+``labels/<split>/``; or
    ``<split>/images/``+``<split>/labels/``. The label file of ``images/a/b.jpg`` is
    ``labels/a/b.txt``; no label file or an empty one means no positives. Class names come from
    ``data.yaml`` (``names:`` list or {id: name}), ``classes.txt``, or a ``names``/``*.names``
    file. ``path`` may also be the data.yaml file itself. A data.yaml's ``train:``/``val:``/``test:``
    folders, when it has them, decide the layout and the split (Ultralytics' convention).
    """
    path = _existing(path)
    if path.is_file() and path.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"{path} is not a folder or a data.yaml; point the data path at the YOLO dataset folder")
    names_file = path if path.is_file() else _yolo_names_file(path)
    root = path.parent if path.is_file() else path
    if names_file is None:
        raise UserError(
            f"{root} has no class names file; "
            "add data.yaml with a names: list, or classes.txt with one name per line"
        )
    names = _yolo_names(names_file)
    rows = []
    for split, image_dir, label_dir in _yolo_yaml_pairs(names_file) or _yolo_pairs(root):
        for image in _list_images(image_dir):
            label_file = label_dir / Path(os.path.relpath(image, image_dir)).with_suffix(".txt")
            positives = _yolo_classes(label_file, names, names_file)
            rows.append(_Row(image, positives, (), split, str(label_file) if label_file.exists() else image))
    if not rows:
        raise UserError(f"{root} has no images under its images/ folders; add images next to the labels")
    return _build_table(rows, fmt="yolo", path=root, bases=[], classes=classes,
                        on_missing=on_missing, class_order=names)


def _yolo_names_file(root: Path) -> Path | None:
    """The first class-names file of a YOLO root, by YOLO_NAME_FILES then ``*.names``."""
    for name in YOLO_NAME_FILES:
        if (root / name).is_file():
            return root / name
    dotnames = _files_with_suffix(root, ".names")
    return dotnames[0] if dotnames else None


def _yolo_names(names_file: Path) -> list[str]:
    """Class names by id from data.yaml (list or {id: name}) or a one-name-per-line file."""
    text = _read_text(names_file, hint="list the class names in it")
    if names_file.suffix.lower() not in (".yaml", ".yml"):
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = _names_from_yaml(text, names_file)
    if not names:
        raise UserError(f"{names_file} lists no class names; add one name per class")
    return names


def _names_from_yaml(text: str, names_file: Path) -> list[str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{names_file} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise UserError(
                f"{names_file}: names ids must be 0..{len(names) - 1} without gaps, got {sorted(names)}; "
                "renumber them"
            )
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list):
        raise UserError(f"{names_file} has no names: list or mapping; add names: [class0, class1, ...]")
    if isinstance(data.get("nc"), int) and data["nc"] != len(names):
        raise UserError(f"{names_file} says nc: {data['nc']} but lists {len(names)} names; make them agree")
    return [str(n) for n in names]


def _yolo_yaml_pairs(names_file: Path) -> list[tuple[str | None, Path, Path]] | None:
    """(split, images folder, labels folder) from an Ultralytics data.yaml's ``train:``/``val:``/``test:``
    folders (relative to its ``path:``, else to the file's folder; labels where the path says
    images/ → labels/, Ultralytics' rule), or None when it names none. A folder named by two splits
    (coco128's val is its train) counts once, for the first; val is then carved out of train."""
    if names_file.suffix.lower() not in (".yaml", ".yml"):
        return None
    data = yaml.safe_load(_read_text(names_file))
    if not isinstance(data, dict) or not any(isinstance(data.get(k), str) for k in ("train", "val", "test")):
        return None
    base = names_file.parent / str(data.get("path") or "")
    if not base.is_dir():      # Ultralytics reads a relative path: under its datasets folder; here, the yaml's
        base = names_file.parent
    pairs, used = [], set()
    for split in SPLITS:
        value = data.get(split)
        if not isinstance(value, str) or not value.strip():
            continue
        images = (base / value).resolve()
        if not images.is_dir():
            raise UserError(f"{names_file}: {split}: {value} is not a folder (looked for {images}); fix the path "
                            "(lists of image files are not read)")
        if images in used:
            continue
        used.add(images)
        parts = list(images.parts)
        at = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
        labels = Path(*parts[:at], "labels", *parts[at + 1:]) if at is not None else images.parent / "labels"
        if not labels.is_dir():
            raise UserError(f"{labels} is missing; put the label .txt files of {names_file.name}'s {split} images there")
        pairs.append((split, images, labels))
    return pairs or None


def _yolo_pairs(root: Path) -> list[tuple[str | None, Path, Path]]:
    """(split, images folder, labels folder) for each layout the module docstring lists."""
    if (root / "images").is_dir():
        image_top, label_top = root / "images", root / "labels"
        if not label_top.is_dir():
            raise UserError(f"{root} has images/ but no labels/ folder; put the YOLO .txt label files in {label_top}")
        splits = _split_subdirs(image_top)
        pairs = [(s, d, label_top / d.name) for s, d in splits.items()] if splits else [(None, image_top, label_top)]
    else:
        pairs = [(s, d / "images", d / "labels") for s, d in _split_subdirs(root).items() if (d / "images").is_dir()]
    if not pairs:
        raise UserError(
            f"{root} has no images/ folder; "
            "a YOLO dataset needs images/ and labels/ (or train/images and train/labels)"
        )
    for _, _, label_dir in pairs:
        if not label_dir.is_dir():
            raise UserError(f"{label_dir} is missing; put the label .txt files of that split there")
    return pairs


def _has_yolo_labels(root: Path) -> bool:
    return (root / "labels").is_dir() or any((d / "labels").is_dir() for d in _split_subdirs(root).values())


def _yolo_classes(label_file: Path, names: list[str], names_file: Path) -> list[str]:
    """Class names of the boxes in one label file; none when the file is absent or empty."""
    if not label_file.is_file():
        return []
    found = []
    for n, line in enumerate(_read_text(label_file).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            class_id = int(parts[0])
        except ValueError:
            raise UserError(
                f'{label_file} line {n} starts with "{parts[0]}", not a class id; '
                'write "class_id cx cy w h"'
            ) from None
        if not 0 <= class_id < len(names):
            raise UserError(
                f"{label_file} line {n}: class id {class_id} is outside the {len(names)} names in {names_file}; "
                "fix the label or add the name"
            )
        found.append(names[class_id])
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------
# Shared: rows → LabelTable
# ---------------------------------------------------------------------------------------------

def _build_table(rows: list[_Row], *, fmt: str, path: Path, bases: list[Path], classes: list[str] | None,
                 on_missing: str, class_order: list[str] | None = None, multi_label: bool = True,
                 extra: dict | None = None) -> LabelTable:
    """Resolve images, check uniqueness, encode labels: the part every format shares."""
    if not rows:
        raise UserError(f"{path} contains no images; add images or annotations")
    paths, rows, skipped = _resolve_images(rows, bases, on_missing)
    if not rows:
        raise UserError(
            f"{path}: none of its {len(skipped)} images exist (first tried: {skipped[0][0]}); "
            "fix the image paths, or set data.image_root=FOLDER to the folder they are relative to"
        )
    _check_unique(paths, rows)
    names = _class_names(rows, classes, class_order, path)
    targets, ignore = _encode(rows, names)
    return LabelTable(
        paths=paths, targets=targets, ignore=ignore, class_names=names, split=_row_splits(rows),
        multi_label=multi_label, source=f"{fmt} {path}",
        extra={"format": fmt, "skipped": skipped, **(extra or {})},
    )


def _bases(image_root: str | None, *folders: Path) -> list[Path]:
    """Folders to resolve relative image paths against, in order: image_root, then ``folders``."""
    bases = [Path(image_root).expanduser()] if image_root else []
    return list(dict.fromkeys(bases + list(folders)))


def _resolve_images(rows: list[_Row], bases: list[Path], on_missing: str
                    ) -> tuple[list[str], list[_Row], list[tuple[str, str]]]:
    """Absolute paths of the rows' images; missing ones raise, or are dropped when skipping."""
    paths, kept, missing = [], [], []
    for row in rows:
        if not row.image:
            raise UserError(f"{row.where} has an empty image path; fill it in or delete the row")
        found, tried = _resolve(row.image, bases)
        if found is None:
            missing.append((row, tried))
        else:
            paths.append(found)
            kept.append(row)
    if missing and on_missing == "error":
        row, tried = missing[0]
        others = len(missing) - 1
        more = f", and {others} more image{'s are' if others > 1 else ' is'} missing" if others else ""
        if not paths:       # none found: skipping would drop every row; the paths are relative to elsewhere
            way_out = ("relative paths are looked up beside the annotation file; set data.image_root=FOLDER "
                       "(image_root= in read_table) to the folder they are relative to, or fix the paths")
        else:
            way_out = ("fix the paths or move the images there, or drop such rows with --set "
                       'data.on_bad_image=skip (on_missing="skip" in read_table)')
        raise UserError(f"{row.where}: image file {row.image} not found (tried {', '.join(tried)}){more}; {way_out}")
    return paths, kept, [(tried[0], "file not found") for _, tried in missing]


def _resolve(image: str, bases: list[Path]) -> tuple[str | None, list[str]]:
    """The first existing file among ``image`` joined to each base (or as is, when absolute); a path
    written on Windows (images\\x.jpg) is also tried with / where / is the separator."""
    image = os.path.expanduser(image)
    spellings = [image] + ([image.replace("\\", "/")] if "\\" in image and os.sep == "/" else [])
    tried = []
    for spelling in spellings:
        tried += [spelling] if os.path.isabs(spelling) or not bases else [os.path.join(b, spelling) for b in bases]
    for candidate in tried:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate), tried
    return None, [os.path.abspath(t) for t in tried]


def _check_unique(paths: list[str], rows: list[_Row]) -> None:
    """Raise on two rows for one image: merging their labels is the user's call, not ours."""
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        j = first.setdefault(p, i)
        if j != i:
            both = _two_places(rows[j].where, rows[i].where)
            raise UserError(f"{both} both list image {p}; merge them into one row")


def _two_places(a: str, b: str) -> str:
    """"f.csv rows 2 and 4" for two rows of one file, else "a and b"."""
    file_a, _, row_a = a.rpartition(" row ")
    file_b, _, row_b = b.rpartition(" row ")
    return f"{file_a} rows {row_a} and {row_b}" if file_a and file_a == file_b else f"{a} and {b}"


def _class_names(rows: list[_Row], classes: list[str] | None, class_order: list[str] | None,
                 path: Path) -> list[str]:
    """The given classes (every label must be one), else the format's order, else sorted names."""
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise UserError(f"the class list given for {path} repeats a name; list each class once")
        known = set(classes)
        unknown = [(row, name) for row in rows for name in (*row.positives, *row.ignored) if name not in known]
        if unknown:
            row, name = unknown[0]
            others = sorted({n for _, n in unknown} - {name})
            also = (f"; {len(unknown)} labels of the data are unknown"
                    + (f", of {', '.join(others[:5])}{', ...' if len(others) > 5 else ''} too" if others else "")
                    if len(unknown) > 1 else "")
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise UserError(
                f'{row.where}: label "{name}" is not one of the {len(classes)} classes ({shown})'
                f'{did_you_mean(name, classes) if closest(name, classes) else ""}{also}; a trained model '
                "knows only its classes, so relabel or remove such rows"
            )
        return classes
    if class_order is not None:
        for row in rows:
            for name in row.ignored:
                if name not in class_order:
                    raise UserError(f'{row.where}: difficult label "{name}" is not a class'
                                    f'{did_you_mean(name, class_order)}; fix it or add a "{name}" class')
        return list(class_order)
    names = sorted({n for row in rows for n in (*row.positives, *row.ignored)})
    if not names:
        raise UserError(f"{path} has no labels at all; add labels to its rows")
    return names


def _encode(rows: list[_Row], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float32 targets and (N, C) bool ignore mask; a positive overrides an ignore."""
    index = {n: j for j, n in enumerate(names)}
    targets = np.zeros((len(rows), len(names)), dtype=np.float32)
    ignore = np.zeros((len(rows), len(names)), dtype=bool)
    for i, row in enumerate(rows):
        targets[i, [index[n] for n in row.positives]] = 1.0
        ignore[i, [index[n] for n in row.ignored]] = True
    ignore &= targets == 0  # VOC rule: a non-difficult object of the class makes it positive
    return targets, ignore


def _row_splits(rows: list[_Row]) -> list[str] | None:
    splits = [r.split for r in rows]
    return None if splits[0] is None else splits  # readers give a split to all rows or none


# ---------------------------------------------------------------------------------------------
# Shared: file system
# ---------------------------------------------------------------------------------------------

def _existing(path: str | Path) -> Path:
    """Absolute ``path``, or a UserError when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{os.path.abspath(p)} does not exist; check the data path (--data or data.path)")
    return Path(os.path.abspath(p))


def _data_file(path: str | Path, suffix: str, preferred: str | None = None) -> Path:
    """``path`` itself when a file, else the one ``*suffix`` file inside the folder."""
    path = _existing(path)
    if path.is_file():
        return path
    found = _find_data_file(path, suffix, preferred)
    if found is None:
        raise UserError(f"{path} contains no {suffix} file; point the data path at the {suffix} file")
    return found


def _data_dir(path: str | Path, fmt: str) -> Path:
    path = _existing(path)
    if not path.is_dir():
        raise UserError(f"{path} is a file but the {fmt} format reads a folder; point the data path at the folder")
    return path


def _find_data_file(folder: Path, suffix: str, preferred: str | None = None) -> Path | None:
    """``preferred`` if present, else the only ``*suffix`` file; several is an error, none is None."""
    if preferred and (folder / preferred).is_file():
        return folder / preferred
    files = _files_with_suffix(folder, suffix)
    if len(files) > 1:
        raise UserError(
            f"{folder} contains several {suffix} files ({', '.join(f.name for f in files[:5])}); "
            "point the data path at the one that holds the labels"
        )
    return files[0] if files else None


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # macOS zip debris is never data


def _files_with_suffix(folder: Path, suffix: str) -> list[Path]:
    """Sorted non-hidden files directly in ``folder`` whose name ends in ``suffix`` (any case)."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it
                      if not _is_hidden(e.name) and e.name.lower().endswith(suffix) and e.is_file())


def _subdirs(folder: Path) -> list[Path]:
    """Sorted non-hidden sub-folders."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if not _is_hidden(e.name) and e.is_dir())


def _split_subdirs(folder: Path) -> dict[str, Path]:
    """{split: sub-folder} for sub-folders named train/val/valid/validation/test, in SPLITS order."""
    found: dict[str, Path] = {}
    for sub in _subdirs(folder):
        split = SPLIT_ALIASES.get(sub.name.lower())
        if split is None:
            continue
        if split in found:
            raise UserError(
                f"{folder} has both {found[split].name}/ and {sub.name}/ for the {split} split; "
                "merge them into one folder"
            )
        found[split] = sub
    return {s: found[s] for s in SPLITS if s in found}


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_direct_image(folder: Path) -> bool:
    """True at the first image file directly in ``folder`` (cheap even for huge folders)."""
    with os.scandir(folder) as it:
        return any(_is_image(e.name) and e.is_file() for e in it)


def _list_images(folder: Path) -> list[str]:
    """Absolute paths of the image files under ``folder`` (recursive, sorted, hidden skipped)."""
    found, walked = [], set()
    # Symlinked sub-folders are followed (as torchvision's ImageFolder does); each real folder once,
    # so a link back up the tree cannot loop.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in walked:
            dirnames[:] = []
            continue
        walked.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))  # prune hidden, fix order
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return found


def _read_text(path: Path, hint: str = "") -> str:
    """UTF-8 text of ``path``; unreadable, non-UTF-8 or (with a hint) empty files are UserErrors."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a BOM before the header
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if hint and not text.strip():
        raise UserError(f"{path} is empty; {hint}")
    return text


READERS: dict[str, Callable[..., LabelTable]] = {
    "csv": read_csv,
    "csv_onehot": read_csv_onehot,
    "folder": read_folder,
    "coco": read_coco,
    "voc": read_voc,
    "yolo": read_yolo,
}
