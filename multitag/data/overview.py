"""What multitag makes of a dataset before training on it: ``multitag data PATH`` / ``multitag.inspect_data``.

The table and the split are those train would use: the same reader and notes (prepare.load_table,
with missing files left out so that every one of them can be listed, as data.on_bad_image=skip
does) and the same split (prepare.resolve_split: the data's own, else the stratified one of
data.split_seed and data.split_fractions). Then every image file is read once: its header checked
as the decoder checks it before decoding (decode.read_checked, no pixel decoded: a file cut short
after its header is found only by train's decode) and its bytes hashed to find exact duplicates.
Nothing is cached or written.

Counts are of the readable images, the rows train's cache keeps; positives are present and not
ignored (``LabelTable.positives``), as the loss, oversampling, calibration and metrics count them.
"""
from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from multitag.config import DataConfig
from multitag.data.cache import common_folder, decode_workers
from multitag.data.decode import BadImageError, ImageTooLargeError, read_checked
from multitag.data.prepare import load_table, log_table_notes, resolve_split
from multitag.data.table import SPLITS, LabelTable, positives_by_split
from multitag.errors import counted
from multitag.progress import track

SHOWN = 10      # entries of one kind of problem listed on screen; the dict (--json) holds them all
FILE_PROBLEMS = {"missing": "missing file", "unreadable": "unreadable file", "too_large": "image over the pixel limit"}


def survey(cfg: DataConfig, log=print) -> dict:
    """The JSON-ready overview of ``cfg.path`` (see the module docstring); ``log`` gets the progress line."""
    table = load_table(dataclasses.replace(cfg, on_bad_image="skip"))     # every missing file, not only the first
    notes: list[str] = []
    log_table_notes(table, lambda line: notes.append(line.removeprefix("note: ")))
    split = resolve_split(table, None, cfg.split_seed, reuse=False, log=notes.append, fractions=cfg.split_fractions)
    log(f"reading the headers of {len(table)} images")
    checks = check_files(table.paths)
    readable = np.array([kind == "" for kind, _, _ in checks], dtype=bool)          # (N,)
    sizes = {s: int(np.count_nonzero(readable & (split == s))) for s in SPLITS}
    positive = table.positives()                                                      # (N, C)
    per_split = positives_by_split(positive[readable], split[readable])
    problems = {"missing": [{"path": p, "reason": r} for p, r in table.extra.get("skipped", [])]}
    for kind in ("unreadable", "too_large"):
        problems[kind] = [{"path": p, "reason": r} for p, (k, r, _) in zip(table.paths, checks) if k == kind]
    problems["duplicates"] = duplicate_groups(table, split, [digest for _, _, digest in checks])
    histogram = np.bincount(positive[readable].sum(1), minlength=1)
    result = {
        "path": str(Path(cfg.path).resolve()), "format": table.extra.get("format", ""), "source": table.source,
        "image_folder": common_folder(table.paths),
        "images": {"listed": len(table) + len(problems["missing"]), "readable": int(readable.sum()),
                   "missing": len(problems["missing"]),
                   "unreadable": len(problems["unreadable"]) + len(problems["too_large"])},
        "num_classes": table.num_classes, "multi_label": table.multi_label,
        "split": {"from": "data" if table.split is not None else "stratified", "seed": cfg.split_seed,
                  "fractions": list(cfg.split_fractions), **sizes},
        "per_class": per_class_rows(table, readable, per_split, sizes),
        "labels_per_image": histogram.tolist(),
        "examples": example_images(table, positive, readable, split),
        "unlabelled": int(histogram[0]) if table.multi_label else 0,
        "problems": problems,
        "problem_count": sum(len(v) for v in problems.values()),
        "on_bad_image": cfg.on_bad_image,
        "notes": notes,
    }
    result["warnings"] = warnings_of(result)
    return result


def check_file(path: str) -> tuple[str, str, str]:
    """(kind, reason, digest) of one image: kind "" when its header reads, else "unreadable" or "too_large"
    with the decoder's reason (the one train reports); digest hashes the bytes ("" when unreadable)."""
    try:
        data, _ = read_checked(path)
    except ImageTooLargeError as e:
        return "too_large", e.reason, ""
    except BadImageError as e:
        return "unreadable", e.reason, ""
    return "", "", hashlib.blake2b(data, digest_size=16).hexdigest()


