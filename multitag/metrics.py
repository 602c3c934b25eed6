"""Classification metrics: numpy arrays in, plain Python numbers out (no torch, no files).

Shapes and names used throughout:
    scores     (N, C) float: probabilities or logits. Ranking metrics (AP, top-k) do not care
               which; threshold metrics compare ``scores >= threshold``, so thresholds must be
               in the same space as the scores.
    targets    (N, C) in {0, 1} (bool, int or float).
    ignore     (N, C) bool or None: True marks a pair that is neither positive nor negative
               (VOC "difficult"); it is left out of every count and every ranking.
    pred       (N, C) in {0, 1}: predictions, from ``binarize`` or ``top_k_predictions``.
    thresholds a float, or a (C,) array with one threshold per class.
    labels     (N,) int class indices (single-label).

Conventions:
    * Positive prediction means ``score >= threshold``.
    * 0/0 is 0 for precision, recall, F1 and Jaccard (scikit-learn's ``zero_division=0``):
      a class with no predicted positives has precision 0, one with no positives recall 0.
    * Macro (class) averages run over all C classes, sample averages over all N rows,
      whether or not a class or row has positives (as scikit-learn does with ``labels=range(C)``).
    * AP is NaN for a class with no (non-ignored) positives, and mAP is the mean over the
      classes with at least one positive; it is NaN only when no class has one. Per-class
      single-label accuracy is NaN for a class with no samples. Reports keep these NaNs
      (``json.dumps`` writes them as ``NaN``).
    * Ties: AP treats tied scores as one threshold (as scikit-learn does); top-k and argmax
      break ties towards the lower class index.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

TOP_K_MULTILABEL = 3  # the "top-3" convention of the multi-label literature (ML-GCN, ASL)
TOP_K_SINGLELABEL = 5


# ----------------------------------------------------------------------------- input checks

def _as_scores(scores, ndim: int = 2) -> np.ndarray:
    """Scores as a float array (float32 kept, other types as float64); NaN is an error."""
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if s.ndim != ndim:
        raise ValueError(f"scores must be {ndim}-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _as_binary(x, shape: tuple, what: str) -> np.ndarray:
    """A {0, 1} array of the given shape as bool."""
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {a.shape}")
    if a.dtype != bool:
        if ((a != 0) & (a != 1)).any():
            raise ValueError(f"{what} must contain only 0 and 1")
        a = a.astype(bool)
    return a


def _as_ignore(ignore, shape: tuple) -> np.ndarray | None:
    """The ignore mask as bool of the given shape, or None when there is nothing to ignore."""
    if ignore is None:
        return None
    m = np.asarray(ignore, dtype=bool)
    if m.shape != shape:
        raise ValueError(f"ignore must have shape {shape}, got {m.shape}")
    return m if m.any() else None


def _as_labels(labels, num_classes: int, n: int | None = None) -> np.ndarray:
    """Class indices as an (N,) int64 array in [0, num_classes); N must equal ``n`` when given."""
    y = np.asarray(labels)
    if y.ndim != 1 or (n is not None and len(y) != n):
        raise ValueError(f"labels must have shape ({n if n is not None else 'N'},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.array_equal(y, np.round(y)):
            raise ValueError("labels must be integer class indices")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y


# ----------------------------------------------------------------------------- small helpers

def _ratio(num, den) -> np.ndarray:
    """num / den elementwise, 0 where den == 0 (the zero_division=0 convention)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _harmonic(a, b) -> np.ndarray:
    """Harmonic mean 2ab / (a + b), 0 when both are 0."""
    return _ratio(2.0 * np.asarray(a) * np.asarray(b), np.asarray(a) + np.asarray(b))


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The given names, or "0", "1", ... when none are given."""
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]


def _nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    x = np.asarray(x, dtype=np.float64)
    keep = ~np.isnan(x)
    return float(x[keep].mean()) if keep.any() else float("nan")


# ----------------------------------------------------------------------------- ranking (AP)

class Ranking(NamedTuple):
    """Each class's samples sorted by descending score, with cumulative counts.

    Ignored pairs are moved to the bottom (score -inf) and count as neither positive nor
    negative. Within a group of equal scores the order is arbitrary: only the last position
    of each group (``is_end``) is a threshold, so results never depend on it.
    """

    scores: np.ndarray   # (C, N) sorted scores, descending; ignored pairs are -inf
    tp: np.ndarray       # (C, N) int, positives at or above each position
    fp: np.ndarray       # (C, N) int, negatives at or above each position
    is_end: np.ndarray   # (C, N) bool, True at the last position of each group of equal scores
    num_pos: np.ndarray  # (C,) int, non-ignored positives per class


def rank_by_class(scores, targets, ignore=None) -> Ranking:
    """Sort every class's scores once; AP and threshold fitting both read this.

    Works class-major ((C, N), contiguous rows) so each sort runs over contiguous memory.
    """
    s = _as_scores(scores)
    t = _as_binary(targets, s.shape, "targets")
    ign = _as_ignore(ignore, s.shape)
    key = s.T.copy()                                   # (C, N)
    label = t.T.astype(np.int8)                        # (C, N) 1 positive, 0 negative, -1 ignored
    if ign is not None:
        key[ign.T] = -np.inf                           # ignored pairs sink to the bottom ...
        label[ign.T] = -1                              # ... and count as neither
    order = np.argsort(key, axis=1)[:, ::-1]           # descending; tie order irrelevant
    key = np.take_along_axis(key, order, axis=1)
    label = np.take_along_axis(label, order, axis=1)
    # int32 halves the memory of the two largest arrays; N < 2**31 always holds here
    tp = np.cumsum(label == 1, axis=1, dtype=np.int32)
    fp = np.cumsum(label == 0, axis=1, dtype=np.int32)
    is_end = np.empty(key.shape, dtype=bool)
    is_end[:, :-1] = key[:, :-1] != key[:, 1:]
    is_end[:, -1:] = True
    return Ranking(key, tp, fp, is_end, (label == 1).sum(axis=1))


def _ap_from_ranking(r: Ranking) -> np.ndarray:
    """(C,) AP = sum over thresholds of (recall step) x (precision); NaN without positives.

    Only the group ends are thresholds, so work on them alone, flattened class after class.
    """
    n_ends = r.is_end.sum(axis=1)                                   # (C,) thresholds per class
    row = np.repeat(np.arange(len(n_ends)), n_ends)                 # (E,) class of each threshold
    tp, fp = r.tp[r.is_end], r.fp[r.is_end]                         # (E,) in ranking order per class
    new_pos = np.diff(tp, prepend=0)                                # positives gained per threshold
    # a class's first threshold gains from 0, not from the previous class's last count
    first = (np.cumsum(n_ends) - n_ends)[n_ends > 0]
    new_pos[first] = tp[first]
    precision = tp / np.maximum(tp + fp, 1)                         # 0/0 only where nothing was gained
    total = np.bincount(row, weights=new_pos * precision, minlength=len(n_ends))
    ap = np.full(len(n_ends), np.nan)
    has_pos = r.num_pos > 0
    ap[has_pos] = total[has_pos] / r.num_pos[has_pos]
    return ap


def per_class_ap(scores, targets, ignore=None) -> np.ndarray:
    """(C,) non-interpolated average precision per class; NaN for a class with no positives.

    Equal to ``sklearn.metrics.average_precision_score`` on each column, computed on the
    rows not ignored for that class.
    """
    return _ap_from_ranking(rank_by_class(scores, targets, ignore))


def average_precision(scores_c, targets_c, ignore_c=None) -> float:
    """Non-interpolated AP of one class from (N,) scores and (N,) {0,1} targets; NaN without positives."""
    s = _as_scores(scores_c, ndim=1)[:, None]
    t = np.asarray(targets_c).reshape(-1, 1)
    ign = None if ignore_c is None else np.asarray(ignore_c).reshape(-1, 1)
    return float(per_class_ap(s, t, ign)[0])


def mean_average_precision(scores, targets, ignore=None) -> float:
    """mAP: mean of per-class AP over the classes with at least one positive (NaN if none has)."""
    return _nanmean(per_class_ap(scores, targets, ignore))


# ----------------------------------------------------------------------------- predictions

def binarize(scores, thresholds=0.5) -> np.ndarray:
    """(N, C) uint8 predictions: 1 where ``score >= threshold`` (per class when thresholds is (C,))."""
    s = _as_scores(scores)
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.shape not in ((), (s.shape[1],)):
        raise ValueError(f"thresholds must be a float or shape ({s.shape[1]},), got {thr.shape}")
    return (s >= thr).astype(np.uint8)


def top_k_predictions(scores, k: int = TOP_K_MULTILABEL) -> np.ndarray:
    """(N, C) uint8 with 1 at the k highest scores of each row (k clipped to C).

    Ties go to the lower class index: a stable sort of the negated scores keeps equal
    scores in index order.
    """
    s = _as_scores(scores)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]             # (N, k)
    pred = np.zeros(s.shape, dtype=np.uint8)
    np.put_along_axis(pred, top, 1, axis=1)
    return pred


# ----------------------------------------------------------------------------- counts

class Counts(NamedTuple):
    """True positives, false positives and false negatives, summed along one axis."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray


