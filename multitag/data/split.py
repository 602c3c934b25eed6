"""Train/val/test assignment: the table's own split when it has one, else seeded stratification.

Rules (``assign_split``):
- The table has a split: it is used as is. When it has no "val" rows, val is carved out of the
  train rows by the same stratification as below, taking the fraction val / (train + val)
  (0.15 / 0.85 by default), so validation data never comes from the test rows. No test rows
  is fine (the run then reports on val only).
- No split: train/val/test by the fractions (70/15/15 by default): first test is held out of
  all rows, then val out of the rest. Multi-label tables use iterative stratification
  (Sechidis et al. 2011, ``iterstrat``), which keeps each label's share close in every part;
  single-label tables use scikit-learn's ``StratifiedShuffleSplit``, falling back to a plain
  shuffled split (with a note, never silently) when a class has fewer than 2 images or a part
  is smaller than the number of classes.
- Sizes are whole numbers fixed up front: train and a val of fraction > 0 get at least one row (two rows
  are enough), test at least one when there are three rows or more and its fraction is > 0.
- A val fraction of 0 makes no val split (train on everything; the engine then keeps the last
  epoch and leaves thresholds at 0.5). A table's own val rows are kept whatever the fractions.
- The same table and seed always give the same split.

``write_split_csv`` / ``read_split_csv`` keep a run's split as ``image,split`` rows.
"""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from multitag.data.formats import normalize_split
from multitag.data.table import SPLITS, LabelTable
from multitag.errors import UserError, counted
from multitag.fileio import atomic_write

Log = Callable[[str], None]


DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def assign_split(table: LabelTable, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                 seed: int = 0, log: Log | None = None) -> list[str]:
    """One of "train"/"val"/"test" per row of ``table`` (see the module docstring for the rules).

    log: receives one-line notes (val carved from train, stratification fallback). Without it,
    fallbacks are reported with ``warnings.warn`` and routine notes are dropped.
    """
    f_train, f_val, f_test = check_fractions(fractions)
    rng = np.random.RandomState(seed)
    if table.split is not None:
        if (np.asarray(table.split, dtype=object) == "val").any() and (f_train, f_val, f_test) != DEFAULT_FRACTIONS:
            _note(log, f"data.split_fractions is not used: {table.source} gives its own train/val/test split "
                       "(only a split without val rows takes its val share from it)")
        return _complete_given_split(table, f_val / (f_train + f_val), rng, log)
    n = len(table)
    if n < 2:       # missing files left out (data.on_bad_image=skip) are often why: said, or the fix is unclear
        skipped = table.extra.get("skipped", [])
        gone = f" ({counted(len(skipped), 'more listed file')} missing, e.g. {skipped[0][0]})" if skipped else ""
        raise UserError(f"{table.source} has {n} image(s){gone}; a train and a val split need at least 2")
    n_test = _part_size(n, f_test, minimum=1 if n >= 3 and f_test > 0 else 0, leave=2)
    n_val = _part_size(n - n_test, f_val / (f_train + f_val), minimum=1, leave=1) if f_val > 0 else 0
    split = np.full(n, "train", dtype=object)
    rest = np.arange(n)
    if n_test:
        test = _holdout(table, rest, n_test, rng, log)
        split[test] = "test"
        rest = np.setdiff1d(rest, test)
    if n_val:
        split[_holdout(table, rest, n_val, rng, log)] = "val"
    return split.tolist()


def check_fractions(fractions) -> tuple[float, float, float]:
    """(train, val, test) fractions that are ≥ 0, sum to 1, with train > 0 (val 0: no val split, see engine)."""
    try:
        f_train, f_val, f_test = (float(f) for f in fractions)
    except (TypeError, ValueError):
        raise UserError(f"data.split_fractions must be three numbers (train, val, test), got {fractions!r}") from None
    if f_train <= 0 or min(f_val, f_test) < 0 or abs(f_train + f_val + f_test - 1) > 1e-6:
        raise UserError(
            f"data.split_fractions {list(fractions)} must be train > 0, val >= 0, test >= 0 and sum to 1; "
            "e.g. --set data.split_fractions=[0.7,0.15,0.15]."
        )
    return f_train, f_val, f_test


def _part_size(n: int, fraction: float, minimum: int, leave: int) -> int:
    """round(n × fraction), at least ``minimum`` and leaving at least ``leave`` rows (when it can)."""
    return max(minimum, min(int(round(n * fraction)), n - leave))


