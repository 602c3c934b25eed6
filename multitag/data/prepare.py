"""From a data path to ready-to-batch rows: read the table, fix the split, decode once into the cache.

Used by training, evaluation and calibration alike, so all three see the same images, the same
split and the same pixels.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitag.config import DataConfig
from multitag.data.cache import build_cache, default_cache_dir
from multitag.data.formats import read_table
from multitag.data.split import assign_split, read_split_csv, write_split_csv
from multitag.data.table import SPLITS, LabelTable
from multitag.errors import UserError, did_you_mean

SPLIT_FILE = "split.csv"


@dataclass
class PreparedData:
    table: LabelTable
    split: np.ndarray          # (N,) str: train / val / test ('' for rows without one)
    cache: object              # data/cache.py ImageCache: get_batch(indices) -> uint8 (B, 3, S, S)
    skipped: list              # (path, reason) for every image left out, so nothing is dropped silently

    def rows(self, name: str) -> np.ndarray:
        """Indices of usable rows (decoded fine) in split ``name``; 'all' for every usable row."""
        usable = np.asarray(self.cache.valid, dtype=bool)
        if name == "all":
            return np.flatnonzero(usable)
        check_split_name(name)
        return np.flatnonzero(usable & (self.split == name))

    @property
    def data_hash(self) -> str:
        return table_hash(self.table)


def table_hash(table: LabelTable) -> str:
    """Identity of a labelled dataset: its image list, classes, targets and ignore mask."""
    h = hashlib.sha256()
    h.update("\n".join(table.paths).encode())
    h.update("\n".join(table.class_names).encode())
    h.update(np.ascontiguousarray(table.targets).tobytes())
    h.update(np.ascontiguousarray(table.ignore).tobytes())
    return h.hexdigest()[:16]


SPLIT_NAMES = (*SPLITS, "all")


def check_split_name(name: str) -> None:
    """``name`` is train, val, test or all (every usable row), else one sentence with the closest."""
    if name not in SPLIT_NAMES:
        raise UserError(f'unknown split "{name}"{did_you_mean(name, SPLIT_NAMES)}; use one of train, val, test or all.')


def note_case_twins(class_names: list[str], log=print) -> None:
    """Says when labels differ only in case ("Dog", "dog"): they are separate classes, as written,
    which is seldom meant, but a silent merge could be wrong too (e.g. gene or product codes)."""
    groups: dict[str, list[str]] = {}
    for name in class_names:
        groups.setdefault(name.casefold(), []).append(name)
    twins = [" / ".join(g) for g in groups.values() if len(g) > 1]
    if twins:
        log(f"note: labels that differ only in case are separate classes: {'; '.join(twins)}; "
            "write them alike in the annotations to merge them")


def log_table_notes(table: LabelTable, log=print) -> None:
    """What the reader noticed (e.g. a split lacking a class) and labels that differ only in case."""
    note_case_twins(table.class_names, log)
    for note in table.extra.get("notes", []):
        log(f"note: {note}")


def require_data(cfg: DataConfig) -> None:
    """A UserError when no data path is set: checked before a run directory is named or written."""
    if not cfg.path:
        raise UserError("no data given; pass --data PATH (a CSV, COCO JSON, VOC/YOLO folder or a folder per class).")


def load_table(cfg: DataConfig, classes: list[str] | None = None) -> LabelTable:
    require_data(cfg)
    return read_table(cfg.path, cfg.format, classes=classes, on_missing=cfg.on_bad_image,
                      image_root=cfg.image_root or None)


def resolve_split(table: LabelTable, run_dir: Path | None, seed: int, *, reuse: bool, log=print,
                  fractions: tuple = (0.7, 0.15, 0.15)) -> np.ndarray:
    """The split column.

    reuse=True (resume, eval, calibrate): the run's split.csv decides for the images it lists;
    other images (new data) keep the table's own split column, or none ('').
    reuse=False (a new run): assigned (see data/split.py) and written to the run's split.csv.
    """
    split_file = Path(run_dir) / SPLIT_FILE if run_dir else None
    if reuse:
        known = read_split_csv(split_file) if split_file is not None and split_file.exists() else {}
        own = table.split or [""] * len(table)
        return np.array([known.get(p, s) for p, s in zip(table.paths, own)], dtype=object)
    split = np.array(assign_split(table, tuple(fractions), seed=seed, log=log), dtype=object)
    if split_file is not None:
        write_split_csv(split_file, table, list(split))
    return split


def prepare(cfg: DataConfig, run_dir: Path | None = None, *, classes: list[str] | None = None,
            reuse_split: bool = False, split: list[str] | None = None, log=print) -> PreparedData:
    """``split`` given (the other ranks of a distributed run, from rank 0): used as is, no split.csv."""
    table = load_table(cfg, classes)
    if classes is None:
        log_table_notes(table, log)
    if split is not None and len(split) != len(table):
        raise UserError(f"{cfg.path} lists {len(table)} images on this machine but {len(split)} on rank 0; "
                        "every machine must see the same data (same files, same paths).")
    split = (np.array(split, dtype=object) if split is not None
             else resolve_split(table, run_dir, cfg.split_seed, reuse=reuse_split, log=log,
                           fractions=cfg.split_fractions))
    cache = build_cache(table.paths, cfg.image_size, cfg.cache_dir or default_cache_dir(),
                        on_bad_image=cfg.on_bad_image)
    skipped = list(table.extra.get("skipped", [])) + [(path, reason) for _, path, reason in cache.bad]
    return PreparedData(table, split, cache, skipped)
