"""`multitag eval` and `multitag calibrate` on a run directory: score a split, report, fit thresholds.

Thresholds are fitted on the validation split only; test metrics use those thresholds and are
never tuned on test.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitag.calibration import fit_thresholds_with_f1
from multitag.checkpoint import MODEL_META, write_json
from multitag.config import DataConfig, data_config_from_dict
from multitag.data.loader import BatchLoader
from multitag.data.prepare import SPLIT_FILE, PreparedData, check_split_name, prepare
from multitag.errors import UserError
from multitag.export import refresh_metadata
from multitag.predict import SCORING_BATCH, Model, load
from multitag.summary import evaluate_scores


def data_config_for(model: Model, data: str | None) -> DataConfig:
    """The run's data settings, with another data path if given, at the model's input size."""
    cfg = data_config_from_dict(model.meta["recipe"]["data"])
    if data:
        cfg.path, cfg.format = str(data), "auto"
    cfg.image_size = model.input_size
    return cfg


def prepare_for(model: Model, data: str | None, log=print) -> PreparedData:
    return prepare(data_config_for(model, data), model.run_dir, classes=model.class_names, reuse_split=True, log=log)


def score_split(model: Model, prepared: PreparedData, split: str, batch_size: int = SCORING_BATCH,
                fix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores (N, C)) of the model on one split of the prepared data, on the model's backend.
    ``fix`` is the way out offered when the split has no images (default: eval's --split choices)."""
    rows = prepared.rows(split)
    if len(rows) == 0:
        raise UserError(f'the data has no usable "{split}" images{_why_no_rows(model, prepared, split)}; '
                        f"{fix or _other_splits(prepared)}.")
    t = prepared.table
    loader = BatchLoader(prepared.cache, rows, t.targets, t.ignore, batch_size=batch_size,
                         mean=model.mean, std=model.std)
    scores = [model.scores(b.images) for b in loader.iterate()]
    return rows, np.concatenate(scores)


def _why_no_rows(model: Model, prepared: PreparedData, split: str) -> str:
    """The likely cause of an empty split, where one can be named."""
    split_file, own = model.run_dir / SPLIT_FILE, list(prepared.table.split or [])
    if not split_file.exists() and not any(own):
        return (f" ({split_file}, which records the training split, is missing and the data has no split "
                "column of its own)")
    overruled = sum(o == split for o in own)
    if overruled:       # the data says val/test, but the run's split.csv knows these images otherwise
        return (f" (the data marks {overruled} images {split}, but the run's {SPLIT_FILE} lists them under another "
                "split, and it decides for images the run has seen, so none leaks from training into scoring)")
    if not any(own) and not any(prepared.split):
        return (f" (none of its images is in the run's {SPLIT_FILE} and it has no split column of its own; "
                "--split all scores every image, honest only if the run never trained on them)")
    return ""


def _other_splits(prepared: PreparedData) -> str:
    """eval's way out: the splits the data does have (val before all, which includes training images)."""
    have = [name for name in ("test", "val", "train") if len(prepared.rows(name))]
    if "test" not in have and "val" in have:
        return "use --split val (the run's held-out val images), or data with a test split"
    return "use --split all, or data with a split column"


@dataclass
class Scored:
    """A run scored on one split: what eval prints and what the report draws."""
    model: Model
    prepared: PreparedData
    split: str
    rows: np.ndarray          # (N,) table rows of the split
    scores: np.ndarray        # (N, C)
    result: dict              # summary.evaluate_scores + split, num_images, data


def score_run(run_dir: str | Path | Model, data: str | None = None, split: str = "test", log=print,
              prepared: PreparedData | None = None) -> Scored:
    """Score a trained run on a split: metrics at 0.5, at the calibrated thresholds and top-3."""
    check_split_name(split)                    # before the data is read and cached
    model = run_dir if isinstance(run_dir, Model) else load(run_dir)
    prepared = prepared or prepare_for(model, data, log)
    rows, scores = score_split(model, prepared, split)
    t = prepared.table
    result = evaluate_scores(scores, t.targets[rows], t.ignore[rows], model.multi_label,
                             model.meta.get("thresholds"), t.class_names)
    result.update(split=split, num_images=int(len(rows)), data=t.source)
    return Scored(model, prepared, split, rows, scores, result)


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str = "test", log=print) -> dict:
    """Metrics of a trained run on a split (see score_run)."""
    return score_run(run_dir, data, split, log).result


def calibrate_run(run_dir: str | Path, data: str | None = None, log=print) -> list[float]:
    """Fit per-class F1-maximising thresholds on the validation split and store them in model.json,
    with the val metrics there recomputed at them (those train stored were at the earlier thresholds)."""
    model = load(run_dir)
    if not model.multi_label:
        raise UserError("calibration applies to multi-label models; single-label models predict the top class.")
    prepared = prepare_for(model, data, log)
    rows, scores = score_split(model, prepared, "val", fix="calibrate fits on the val split; pass --data with "
                                                          "val rows (a split column)")
    t = prepared.table
    before = np.asarray(model.meta.get("thresholds") or [0.5] * len(t.class_names), dtype=np.float64)
    thresholds, f1 = fit_thresholds_with_f1(scores, t.targets[rows], t.ignore[rows], default=before)
    kept = [name for name, value in zip(t.class_names, f1) if np.isnan(value)]
    if kept:      # no positives to fit on: a 0.5 would silently replace what an earlier fit found
        log(f"kept the earlier thresholds of {', '.join(kept)}: the val split has no positives of "
            f"{'it' if len(kept) == 1 else 'them'}")
    thresholds = thresholds.tolist()
    model.meta["thresholds"] = thresholds
    # As train's finish() does: the val metrics of the scores the thresholds were fitted on.
    val = evaluate_scores(scores, t.targets[rows], t.ignore[rows], True, thresholds, t.class_names)
    model.meta["metrics"] = {**(model.meta.get("metrics") or {}), "val": val}
    write_json(model.run_dir / MODEL_META, model.meta)
    refresh_metadata(model, log)      # exported files carry the thresholds in their metadata too
    return thresholds