def counts(pred, targets, ignore=None, axis: int = 0) -> Counts:
    """TP/FP/FN of 0/1 predictions, per class (axis=0, each (C,)) or per sample (axis=1, each (N,)).

    Ignored pairs are in none of the three. Every threshold metric below is a function
    of these counts.
    """
    if np.ndim(pred) != 2:
        raise ValueError(f"pred must be 2-D, got shape {np.shape(pred)}")
    p = _as_binary(pred, np.shape(pred), "pred")
    t = _as_binary(targets, p.shape, "targets")
    ign = _as_ignore(ignore, p.shape)
    if ign is not None:
        keep = ~ign
        p, t = p & keep, t & keep      # an ignored pair is then neither predicted nor true
    return Counts((p & t).sum(axis), (p & ~t).sum(axis), (~p & t).sum(axis))


def _precision(c: Counts) -> np.ndarray:
    """TP / (TP + FP), 0 when nothing was predicted positive."""
    return _ratio(c.tp, c.tp + c.fp)


def _recall(c: Counts) -> np.ndarray:
    """TP / (TP + FN), 0 when nothing is positive."""
    return _ratio(c.tp, c.tp + c.fn)


def _f1(c: Counts) -> np.ndarray:
    """2TP / (2TP + FP + FN), the harmonic mean of precision and recall; 0 when 0/0."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def _jaccard(c: Counts) -> np.ndarray:
    """TP / (TP + FP + FN), intersection over union; 0 when both sets are empty."""
    return _ratio(c.tp, c.tp + c.fp + c.fn)


def _micro(c: Counts) -> Counts:
    """Counts pooled over classes (or samples): one TP, FP, FN each."""
    return Counts(c.tp.sum(), c.fp.sum(), c.fn.sum())


def per_class_precision(pred, targets, ignore=None) -> np.ndarray:
    """(C,) precision per class; 0 for a class with no predicted positives."""
    return _precision(counts(pred, targets, ignore))


def per_class_recall(pred, targets, ignore=None) -> np.ndarray:
    """(C,) recall per class; 0 for a class with no positives."""
    return _recall(counts(pred, targets, ignore))


def per_class_f1(pred, targets, ignore=None) -> np.ndarray:
    """(C,) F1 per class, 2TP / (2TP + FP + FN); 0 when that is 0/0."""
    return _f1(counts(pred, targets, ignore))


def support(targets, ignore=None) -> np.ndarray:
    """(C,) int number of (non-ignored) positives per class."""
    return counts(targets, targets, ignore).tp


def _class_prf(c: Counts) -> tuple[float, float, float]:
    """CP, CR, CF1 from per-class counts: CF1 is the harmonic mean of CP and CR."""
    cp, cr = float(_precision(c).mean()), float(_recall(c).mean())
    return cp, cr, float(_harmonic(cp, cr))


def _overall_prf(c: Counts) -> tuple[float, float, float]:
    """OP, OR, OF1 from per-class counts pooled over classes."""
    m = _micro(c)
    op, or_ = float(_precision(m)), float(_recall(m))
    return op, or_, float(_harmonic(op, or_))


def class_precision(pred, targets, ignore=None) -> float:
    """CP: per-class precision averaged over all C classes."""
    return _class_prf(counts(pred, targets, ignore))[0]


def class_recall(pred, targets, ignore=None) -> float:
    """CR: per-class recall averaged over all C classes."""
    return _class_prf(counts(pred, targets, ignore))[1]


def class_f1(pred, targets, ignore=None) -> float:
    """CF1 = 2 CP CR / (CP + CR) (ML-GCN/ASL convention; NOT the mean of per-class F1)."""
    return _class_prf(counts(pred, targets, ignore))[2]


def overall_precision(pred, targets, ignore=None) -> float:
    """OP: precision of all (sample, class) pairs pooled."""
    return _overall_prf(counts(pred, targets, ignore))[0]


def overall_recall(pred, targets, ignore=None) -> float:
    """OR: recall of all (sample, class) pairs pooled."""
    return _overall_prf(counts(pred, targets, ignore))[1]


def overall_f1(pred, targets, ignore=None) -> float:
    """OF1 = 2 OP OR / (OP + OR); the same number as micro F1."""
    return _overall_prf(counts(pred, targets, ignore))[2]


def micro_f1(pred, targets, ignore=None) -> float:
    """F1 of the pooled counts (sklearn ``f1_score(average="micro")``)."""
    return float(_f1(_micro(counts(pred, targets, ignore))))


def macro_f1(pred, targets, ignore=None) -> float:
    """Mean of per-class F1 over all C classes (sklearn ``f1_score(average="macro")``)."""
    return float(per_class_f1(pred, targets, ignore).mean())


def samples_f1(pred, targets, ignore=None) -> float:
    """Mean over rows of each row's F1 (sklearn ``f1_score(average="samples")``)."""
    return float(_f1(counts(pred, targets, ignore, axis=1)).mean())