def check_files(paths: list[str]) -> list[tuple[str, str, str]]:
    """check_file of every path, in order, with a progress bar (reading and hashing release the GIL), on
    as many threads as the cache decodes with."""
    with ThreadPoolExecutor(decode_workers()) as pool:
        return list(track(pool.map(check_file, paths), len(paths), "reading image headers"))


def per_class_rows(table: LabelTable, readable: np.ndarray, per_split: dict[str, np.ndarray],
                   sizes: dict[str, int]) -> list[dict]:
    """One dict per class: positives per split and in all, ignored pairs, share of the images, flags
    ("no val": a split that has images but none with the class)."""
    zeros = np.zeros(table.num_classes, dtype=int)
    counts = {s: per_split.get(s, zeros) for s in SPLITS}
    total = sum(counts.values())
    ignored = table.ignore[readable].sum(0)
    n = max(int(readable.sum()), 1)
    return [{"name": name, **{s: int(counts[s][c]) for s in SPLITS}, "all": int(total[c]),
             "ignored": int(ignored[c]), "share": float(total[c] / n),
             "flags": [f"no {s}" for s in SPLITS if sizes[s] and not counts[s][c]]}
            for c, name in enumerate(table.class_names)]


def example_images(table: LabelTable, positive: np.ndarray, readable: np.ndarray, split: np.ndarray) -> dict[str, str]:
    """{class: a readable image with it}: what a class name means in this data, at a glance (``--plot``'s
    examples.png). From the train split where it has one, and of those the first with the fewest labels
    (a cat alone rather than the cat of a living-room scene). Classes without an image are left out."""
    found, counts = {}, positive.sum(1)
    for c, name in enumerate(table.class_names):
        rows = np.flatnonzero(readable & positive[:, c])
        if len(rows):
            train = rows[split[rows] == "train"]
            rows = train if len(train) else rows
            found[name] = table.paths[int(rows[np.argmin(counts[rows])])]     # argmin: the first of the fewest
    return found


def duplicate_groups(table: LabelTable, split: np.ndarray, digests: list[str]) -> list[dict]:
    """Readable images with the same bytes, groups spanning splits (leakage) first: their paths, splits,
    and whether their labels agree."""
    groups: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        if digest:
            groups.setdefault(digest, []).append(i)
    found = []
    for rows in (r for r in groups.values() if len(r) > 1):
        same = all(np.array_equal(table.targets[i], table.targets[rows[0]]) and
                   np.array_equal(table.ignore[i], table.ignore[rows[0]]) for i in rows)
        found.append({"paths": [table.paths[i] for i in rows], "splits": [str(split[i]) for i in rows],
                      "same_labels": same, "across_splits": len({split[i] for i in rows}) > 1})
    return sorted(found, key=lambda g: not g["across_splits"])


def warnings_of(result: dict) -> list[str]:
    """Sentences on what training and evaluation will make of the flagged classes and unlabelled images."""
    multi = result["multi_label"]
    flagged = {s: [r["name"] for r in result["per_class"] if f"no {s}" in r["flags"]] for s in SPLITS}
    consequence = {
        "train": "the model has no example to learn {them} from",
        "val": ("calibration has nothing to fit: train leaves {their} threshold at 0.5 and `multitag calibrate` "
                "keeps the one fitted before (calibration.py fits a class with at least 1 val positive), and "
                "the val mAP that picks the best epoch leaves {them} out" if multi else
                "the val accuracy that picks the best epoch never sees {them} ({their} val per-class accuracy "
                "is undefined)"),
        "test": ("{their} test AP is undefined (NaN) and the test mAP is the mean over the other classes "
                 "(metrics.py)" if multi else "{their} test per-class accuracy is undefined (NaN)"),
    }
    what = "positives" if multi else "images"
    lines = []
    for s in SPLITS:
        names = flagged[s]
        if names:
            one = len(names) == 1
            text = consequence[s].format(them="it" if one else "them", their="its" if one else "their")
            lines.append(f"no {s} {what} of {_names(names)}: {text}")
    sizes = result["split"]
    refused = "train stops with \"no usable {} images after the split\""      # engine.setup_job / check_no_val
    if not sizes["train"]:
        lines.append("no readable train images: " + refused.format("train"))
    if not sizes["val"] and sizes["fractions"][1] > 0:       # the split gave val rows, none readable
        lines.append("no readable val images: " + refused.format("val"))
    elif not sizes["val"]:                                   # data.split_fractions val 0: a final fit on all
        lines.append("no val split: train keeps the last epoch" + (" and thresholds stay at 0.5" if multi else ""))
    if not sizes["test"]:
        lines.append("no test split: the report is on the val split, and `multitag eval` needs --split val")
    if result["unlabelled"]:
        n = result["unlabelled"]
        lines.append(f"{n} image{' has' if n == 1 else 's have'} no label: train keeps "
                     f"{'it' if n == 1 else 'them'} as a negative of every class (all-zero targets)")
    return lines