def _complete_given_split(table: LabelTable, val_share: float, rng: np.random.RandomState,
                          log: Log | None) -> list[str]:
    """The table's split, with val carved out of train when it has no val rows."""
    split = np.array(table.split, dtype=object)
    bad = sorted(set(split.tolist()) - set(SPLITS))
    if bad:
        raise UserError(f"{table.source} has split values {bad}; use train, val or test")
    if (split == "val").any() or val_share == 0:      # its own val rows, or none asked for
        return split.tolist()
    train = np.flatnonzero(split == "train")
    if len(train) < 2:
        _note(log, f"{table.source} has no val rows and {len(train)} train rows, so no val split was made", warn=True)
        return split.tolist()
    n_val = _part_size(len(train), val_share, minimum=1, leave=1)
    split[_holdout(table, train, n_val, rng, log)] = "val"
    _note(log, f"{table.source} has no val rows: {n_val} of its {len(train)} train rows became val "
               f"(stratified, fraction {val_share:.3f})")
    return split.tolist()


def _holdout(table: LabelTable, rows: np.ndarray, size: int, rng: np.random.RandomState,
             log: Log | None) -> np.ndarray:
    """``size`` of ``rows`` (indices into table), chosen so each class keeps its share."""
    y = table.targets[rows] > 0.5
    if table.multi_label:
        picked = _iterative_pick(y, size, rng)
    else:
        picked = _single_label_pick(y.argmax(axis=1), size, rng, table.source, log)
    return rows[picked]


def _iterative_pick(y: np.ndarray, size: int, rng: np.random.RandomState) -> np.ndarray:
    """Positions of about ``size`` rows of the (n, C) bool matrix ``y`` by iterative stratification.

    iterstrat's function is called directly (not its ShuffleSplit wrapper) because the wrapper
    rejects label matrices sklearn does not call "multilabel" (a single class, all-zero rows).
    Iterative stratification only approximates the size, so the result is trimmed or padded
    to exactly ``size`` with rows chosen at random.
    """
    from iterstrat.ml_stratifiers import IterativeStratification  # heavy (sklearn); import when used

    n = len(y)
    order = rng.permutation(n)  # as iterstrat's own wrapper does: ties are broken by row order
    share = size / n
    folds = IterativeStratification(labels=y[order], r=np.array([1 - share, share]), random_state=rng)
    picked = order[folds == 1]
    others = order[folds != 1]
    if len(picked) > size:
        picked = picked[:size]  # order is already random, so a prefix is a random subset
    elif len(picked) < size:
        picked = np.concatenate([picked, others[: size - len(picked)]])
    return np.sort(picked)


def _single_label_pick(y: np.ndarray, size: int, rng: np.random.RandomState, source: str,
                       log: Log | None) -> np.ndarray:
    """Positions of ``size`` rows of class vector ``y``, stratified when sklearn can, else shuffled."""
    from sklearn.model_selection import StratifiedShuffleSplit  # heavy; import when used

    counts = np.bincount(y)
    present = int((counts > 0).sum())
    if counts[counts > 0].min() >= 2 and min(size, len(y) - size) >= present:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=size, random_state=rng)
        _, picked = next(splitter.split(np.zeros(len(y)), y))
        return np.sort(picked)
    reason = ("a class has only 1 image" if counts[counts > 0].min() < 2
              else f"a part of {min(size, len(y) - size)} rows cannot hold all {present} classes")
    _note(log, f"{source}: split is shuffled, not stratified, because {reason}", warn=True)
    return np.sort(rng.permutation(len(y))[:size])


def _note(log: Log | None, message: str, warn: bool = False) -> None:
    """Send a note to ``log``; without one, only fallbacks (warn=True) are shown, as warnings."""
    if log is not None:
        log(message)
    elif warn:
        warnings.warn(message, stacklevel=3)


def write_split_csv(path: str | Path, table: LabelTable, split: list[str]) -> None:
    """Write ``image,split`` rows (absolute image paths) atomically to ``path``."""
    if len(split) != len(table):
        raise ValueError(f"split has {len(split)} entries for {len(table)} images")
    bad = sorted(set(split) - set(SPLITS))
    if bad:
        raise ValueError(f"split values {bad} are not in {SPLITS}")
    rows = [["image", "split"]] + [[os.path.abspath(p), s] for p, s in zip(table.paths, split)]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    atomic_write(path, write)


def read_split_csv(path: str | Path) -> dict[str, str]:
    """{absolute image path: split} from a file written by ``write_split_csv``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; a run's split.csv is written by multitag train")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["image", "split"]:
            raise UserError(
                f"{path} must start with the header image,split, not {','.join(header) or 'nothing'}; "
                "rewrite it"
            )
        result: dict[str, str] = {}
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            where = f"{path} row {reader.line_num}"
            if len(fields) < 2:
                raise UserError(f"{where} has {len(fields)} field(s); write image,split")
            image = os.path.abspath(fields[0].strip())
            if image in result:
                raise UserError(f"{where} repeats image {image}; keep one row per image")
            result[image] = normalize_split(fields[1], where)
    return result
