"""Report figures: one function per figure, numbers in, the saved PNG's path out.

Figures are drawn on matplotlib ``Figure`` objects (Agg canvas when saved), never through pyplot,
so nothing global (backend, current figure) changes and no window can open. Sizes grow with the
number of classes only as far as needed to print every class name.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

DPI = 90
THUMB = 192              # longest side of a thumbnail in a grid, in pixels
ROW_INCH = 0.2           # height per class in per-class charts: every name stays readable


def _save(fig: Figure, path, tight: bool = True) -> Path:
    """Write the figure as PNG (cropped to its contents unless tight=False: one drawing pass less); returns its path."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight" if tight else None)
    return Path(path)


def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices sorting values descending, NaN at the end (stable for ties)."""
    v = np.asarray(values, dtype=np.float64)
    return np.argsort(np.where(np.isnan(v), np.inf, -v), kind="stable")


# ----------------------------------------------------------------------------- learning curves

def stage_spans(history: Sequence[dict]) -> list[tuple[str, int, int]]:
    """(stage name, first epoch, last epoch) of each run of equal "stage" values; [] if unstaged."""
    spans: list[tuple[str, int, int]] = []
    for h in history:
        stage = h.get("stage")
        if stage is None:
            continue
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], h["epoch"])
        else:
            spans.append((stage, h["epoch"], h["epoch"]))
    return spans


def _mark_epochs(ax, spans, best_epoch: int | None) -> None:
    """Stage boundaries (dashed, with names; none for a single stage) and the best epoch (dotted) on one axis."""
    for i, (name, first, last) in enumerate(spans if len(spans) > 1 else []):
        if i > 0:
            ax.axvline(first - 0.5, color="0.4", linestyle="--", linewidth=1)
        ax.text((first + last) / 2, 0.98, str(name), transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="0.3")
    if best_epoch is not None and best_epoch > 0:
        ax.axvline(best_epoch, color="tab:green", linestyle=":", linewidth=1.5, label=f"best epoch {best_epoch}")


def learning_curves(history: Sequence[dict], out, best_epoch: int | None = None) -> Path:
    """Loss (train, val), the monitored val metric and the learning rate per epoch, one time axis.

    history: metrics.jsonl rows (epoch counted across stages; optional "stage" name per row).
    """
    epochs = np.array([h["epoch"] for h in history])
    metric = next((k for k in history[0] if k.startswith("val_") and k != "val_loss"), None)

    def series(key: str) -> np.ndarray:
        return np.array([h.get(key, np.nan) for h in history], dtype=np.float64)

    fig = Figure(figsize=(12, 3.2))
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, series("train_loss"), marker=".", label="train")
    ax_loss.plot(epochs, series("val_loss"), marker=".", label="val")
    ax_loss.set_title("loss")
    if metric:
        ax_metric.plot(epochs, series(metric), marker=".", color="tab:purple")
    ax_metric.set_title(metric or "val metric")
    lr = series("lr")
    ax_lr.plot(epochs, lr, marker=".", color="tab:orange")
    if np.nanmin(lr, initial=np.inf) > 0:
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")
    spans = stage_spans(history)
    for ax in (ax_loss, ax_metric, ax_lr):
        _mark_epochs(ax, spans, best_epoch)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def lr_curve(lrs: np.ndarray, losses: np.ndarray, smoothed: np.ndarray, suggested: float, out) -> Path:
    """The learning-rate range test: loss per step against the rate (log axis), the suggestion marked."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed")
    ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set_xscale("log")
    top = float(np.nanmax(smoothed[: max(1, len(smoothed) * 3 // 4)]))   # the blow-up at the end would flatten the rest
    ax.set_ylim(float(np.nanmin(losses)) * 0.95, max(top, float(smoothed[0])) * 1.15)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- per class

def per_class_bars(class_names: Sequence[str], values: dict[str, np.ndarray], out) -> Path:
    """Horizontal bars, one panel per quantity, classes sorted by the first quantity (best on top).

    values: name → (C,) array; integer arrays (counts) are labelled with their numbers, float
    arrays are fractions on a 0..1 axis. Every class gets a row, so rare ones stay visible.
    """
    names = list(class_names)
    c = len(names)
    order = descending_order(next(iter(values.values())))[::-1]      # barh draws bottom-up
    fig = Figure(figsize=(2.1 * len(values) + 1.5, ROW_INCH * c + 1.2))
    axes = np.atleast_1d(fig.subplots(1, len(values), sharey=True))
    y = np.arange(c)
    for ax, (key, v) in zip(axes, values.items()):
        v = np.asarray(v)[order]
        is_count = np.issubdtype(v.dtype, np.integer)
        ax.barh(y, np.nan_to_num(v.astype(np.float64)), color="tab:gray" if is_count else "tab:blue", height=0.7)
        ax.set_title(key, fontsize=9)
        if not is_count:
            ax.set_xlim(0, 1.08)
        if is_count or c <= 30:
            for yi, vi in zip(y, v):
                ax.text(0, yi, f" {vi:g}" if is_count else (" —" if np.isnan(vi) else f" {vi:.2f}"),
                        va="center", fontsize=6, color="black")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(y, [names[i] for i in order], fontsize=7)
    axes[0].set_ylim(-0.6, c - 0.4)
    fig.tight_layout()
    return _save(fig, out)


def pr_curves(class_names: Sequence[str], curves: Sequence[tuple[np.ndarray, np.ndarray]], aps: Sequence[float],
              marks: Sequence[tuple[float, float, float]], out, ncols: int = 5) -> Path:
    """Precision–recall curve per class as small multiples, the chosen threshold marked on each.

    curves: per class (recall, precision) arrays in ranking order (empty without positives);
    marks: per class (recall, precision, threshold) of the operating point.
    """
    c = len(class_names)
    ncols = min(ncols, c)
    nrows = math.ceil(c / ncols)
    fig = Figure(figsize=(2.3 * ncols, 2.0 * nrows))
    # Axes are not shared: matplotlib's shared-axis bookkeeping grows quadratically with the panels.
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    ticks = [0, 0.5, 1]
    for i, ax in enumerate(axes):
        if i >= c:
            ax.set_axis_off()
            continue
        recall, precision = curves[i]
        if len(recall):
            # "pre": precision p_k holds on (r_{k-1}, r_k], the rectangles whose area is AP
            ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", linewidth=1.2)
            r, p, thr = marks[i]
            ax.plot([r], [p], "o", color="tab:red", markersize=5)
            ax.annotate(f"thr {thr:.2f}", (r, p), textcoords="offset points", xytext=(-4, -10), ha="right",
                        fontsize=6, color="tab:red")
            title = f"{class_names[i]}  AP {aps[i]:.2f}"
        else:
            title = f"{class_names[i]}  (no positives)"
        ax.set_title(title, fontsize=7)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.05))
        ax.set_xticks(ticks, ticks if i + ncols >= c else [])           # numbers on the outer panels only
        ax.set_yticks(ticks, ticks if i % ncols == 0 else [])
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=6)
    # fixed spacing in inches: tight_layout measures every panel's text, seconds for 80 panels
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.5 / fig.get_figwidth(), right=0.98, bottom=0.6 / height, top=1 - 0.3 / height,
                        wspace=0.12, hspace=0.35)
    fig.supxlabel("recall", fontsize=8, y=0.05 / height, va="bottom")
    fig.supylabel("precision", fontsize=8, x=0.05 / fig.get_figwidth(), ha="left")
    return _save(fig, out, tight=False)


