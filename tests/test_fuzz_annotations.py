"""Annotation files from the wild: each is read correctly or refused with a one-line UserError naming
the file (and row or line where there is one); never another exception.

tests/test_formats.py has the formats' main paths and their common mistakes; this file adds the
encodings and quoting spreadsheets produce (BOM, CRLF, quotes), the remaining malformed COCO / VOC /
YOLO inputs (hostile XML and YAML included), and a hypothesis test feeding random and CSV-shaped
text to the reader. ``ANNOTATION_CASES`` and ``csv_outcome`` are also run by
benchmarks/reliability_report.py for docs/RELIABILITY.md.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitag.data.formats import read_table
from multitag.errors import UserError

IMAGES = ("a.jpg", "b.jpg", "my, photo.jpg")


class Case(NamedTuple):
    """Files to write (relative path -> text or bytes) and what ``read_table(entry)`` must give:
    ``labels`` ({image name: labels}) when it is read, else a UserError containing ``fragments``.
    ``entry`` is a file, or "." for the folder. ``known_bug`` marks a case that does not behave as
    it should yet, with the reason (the test then expects it to fail)."""

    name: str
    files: dict[str, str | bytes]
    entry: str
    labels: dict[str, set[str]] | None = None
    fragments: tuple[str, ...] = ()
    known_bug: str = ""


def _read(name: str, files: dict, labels: dict) -> Case:
    return Case(name, files, next(iter(files)), labels=labels)


def _refused(name: str, files: dict, *fragments: str, entry: str | None = None, known_bug: str = "") -> Case:
    """A case that must be refused; VOC and YOLO cases are read from the folder unless ``entry`` says otherwise."""
    first = next(iter(files))
    default = "." if first.startswith("Annotations/") or first == "data.yaml" else first
    return Case(name, files, entry or default, fragments=fragments, known_bug=known_bug)


def _coco(images=None, annotations=None, categories=None, **extra) -> str:
    data = {"images": images if images is not None else [{"id": 1, "file_name": "a.jpg"}],
            "annotations": annotations if annotations is not None else [{"image_id": 1, "category_id": 7}],
            "categories": categories if categories is not None else [{"id": 7, "name": "cat"}], **extra}
    return json.dumps(data)


def _voc(filename="a.jpg", objects="<object><name>cat</name></object>") -> str:
    return f"<annotation><filename>{filename}</filename>{objects}</annotation>"


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10))
                  + ']><annotation><filename>a.jpg</filename><object><name>&lol9;</name></object></annotation>')
EXTERNAL_ENTITY = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
                   "<annotation><filename>a.jpg</filename><object><name>&xxe;</name></object></annotation>")
YAML_PYTHON_TAG = "names: !!python/object/apply:os.system ['echo pwned']\n"

ANNOTATION_CASES: list[Case] = [
    # CSV as spreadsheets write it: read as meant
    _read("csv with a UTF-8 BOM", {"l.csv": "\ufeffimage,labels\na.jpg,cat dog\nb.jpg,dog\n"},
          {"a.jpg": {"cat", "dog"}, "b.jpg": {"dog"}}),
    _read("csv with CRLF line ends", {"l.csv": "image,labels\r\na.jpg,cat|dog\r\nb.jpg,\r\n"},
          {"a.jpg": {"cat", "dog"}, "b.jpg": set()}),
    _read("csv with BOM, CRLF and quotes together",
          {"l.csv": '\ufeff"image","labels"\r\n"my, photo.jpg","cat, dog"\r\n"a.jpg","dog"\r\n'},
          {"my, photo.jpg": {"cat", "dog"}, "a.jpg": {"dog"}}),
    _read("csv with a line break inside a quoted labels field", {"l.csv": 'image,labels\na.jpg,"cat\ndog"\n'},
          {"a.jpg": {"cat", "dog"}}),
    _read("csv with doubled quotes in a class name", {"l.csv": 'image,labels\na.jpg,"say ""cheese""|dog"\n'},
          {"a.jpg": {'say "cheese"', "dog"}}),
    _read("csv with empty labels on some rows", {"l.csv": "image,labels\na.jpg,\nb.jpg,cat\n"},
          {"a.jpg": set(), "b.jpg": {"cat"}}),
    _read("csv with trailing blank lines and spaces", {"l.csv": "image , labels \n a.jpg , cat \n\n\n"},
          {"a.jpg": {"cat"}}),
    # CSV mistakes: refused, naming the file and the row
    _refused("csv row with a missing column", {"l.csv": "image,labels,split\na.jpg,cat\n"},
             "l.csv row 2 has 2 fields but the header has 3"),
    _refused("csv with no labels at all", {"l.csv": "image,labels\na.jpg,\nb.jpg,\n"}, "l.csv has no labels at all"),
    _refused("csv with an unclosed quote", {"l.csv": 'image,labels\na.jpg,"cat\nb.jpg,dog\n'}, "l.csv row 2"),
    _refused("csv header cell with a quoted line break", {"l.csv": '"im\nage",labels\na.jpg,cat\n'},
             "l.csv has no image column"),
    _refused("csv in Latin-1, not UTF-8", {"l.csv": "image,labels\na.jpg,caf\xe9\n".encode("latin-1")},
             "l.csv is not UTF-8 text"),
    _refused("csv holding binary garbage", {"l.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, "l.csv"),
    _refused("csv with only a BOM", {"l.csv": "\ufeff"}, "l.csv is empty"),
    _refused("csv with a path to a missing image", {"l.csv": "image,labels\na.jpg,cat\nnope.jpg,dog\n"},
             "l.csv row 3: image file nope.jpg not found"),
    _refused("csv listing one image twice (BOM, CRLF)", {"l.csv": "\ufeffimage,labels\r\na.jpg,cat\r\n./a.jpg,dog\r\n"},
             "l.csv rows 2 and 3 both list image"),
    _refused("csv with an empty image path", {"l.csv": "image,labels\n,cat\n"}, "l.csv row 2 has an empty image path"),
    # COCO
    _refused("coco image missing on disk", {"c.json": _coco(images=[{"id": 1, "file_name": "gone.jpg"}])},
             "c.json image id 1: image file gone.jpg not found"),
    _refused("coco annotation for an unknown image id", {"c.json": _coco(annotations=[{"image_id": 9, "category_id": 7}])},
             "c.json has annotations for image id 9"),
    _refused("coco annotation with an unknown category id",
             {"c.json": _coco(annotations=[{"image_id": 1, "category_id": 3}])}, "c.json annotations[0] has category_id 3"),
    _refused("coco image id that is a list", {"c.json": _coco(images=[{"id": [1], "file_name": "a.jpg"}])},
             'c.json images[0]: "id" is [1]'),
    _refused("coco category id that is a string", {"c.json": _coco(categories=[{"id": "7", "name": "cat"}])},
             '"id" is \'7\', not int'),
    _refused("coco image id used twice", {"c.json": _coco(images=[{"id": 1, "file_name": "a.jpg"},
                                                              {"id": 1, "file_name": "b.jpg"}])}, "image id 1"),
    _refused("coco image without file_name", {"c.json": _coco(images=[{"id": 1}])}, 'c.json image id 1 has no "file_name"'),
    _refused("coco images that is not a list", {"c.json": _coco(images={"id": 1})}, 'c.json: "images" is'),
    _refused("coco top level that is a list", {"c.json": "[1, 2, 3]"}, 'c.json has no "images" field'),
    _refused("coco truncated json", {"c.json": _coco()[:-20]}, "c.json is not valid JSON (line 1"),
    _refused("coco empty file", {"c.json": ""}, "c.json is empty"),
    _refused("coco two categories with one name",
             {"c.json": _coco(categories=[{"id": 7, "name": "cat"}, {"id": 8, "name": "cat"}])},
             "c.json has two categories with the same name"),
    # Pascal VOC
    _refused("voc image missing on disk", {"Annotations/1.xml": _voc("gone.jpg")}, "1.xml: image file gone.jpg not found"),
    _refused("voc without <filename>", {"Annotations/1.xml": "<annotation><object><name>cat</name></object></annotation>"},
             "1.xml has no <filename>"),
    _refused("voc object without a name", {"Annotations/1.xml": _voc(objects="<object><difficult>0</difficult></object>")},
             "1.xml has an <object> without a <name>"),
    _refused("voc truncated xml", {"Annotations/1.xml": _voc()[:-10]}, "1.xml is not valid XML"),
    _refused("voc billion-laughs entity bomb", {"Annotations/1.xml": BILLION_LAUGHS}, "1.xml is not valid XML"),
    _refused("voc external entity (file read)", {"Annotations/1.xml": EXTERNAL_ENTITY}, "1.xml is not valid XML"),
    # YOLO
    _refused("yolo class id out of range", {"data.yaml": "names: [cat]\n", "labels/a.txt": "3 .5 .5 .1 .1\n",
                                            "images/a.jpg": b""}, "a.txt line 1: class id 3 is outside the 1 names"),
    _refused("yolo class id that is not a number", {"data.yaml": "names: [cat]\n", "labels/a.txt": "\n\ncat .5 .5 .1 .1\n",
                                                    "images/a.jpg": b""}, 'a.txt line 3 starts with "cat"'),
    _refused("yolo invalid data.yaml", {"data.yaml": "names: [cat\n", "labels/a.txt": "", "images/a.jpg": b""},
             "data.yaml is not valid YAML"),
    _refused("yolo data.yaml with a python tag (code execution)",
             {"data.yaml": YAML_PYTHON_TAG, "labels/a.txt": "", "images/a.jpg": b""}, "data.yaml is not valid YAML"),
    _refused("yolo names ids with a gap", {"data.yaml": "names: {0: cat, 2: dog}\n", "labels/a.txt": "",
                                           "images/a.jpg": b""}, "data.yaml: names ids must be 0..1 without gaps"),
    _refused("yolo nc disagreeing with names", {"data.yaml": "nc: 3\nnames: [cat]\n", "labels/a.txt": "",
                                                "images/a.jpg": b""}, "data.yaml says nc: 3 but lists 1 names"),
    _refused("yolo without labels folder", {"data.yaml": "names: [cat]\n", "images/a.jpg": b""},
             "has images/ but no labels/ folder", entry="data.yaml"),
]


def write_case(root: Path, files: dict[str, str | bytes]) -> None:
    """The case's files under ``root``, plus empty image files (readers only check that they exist)."""
    for name in IMAGES:
        (root / name).touch()
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")   # newline="": keep CRLF as written