def _names(names: list[str], shown: int = SHOWN) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# --- on screen -----------------------------------------------------------------------------------

def print_survey(result: dict, console=None) -> None:
    """The overview for people: summary lines, the per-class table, warnings, then the capped problem lists."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    say = lambda text="": console.print(escape(text), soft_wrap=True)     # noqa: E731  paths may hold [brackets]
    images, sp = result["images"], result["split"]
    say(f"{result['source']}: format {result['format']}, images under {result['image_folder']}")
    lost = [f"{images[k]} {k}" for k in ("missing", "unreadable") if images[k]]
    say(f"images: {images['listed']} listed, {images['readable']} readable" + (f" ({', '.join(lost)})" if lost else ""))
    say(f"classes: {result['num_classes']}, {'multi' if result['multi_label'] else 'single'}-label")
    how = ("the data's own" if sp["from"] == "data" else
           f"stratified {'/'.join(f'{f:g}' for f in sp['fractions'])}, data.split_seed={sp['seed']}")
    say(f"split ({how}): " + ", ".join(f"{s} {sp[s]}" for s in SPLITS) + " readable images")
    console.print(class_table(result))
    hist = result["labels_per_image"]
    if result["multi_label"]:
        say("labels per image: " + ", ".join(f"{counted(v, 'image')} with {k}" for k, v in enumerate(hist) if v))
    for line in result["warnings"]:
        say(f"warning: {line}")
    for line in result["notes"]:
        say(f"note: {line}")
    for line in problem_lines(result):
        say(line)


def class_table(result: dict):
    from rich.table import Table

    splits = [s for s in SPLITS if result["split"][s]]
    show_ignored = any(r["ignored"] for r in result["per_class"])
    table = Table(title="images per class (positives)", title_justify="left")
    table.add_column("class")
    for name in [*splits, "all", *(["ignored"] if show_ignored else []), "share"]:
        table.add_column(name, justify="right")
    table.add_column("flags")
    for r in result["per_class"]:
        table.add_row(r["name"], *[f"{r[s]:,}" for s in [*splits, "all"]],
                      *([f"{r['ignored']:,}"] if show_ignored else []), f"{100 * r['share']:.1f} %",
                      ", ".join(r["flags"]))
    return table


def problem_lines(result: dict) -> list[str]:
    """Each kind of problem with its first SHOWN entries, what train does with it, and the verdict."""
    problems, lines = result["problems"], []
    skip = result["on_bad_image"] == "skip"
    for kind, noun in FILE_PROBLEMS.items():
        found = problems[kind]
        if found:
            fate = "train leaves them out (data.on_bad_image=skip)" if skip else \
                "train stops at the first; --set data.on_bad_image=skip leaves them out"
            lines.append(f"{counted(len(found), noun)} ({fate}):")
            lines += [f"  {p['path']}: {p['reason']}" for p in found[:SHOWN]] + _more(found)
    groups = problems["duplicates"]
    if groups:
        across = sum(g["across_splits"] for g in groups)
        lines.append(f"{counted(len(groups), 'group')} of identical files (same bytes)"
                     + (f", {across} across splits: a val or test copy of an image from another split "
                        "inflates its scores (leakage)" if across else "")
                     + ":")
        for g in groups[:SHOWN]:
            labels = "" if g["same_labels"] else ", labelled differently"
            lines.append(f"  {' = '.join(g['paths'])} ({', '.join(g['splits'])}{labels})")
        lines += _more(groups)
    n = result["problem_count"]
    lines.append(f"{counted(n, 'problem')} found (exit status 1)" if n else "no problems found")
    return lines


def _more(items: list) -> list[str]:
    return [f"  ... and {len(items) - SHOWN} more (--json lists all)"] if len(items) > SHOWN else []


