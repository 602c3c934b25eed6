"""The embedded demo dataset: multi-label mosaics of scikit-learn's bundled handwritten digits.

Each image is a 2×2 grid of 16×16 cells holding 2–4 digits (the other cells empty); its labels
are the digits present ("3 7 9"). The 1,797 digit samples are first split 60/20/20 into
disjoint pools, and train/val/test mosaics are drawn only from their own pool, so no digit
sample seen in training appears in a test image. Written as PNGs plus a labels.csv with a
split column, so the demo exercises the same CSV reader and cache as user data.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CELL = 16            # pixels per grid cell; mosaics are 2·CELL = 32 px square
POOL_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
# Per-digit tints: colour makes the demo RGB like real data without changing what is learned.
TINTS = np.array([[1.0, 1.0, 1.0], [1.0, 0.6, 0.6], [0.6, 1.0, 0.6], [0.6, 0.6, 1.0], [1.0, 1.0, 0.5]])


def _digit_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_train = int(POOL_FRACTIONS["train"] * len(order))
    n_val = int(POOL_FRACTIONS["val"] * len(order))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    # images: (n, 8, 8) in 0..16 → 0..1
    return {k: (digits.images[idx] / 16.0, digits.target[idx]) for k, idx in parts.items()}


def _mosaic(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """One 32×32×3 uint8 mosaic and the sorted digits in it."""
    canvas = np.zeros((2 * CELL, 2 * CELL, 3), np.float32)
    count = rng.integers(2, 5)                                  # 2, 3 or 4 digits
    cells = rng.permutation(4)[:count]
    picks = rng.integers(0, len(labels), size=count)
    for cell, pick in zip(cells, picks):
        digit = np.kron(images[pick], np.ones((2, 2)))          # 8×8 → 16×16, blocky like the source
        tinted = digit[..., None] * TINTS[rng.integers(len(TINTS))]
        r, c = divmod(int(cell), 2)
        canvas[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = tinted
    noise = rng.normal(0, 0.03, canvas.shape)                   # mild sensor-like noise
    pixels = np.clip((canvas + noise) * 255, 0, 255).astype(np.uint8)
    return pixels, sorted({int(labels[p]) for p in picks})


def make_digit_mosaics(out_dir: str | Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the dataset under ``out_dir`` (images/*.png + labels.csv); returns the CSV path.

    Deterministic for a seed; an existing complete dataset is reused as is.
    """
    counts = counts or {"train": 2400, "val": 600, "test": 600}
    out = Path(out_dir)
    csv_path = out / "labels.csv"
    if csv_path.exists():
        return csv_path
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for split, (images, labels) in _digit_pools(seed).items():
        for i in range(counts[split]):
            pixels, present = _mosaic(images, labels, rng)
            name = f"images/{split}_{i:05d}.png"
            Image.fromarray(pixels).save(out / name)
            rows.append((name, " ".join(f"d{d}" for d in present), split))
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "split"])
        writer.writerows(rows)
    tmp.replace(csv_path)          # the CSV appears last, so a half-written dataset is never reused
    return csv_path