# ----------------------------------------------------------------------------- matrices, counts

def matrix_heatmap(matrix: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], out, *, title: str,
                   xlabel: str, ylabel: str, annotate: bool | None = None) -> Path:
    """A (R, K) matrix of fractions in [0, 1] as a heat map; NaN cells are grey.

    annotate: print each value in its cell (default: when the matrix is at most 15 × 15).
    """
    m = np.asarray(matrix, dtype=np.float64)
    r, k = m.shape
    annotate = max(r, k) <= 15 if annotate is None else annotate
    side = min(max(4.0, 0.28 * max(r, k) + 2.0), 24.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(np.arange(k), col_names, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(r), row_names, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if annotate:
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, out)


def label_counts(class_names: Sequence[str], counts_by_split: dict[str, np.ndarray], out) -> Path:
    """Positive labels per class, stacked by split, most frequent on top, totals printed."""
    names = list(class_names)
    total = sum(np.asarray(v) for v in counts_by_split.values())
    order = descending_order(total)[::-1]
    y = np.arange(len(names))
    fig = Figure(figsize=(7, ROW_INCH * len(names) + 1.2))
    ax = fig.subplots()
    left = np.zeros(len(names))
    for split, v in counts_by_split.items():
        v = np.asarray(v, dtype=np.float64)[order]
        ax.barh(y, v, left=left, height=0.7, label=split)
        left += v
    for yi, t in zip(y, total[order]):
        ax.text(left[yi], yi, f" {int(t)}", va="center", fontsize=6)
    ax.set_yticks(y, [names[i] for i in order], fontsize=7)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("images with the label")
    # Above the bars, not over them: inside, it hid the totals of the bottom classes when counts were even.
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), ncols=len(counts_by_split), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def labels_per_image(histogram: np.ndarray, out) -> Path:
    """Bar chart of how many images carry 0, 1, 2, ... labels."""
    h = np.asarray(histogram)
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.bar(np.arange(len(h)), h, color="tab:gray")
    for x, v in enumerate(h):
        ax.text(x, v, f"{int(v)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(h)))
    ax.set_xlabel("labels per image")
    ax.set_ylabel("images")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- image grids

def _thumbnail(image: np.ndarray, max_side: int = THUMB) -> np.ndarray:
    """(H, W, 3) uint8 → the same picture with its longest side at most max_side (aspect kept)."""
    im = Image.fromarray(image)
    im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(im)


def image_grid(items: Sequence[tuple[np.ndarray, str]], out, ncols: int = 4, title: str = "") -> Path:
    """Thumbnails with captions, row by row: galleries of errors, Grad-CAM rows.

    items: (H, W, 3) uint8 image and its caption (may hold a newline), any sizes and aspects.
    """
    nrows = max(1, math.ceil(len(items) / ncols))
    fig = Figure(figsize=(2.5 * ncols, 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (image, caption) in zip(axes, items):
        ax.imshow(_thumbnail(image), interpolation="bilinear")
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