def samples_jaccard(pred, targets, ignore=None) -> float:
    """Mean over rows of |pred ∩ true| / |pred ∪ true| (sklearn ``jaccard_score(average="samples")``)."""
    return float(_jaccard(counts(pred, targets, ignore, axis=1)).mean())


# ----------------------------------------------------------------------------- multi-label report

def _prf_summary(by_class: Counts, prefix: str = "") -> dict:
    """CP, CR, CF1, OP, OR, OF1 of one prediction matrix from its per-class counts."""
    cp, cr, cf1 = _class_prf(by_class)
    op, or_, of1 = _overall_prf(by_class)
    values = {"CP": cp, "CR": cr, "CF1": cf1, "OP": op, "OR": or_, "OF1": of1}
    return {prefix + k: v for k, v in values.items()}


def _f1_summary(by_class: Counts, by_sample: Counts, prefix: str = "") -> dict:
    """micro/macro/sample F1 and sample Jaccard of one prediction matrix from its per-class and per-row counts."""
    values = {"micro_f1": _f1(_micro(by_class)), "macro_f1": _f1(by_class).mean(),
              "samples_f1": _f1(by_sample).mean(), "samples_jaccard": _jaccard(by_sample).mean()}
    return {prefix + k: float(v) for k, v in values.items()}


