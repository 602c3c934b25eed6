"""Per-class decision thresholds that maximise F1: numpy in, thresholds out.

Thresholds are fitted on validation data only. Callers never fit on the test split: test
metrics computed with thresholds tuned on test are optimistic, which is one of the defects
of the reference systems this package fixes.

Rule, per class (``scores >= threshold`` is a positive prediction, as in ``metrics.binarize``):
    * Candidates are the distinct scores of the class's non-ignored samples; predicting
      positive at and above a candidate gives F1 = 2 TP / (TP + FP + P). The maximum over
      these is the exact maximum over all thresholds, found with one sort and cumulative sums.
    * Ties in F1 go to the highest candidate (the fewest predicted positives).
    * The threshold returned is the midpoint between the chosen score and the next lower
      distinct score, so that unseen samples falling in the gap are split evenly rather than
      all sent one way. With no lower score (or when the midpoint would round onto it) the
      chosen score itself is returned; it makes the same predictions on the fitting data.
    * A class with fewer than ``min_positives`` non-ignored positives (including none, or all
      ignored) is not fitted: it gets ``default``, and its fitted F1 is reported as NaN.
"""
from __future__ import annotations

import numpy as np

from .metrics import rank_by_class


def fit_thresholds_with_f1(scores, targets, ignore=None, *, default: float | np.ndarray = 0.5,
                           min_positives: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1-maximising thresholds and the F1 each reaches on this data.

    scores (N, C) float, targets (N, C) {0, 1}, ignore (N, C) bool or None.
    Returns ``(thresholds, best_f1)``, both (C,) float64; ``best_f1`` is NaN where the
    class fell back to ``default`` (a number, or (C,) values such as the thresholds fitted before).
    """
    if min_positives < 1:
        raise ValueError(f"min_positives must be >= 1, got {min_positives}")
    r = rank_by_class(scores, targets, ignore)
    num_classes, n = r.scores.shape
    thresholds = np.broadcast_to(np.asarray(default, dtype=np.float64), (num_classes,)).copy()
    best_f1 = np.full(num_classes, np.nan)
    fitted = r.num_pos >= min_positives                              # (C,)
    if n == 0 or not fitted.any():
        return thresholds, best_f1

    # (C, N); the denominator is >= 1 for fitted classes, and unfitted ones are discarded below
    f1 = 2.0 * r.tp / np.maximum(r.tp + r.fp + r.num_pos[:, None], 1)
    f1 = np.where(r.is_end, f1, -1.0)                               # only group ends are thresholds
    best = np.argmax(f1, axis=1)                                     # (C,) first = highest score on ties
    rows = np.arange(num_classes)
    chosen = r.scores[rows, best].astype(np.float64)
    # next lower distinct score: the one right after the group end (ignored pairs are -inf there)
    lower = np.full(num_classes, -np.inf)
    has_lower = best + 1 < n
    lower[has_lower] = r.scores[rows[has_lower], best[has_lower] + 1]
    # halves first: no overflow near the float maximum; inf/2 + -inf/2 = NaN only with infinite logits
    with np.errstate(invalid="ignore"):
        mid = chosen / 2 + lower / 2
    threshold = np.where(mid > lower, mid, chosen)                   # no finite gap: keep the score itself

    thresholds[fitted] = threshold[fitted]
    best_f1[fitted] = f1[rows, best][fitted]
    return thresholds, best_f1


def fit_thresholds(scores, targets, ignore=None, *, default: float | np.ndarray = 0.5,
                   min_positives: int = 1) -> np.ndarray:
    """(C,) float64 per-class thresholds maximising F1 on validation data (see the module docstring)."""
    return fit_thresholds_with_f1(scores, targets, ignore, default=default,
                                  min_positives=min_positives)[0]
