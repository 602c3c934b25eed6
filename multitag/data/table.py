"""LabelTable: the one shape every data format is read into."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class LabelTable:
    """Images and their labels, whatever the on-disk format was.

    paths:       N absolute image paths (str), unique.
    targets:     (N, C) float32 in {0, 1}; 1 = class present.
    ignore:      (N, C) bool; True = pair is neither positive nor negative (e.g. VOC "difficult").
    class_names: C names, in the order of the target columns.
    split:       N strings in SPLITS, or None when the source had no split column.
    multi_label: False for single-label data (exactly one positive per row, e.g. folder per class).
    source:      a short description of where the table came from (format and path), for messages.
    """

    paths: list[str]
    targets: np.ndarray
    ignore: np.ndarray
    class_names: list[str]
    split: list[str] | None = None
    multi_label: bool = True
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.float32)
        self.ignore = np.asarray(self.ignore, dtype=bool)
        n, c = len(self.paths), len(self.class_names)
        assert self.targets.shape == (n, c), (self.targets.shape, (n, c))
        assert self.ignore.shape == (n, c), (self.ignore.shape, (n, c))
        assert self.split is None or len(self.split) == n

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index) -> "LabelTable":
        """Rows selected by an integer index array or boolean mask, same classes."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return LabelTable(
            paths=[self.paths[i] for i in index],
            targets=self.targets[index],
            ignore=self.ignore[index],
            class_names=list(self.class_names),
            split=None if self.split is None else [self.split[i] for i in index],
            multi_label=self.multi_label,
            source=self.source,
            extra=dict(self.extra),
        )

    def positives(self, rows=None) -> np.ndarray:
        """(M, C) bool: class present and not ignored, in ``rows`` (default all): what training counts."""
        rows = slice(None) if rows is None else rows
        return (self.targets[rows] > 0.5) & ~self.ignore[rows]

    def labels_of(self, i: int) -> list[str]:
        """Class names present in row i."""
        return [self.class_names[j] for j in np.flatnonzero(self.targets[i] > 0.5)]


def positives_by_split(positive: np.ndarray, split: np.ndarray) -> dict[str, np.ndarray]:
    """{split: (C,) images with each class} for the splits in ``split`` (in order of appearance, '' as
    "no split"), from the (M, C) bool positives of the same M rows."""
    return {str(s or "no split"): positive[split == s].sum(0) for s in dict.fromkeys(split.tolist())}