def multilabel_report(scores, targets, ignore=None, thresholds=0.5, class_names=None) -> dict:
    """Every multi-label metric in one flat, JSON-ready dict.

    Keys: ``mAP``; ``CP CR CF1 OP OR OF1 micro_f1 macro_f1 samples_f1 samples_jaccard`` at
    ``thresholds``; the same with a ``top3_`` prefix for the 3 highest scores per row; ``num_samples``,
    ``num_classes``; and ``per_class``, a list of dicts with ``name ap f1 precision recall
    support threshold``. Values are Python floats/ints; ``mAP`` and ``ap`` may be NaN.
    """
    s = _as_scores(scores)
    n, c = s.shape
    names = _class_names(class_names, c)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (c,))
    ap = per_class_ap(s, targets, ignore)
    pred = binarize(s, thr)
    by_class = counts(pred, targets, ignore, axis=0)               # each (C,)
    by_sample = counts(pred, targets, ignore, axis=1)              # each (N,)
    top = top_k_predictions(s, TOP_K_MULTILABEL)

    report = {"num_samples": int(n), "num_classes": int(c), "mAP": _nanmean(ap)}
    report.update(_prf_summary(by_class))
    precision, recall, f1 = _precision(by_class), _recall(by_class), _f1(by_class)
    report.update(_f1_summary(by_class, by_sample))
    top_by_class, top_by_sample = counts(top, targets, ignore, axis=0), counts(top, targets, ignore, axis=1)
    report.update(_prf_summary(top_by_class, prefix=f"top{TOP_K_MULTILABEL}_"))
    report.update(_f1_summary(top_by_class, top_by_sample, prefix=f"top{TOP_K_MULTILABEL}_"))
    n_pos = by_class.tp + by_class.fn
    report["per_class"] = [
        {"name": names[i], "ap": float(ap[i]), "f1": float(f1[i]), "precision": float(precision[i]),
         "recall": float(recall[i]), "support": int(n_pos[i]), "threshold": float(thr[i])}
        for i in range(c)
    ]
    return report


# ----------------------------------------------------------------------------- single-label

