"""Scores → the metric summary that training, `eval` and the demo report, and its table.

Multi-label results put the three ways of turning scores into label sets side by side:
a fixed 0.5 threshold, the per-class thresholds calibrated on validation data, and top-3.
"""
from __future__ import annotations

import math

import numpy as np
from rich.table import Table

from multitag.metrics import multilabel_report, singlelabel_report

SET_METRICS = ("CP", "CR", "CF1", "OP", "OR", "OF1", "micro_f1", "macro_f1", "samples_f1", "samples_jaccard")


def monitor_name(multi_label: bool) -> str:
    """The metric that picks the best epoch: val mAP (multi-label) or val accuracy (single-label)."""
    return "mAP" if multi_label else "accuracy"


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray, multi_label: bool,
                    thresholds=None, class_names=None) -> dict:
    """scores (N, C), targets (N, C) 0/1, ignore (N, C) bool → JSON-ready metrics dict."""
    if not multi_label:
        return singlelabel_report(scores, np.asarray(targets).argmax(1), class_names)
    at_half = multilabel_report(scores, targets, ignore, 0.5, class_names)
    result = {
        "mAP": at_half["mAP"],
        "num_samples": at_half["num_samples"],
        "at_0.5": {k: at_half[k] for k in SET_METRICS},
        "top3": {k: at_half[f"top3_{k}"] for k in SET_METRICS},
        "per_class": at_half["per_class"],
    }
    if thresholds is not None:
        calibrated = multilabel_report(scores, targets, ignore, np.asarray(thresholds), class_names)
        result["calibrated"] = {k: calibrated[k] for k in SET_METRICS}
        for row, cal in zip(result["per_class"], calibrated["per_class"]):
            row.update(f1_at_0_5=row["f1"], f1=cal["f1"], precision=cal["precision"], recall=cal["recall"],
                       threshold=cal["threshold"])
    return result


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def metrics_table(result: dict, title: str = "") -> Table:
    """A rich table of a result from evaluate_scores (percentages)."""
    table = Table(title=title or None)
    if "accuracy" in result:
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("accuracy", "top5", "macro_f1"):
            table.add_row(key, _fmt(result.get(key)))
        return table
    columns = ["at_0.5", "calibrated", "top3"] if "calibrated" in result else ["at_0.5", "top3"]
    table.add_column("metric")
    for c in columns:
        table.add_column({"at_0.5": "@0.5", "calibrated": "calibrated", "top3": "top-3"}[c], justify="right")
    table.add_row("mAP", *[_fmt(result["mAP"])] + [""] * (len(columns) - 1))
    for key in SET_METRICS:
        table.add_row(key, *[_fmt(result[c].get(key)) for c in columns])
    return table