def read_outcome(path: Path, *, echoed_breaks_ok: bool = False) -> tuple[str, object]:
    """("read", {image name: labels}) or ("refused", message); asserts a refusal names the file and is
    one line (``echoed_breaks_ok``: except for line breaks the input itself put inside a quoted cell,
    which messages echo: a known bug, see ANNOTATION_CASES)."""
    try:
        table = read_table(path)
    except UserError as e:
        message = str(e)
        assert echoed_breaks_ok or ("\n" not in message and "\r" not in message), message
        assert path.name in message or str(path.parent) in message, message
        return "refused", message
    return "read", {Path(p).name: set(table.labels_of(i)) for i, p in enumerate(table.paths)}


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.known_bug)] if c.known_bug else [])
    for c in ANNOTATION_CASES])
def test_every_case_has_its_defined_outcome(tmp_path, case: Case):
    assert case_outcome(tmp_path, case) == "as expected"


def case_outcome(root: Path, case: Case) -> str:
    """Write and read ``case`` under ``root``: "as expected", or what came instead."""
    write_case(root, case.files)
    kind, detail = read_outcome(root / case.entry)
    if case.labels is not None:
        return "as expected" if (kind, detail) == ("read", case.labels) else f"{kind}: {detail}"
    if kind == "refused" and all(f in detail for f in case.fragments):
        return "as expected"
    return f"{kind}: {detail}"