def _label_rank(scores, labels) -> np.ndarray:
    """(N,) place of each row's label in the row sorted by descending score (0 = first).

    Ties go to the lower class index, the rule of ``top_k_predictions``; counting instead of
    sorting keeps this O(N C) for wide single-label heads.
    """
    s = _as_scores(scores)
    y = _as_labels(labels, s.shape[1], n=s.shape[0])
    own = s[np.arange(len(y)), y][:, None]                          # (N, 1) the label's score
    before = np.arange(s.shape[1]) < y[:, None]                     # (N, C) classes with a lower index
    return (s > own).sum(axis=1) + ((s == own) & before).sum(axis=1)


def accuracy(scores, labels) -> float:
    """Top-1 accuracy of argmax(scores) (ties to the lower index) against (N,) int labels."""
    return top_k_accuracy(scores, labels, k=1)


def top_k_accuracy(scores, labels, k: int = TOP_K_SINGLELABEL) -> float:
    """Fraction of rows whose label is among the k highest scores (k clipped to C); NaN when N = 0.

    Ties go to the lower class index, so a row of equal scores counts labels 0..k-1 as hits
    (scikit-learn's ``top_k_accuracy_score`` breaks ties the other way; without ties they agree).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rank = _label_rank(scores, labels)
    return float((rank < k).mean()) if len(rank) else float("nan")


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts from (N,) predicted and (N,) true indices.

    Rows are true labels, columns predictions (scikit-learn's layout).
    """
    y = _as_labels(labels, num_classes)
    p = _as_labels(pred, num_classes, n=len(y))
    return np.bincount(y * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _confusion_counts(cm: np.ndarray) -> Counts:
    """Per-class TP/FP/FN of single-label predictions, read off the confusion matrix."""
    tp = np.diag(cm)
    return Counts(tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp)


def _class_accuracy(c: Counts) -> np.ndarray:
    """(C,) recall of each class, NaN (not 0) for a class without samples: there is nothing to score."""
    return np.where(c.tp + c.fn > 0, _recall(c), np.nan)


def _argmax_counts(scores, labels) -> tuple[np.ndarray, Counts]:
    """Confusion matrix of argmax predictions (ties to the lower index) and its per-class counts."""
    s = _as_scores(scores)
    cm = confusion_matrix(s.argmax(axis=1), labels, s.shape[1])
    return cm, _confusion_counts(cm)


def per_class_accuracy(scores, labels) -> np.ndarray:
    """(C,) fraction of each class's samples predicted as that class; NaN for a class with none."""
    return _class_accuracy(_argmax_counts(scores, labels)[1])


def singlelabel_report(scores, labels, class_names=None) -> dict:
    """Single-label metrics in one flat, JSON-ready dict.

    Keys: ``accuracy``, ``top5`` (None for 5 classes or fewer, where it is 1 by construction),
    ``macro_f1`` (over the classes that occur or are predicted, sklearn's default),
    ``num_samples``, ``num_classes``, ``per_class`` (``name accuracy precision f1 support``;
    accuracy is NaN for a class without samples) and ``confusion_matrix`` (nested lists,
    rows = true, columns = predicted).
    """
    s = _as_scores(scores)
    n, c = s.shape
    names = _class_names(class_names, c)
    cm, cnt = _argmax_counts(s, labels)
    acc, precision, f1 = _class_accuracy(cnt), _precision(cnt), _f1(cnt)
    n_true = cnt.tp + cnt.fn
    seen = (n_true + cnt.fp) > 0                   # (C,) classes that occur or are predicted
    return {
        "num_samples": int(n),
        "num_classes": int(c),
        "accuracy": float(cnt.tp.sum() / n) if n else float("nan"),
        # top-5 of 5 classes or fewer is 1 by construction: not a measurement (None, shown as a dash)
        f"top{TOP_K_SINGLELABEL}": top_k_accuracy(s, labels, TOP_K_SINGLELABEL) if c > TOP_K_SINGLELABEL else None,
        # over the classes that occur or are predicted, as sklearn's default labels: a class absent
        # from the data (a subset evaluated) and never predicted has no F1, not an F1 of 0
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "per_class": [
            {"name": names[i], "accuracy": float(acc[i]), "precision": float(precision[i]),
             "f1": float(f1[i]), "support": int(n_true[i])}
            for i in range(c)
        ],
        "confusion_matrix": cm.tolist(),
    }