# --- hypothesis: random text, and text shaped like a CSV, into the CSV reader ----------------------

CELLS = st.sampled_from(["image", "labels", "label", "split", "difficult", "a.jpg", "b.jpg", "my, photo.jpg",
                         "missing.jpg", "cat", "dog", "cat dog", "cat|dog", "cat;dog", "cat,dog", "", " ", "train",
                         "val", "test", "trian", "1", "0", '"', '""', "\ufeff", "\x00", "\u00e9", "dining table"])
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])


HEADERS = st.sampled_from([["image", "labels"], ["image", "labels", "split"], ["filename", "tags", "difficult"],
                           ["image", "label"], ["image", "cat", "dog"]])


@st.composite
def csv_like(draw) -> str:
    """A header (usually a valid one), then rows of cells, sometimes quoted, joined by commas and
    mixed line ends: near-valid CSV, so the reader's later checks are reached too."""
    def cell(texts=CELLS) -> str:
        text = draw(texts)
        quote = '"' not in text and ("," in text or draw(st.booleans()))   # mostly well-formed
        return f'"{text}"' if quote else text

    def row(width: int) -> list[str]:
        first = cell(st.one_of(st.sampled_from(IMAGES), CELLS))
        return [first] + [cell() for _ in range(width - 1 + draw(st.sampled_from([0] * 8 + [-1, 1])))]

    header = draw(st.one_of(HEADERS, st.lists(st.builds(cell), min_size=1, max_size=4)))
    rows = [header] + [row(len(header)) for _ in range(draw(st.integers(1, 4)))]
    return "".join(",".join(r) + draw(LINE_ENDS) for r in rows)


_counter = itertools.count()


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=200), csv_like()))
def test_any_text_gives_a_table_or_a_one_line_error(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp(f"csv{next(_counter)}")
    write_case(folder, {"labels.csv": text})
    kind, detail = read_outcome(folder / "labels.csv", echoed_breaks_ok='"' in text)
    if kind == "read":
        assert detail and all(name in IMAGES for name in detail)


VALUES = st.one_of(st.integers(-1, 3), st.sampled_from(IMAGES + ("gone.jpg", "cat", "")), st.none(), st.booleans(),
                   st.floats(0, 3), st.lists(st.integers(0, 3), max_size=2), st.just({}))


def _records(keys: list[str]):
    """Lists of COCO-ish records: the right keys, some missing, with values of any JSON type."""
    return st.lists(st.dictionaries(st.sampled_from(keys), VALUES, max_size=len(keys)), max_size=4)


@st.composite
def coco_like(draw) -> str:
    data = {"images": draw(_records(["id", "file_name"])), "annotations": draw(_records(["image_id", "category_id"])),
            "categories": draw(_records(["id", "name"]))}
    for key in draw(st.sets(st.sampled_from(sorted(data)), max_size=1)):   # sometimes a section is not a list
        data[key] = draw(VALUES)
    return json.dumps(data)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=coco_like())
def test_any_coco_json_gives_a_table_or_a_one_line_error(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp(f"coco{next(_counter)}")
    write_case(folder, {"instances.json": text})
    read_outcome(folder / "instances.json")
