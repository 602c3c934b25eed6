"""`multitag report`: RUN_DIR/report/index.html with its PNG figures beside it, and metrics.json.

The page is static HTML with inline CSS and relative links to the PNGs in its own folder: it opens
offline, fetching no script, stylesheet or font. Its numbers are those `multitag eval` prints
(``summary.evaluate_scores`` on ``evaluation.score_split``); counts come from ``metrics``.

Sections, in order: summary (run facts, headline metrics), learning curves, per-class table and
bar charts, precision–recall curves (multi-label), confusion view, label statistics, worst false
positives and negatives, Grad-CAM overlays.
"""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from multitag import plots
from multitag.checkpoint import MODEL_META, read_json, write_json
from multitag.errors import UserError
from multitag.data.decode import decode_image
from multitag.data.prepare import PreparedData, check_split_name
from multitag.data.table import positives_by_split
from multitag.evaluation import Scored, prepare_for, score_run
from multitag.explain import explain_images
from multitag.fileio import check_writable, read_jsonl, safe_name
from multitag.metrics import binarize, counts, rank_by_class
from multitag.predict import Model, load, score_vs_threshold
from multitag.summary import SET_METRICS

REPORT_DIR = "report"
REPORT_SPLIT = "test"     # the split train's report and a plain `multitag report` or `eval` are on
SPLIT_MARK = "@"          # report@val: safe_name never writes "@", so no data name reads as a split
HISTORY_FILE = "metrics.jsonl"
GALLERY_SIZE = 8          # images per error gallery
CAM_IMAGES = 4            # images in the Grad-CAM section
CAM_TOP_K = 3             # classes explained per image
CAPTION_CHARS = 40        # a caption line that fits over one thumbnail of plots.image_grid (7 pt, 2.5 in)
METRIC_LABELS = {"mAP": "mAP", "CP": "CP (per-class precision)", "CR": "CR (per-class recall)",
                 "CF1": "CF1", "OP": "OP (overall precision)", "OR": "OR (overall recall)", "OF1": "OF1",
                 "micro_f1": "micro F1", "macro_f1": "macro F1", "samples_f1": "sample F1",
                 "samples_jaccard": "sample Jaccard", "accuracy": "accuracy (top-1)", "top5": "top-5 accuracy"}


# ----------------------------------------------------------------------------- the data

@dataclass
class ReportData:
    """One model scored on one split: what every section draws from."""

    model: Model
    prepared: PreparedData
    split: str
    rows: np.ndarray             # (N,) table rows of the split
    scores: np.ndarray           # (N, C) sigmoid (multi-label) or softmax (single-label) scores
    result: dict                 # evaluate_scores(...) plus split facts; becomes metrics.json
    out: Path                    # the report folder
    notes: list[str]
    figures: list[Path] = field(default_factory=list)
    ignore: np.ndarray = field(init=False)      # (N, C) bool: pairs neither positive nor negative
    positive: np.ndarray = field(init=False)    # (N, C) bool: true labels, ignored pairs excluded
    predicted: np.ndarray = field(init=False)   # (N, C) bool: the labels the model outputs

    def __post_init__(self) -> None:
        t = self.prepared.table
        self.ignore = t.ignore[self.rows]
        self.positive = (t.targets[self.rows] > 0.5) & ~self.ignore
        if self.model.multi_label:   # at the calibrated thresholds (0.5 where none were fitted)
            self.predicted = binarize(self.scores, self.model.thresholds).astype(bool)
        else:                        # the top class
            self.predicted = np.eye(self.scores.shape[1], dtype=bool)[self.scores.argmax(1)]

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def true_line(self, i: int) -> str:
        """"true: a, b +3 more": split row i's true labels, as many as fit on a caption line."""
        prefix = "true: "
        return prefix + name_list([self.class_names[j] for j in np.flatnonzero(self.positive[i])],
                                  CAPTION_CHARS - len(prefix))

    def decision(self, c: int, score: float) -> str:
        """Class c's score, against its threshold for a multi-label model ("0.74 ≥ 0.33")."""
        return score_vs_threshold(score, self.model.thresholds[c]) if self.model.multi_label else f"{score:.2f}"

    def figure(self, path: Path) -> Path:
        """Record a written figure (for metrics.json and the tests) and return its path."""
        self.figures.append(path)
        return path


def name_list(names: list[str], width: int = CAPTION_CHARS) -> str:
    """Names comma-separated, as many as fit in ``width`` characters, the rest as "+N more" (at least one
    name is listed); "(none)" for none. Cutting the text at a width instead would cut a name in two."""
    for k in range(len(names), 0, -1):
        text = ", ".join(names[:k]) + (f" +{len(names) - k} more" if k < len(names) else "")
        if len(text) <= width or k == 1:
            return text
    return "(none)"


def clipped(text: str, width: int = CAPTION_CHARS) -> str:
    """``text`` on one caption line: cut with an ellipsis when longer than ``width``."""
    return text if len(text) <= width else text[:width - 1] + "…"


def _has_value(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def choose_split(prepared: PreparedData, requested: str, calibrated: bool) -> tuple[str, list[str]]:
    """The split to report on and notes on how to read it: falls back from test to val when there is no test."""
    split, notes = requested, []
    if requested == "test" and len(prepared.rows("test")) == 0:
        split = "val"
        notes.append("The data has no test split, so this report is on the validation split instead.")
    if split == "val" and len(prepared.rows("val")) == 0:     # trained without a val split as well
        split = "train"
        notes[:] = ["The data has no test or val split, so this report is on the training images."]
    if split in ("val", "all"):
        notes.append("The best epoch was chosen on the validation split"
                     + (" and the calibrated thresholds were fitted on it, so the 'calibrated' column is "
                        "optimistic here; mAP, @0.5 and top-3 do not depend on the thresholds." if calibrated else "."))
    if split in ("train", "all"):
        notes.append("The model was trained on the training images: their numbers are optimistic.")
    return split, notes


def read_history(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows (one per epoch), or [] when the run has none (unreadable lines left out)."""
    return read_jsonl(Path(run_dir) / HISTORY_FILE)


def pr_points(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class (recall, precision) at every distinct score, best score first; empty without positives.

    Read off metrics.rank_by_class, the ranking AP itself is computed from (ignored pairs excluded).
    """
    r = rank_by_class(scores, targets, ignore)
    curves = []
    for c in range(scores.shape[1]):
        if r.num_pos[c] == 0:
            curves.append((np.empty(0), np.empty(0)))
            continue
        keep = r.is_end[c] & np.isfinite(r.scores[c])                        # thresholds; ignored pairs are -inf
        tp, fp = r.tp[c][keep].astype(np.float64), r.fp[c][keep]
        curves.append((tp / r.num_pos[c], tp / np.maximum(tp + fp, 1)))
    return curves


def worst_errors(d: ReportData, kind: str, n: int = GALLERY_SIZE) -> list[tuple[int, int]]:
    """(split row, class) of the n most confident errors, one per image.

    kind "fp": predicted but not true, highest score first; "fn": true but not predicted, lowest first.
    """
    if kind == "fp":
        mask, key = d.predicted & ~d.positive & ~d.ignore, -d.scores
    else:
        mask, key = ~d.predicted & d.positive, d.scores
    pairs = np.argwhere(mask)                                                # (E, 2) row, class
    pairs = pairs[np.argsort(key[mask], kind="stable")]                      # argwhere and mask share order
    _, first = np.unique(pairs[:, 0], return_index=True)                     # each image's worst pair
    return [(int(i), int(c)) for i, c in pairs[np.sort(first)][:n]]


def per_row(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(R, K) counts divided row by row by (R,) totals; a row with total 0 is NaN (nothing to show)."""
    n = np.asarray(n, dtype=np.float64)[:, None]
    return np.divide(m, n, out=np.full(np.shape(m), np.nan), where=n > 0)


def _original(d: ReportData, i: int) -> np.ndarray:
    """Split row i's image as decoded (EXIF-upright RGB), (H, W, 3) uint8."""
    return decode_image(d.prepared.table.paths[d.rows[i]]).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- HTML pieces

def _esc(text) -> str:
    return html.escape(str(text))


def _pct(value) -> str:
    """A fraction as a percentage with two decimals; a dash for missing or NaN."""
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.2f}"


def _cell(key: str, value) -> str:
    """A per-class table cell: counts as integers, thresholds as scores, the rest as percentages."""
    if key == "support":
        return str(int(value))
    return f"{value:.3f}" if key == "threshold" else _pct(value)


def _table(header: list[str] | None, rows: list[list], cls: str = "") -> str:
    """An HTML table (no header row when header is None); cells are escaped text."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _figure(path: Path, caption: str) -> str:
    """An <img> of a figure in the report folder (relative link) with its caption."""
    return (f'<figure><img src="{_esc(path.name)}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _paragraph(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{_esc(text)}</p>'


# ----------------------------------------------------------------------------- sections

def summary_section(d: ReportData) -> str:
    """Run facts, notes on the split and the headline metrics."""
    m, r = d.model.meta, d.result
    thresholds = ("per-class, fitted on the validation split" if m.get("thresholds") is not None
                  else "none fitted: 0.5 for every class")
    model = f"{m['model']['name']} ({m['model'].get('num_parameters', 0):,} parameters)"
    kind = "multi" if d.model.multi_label else "single"
    facts = [["run", d.model.run_dir.name],
             ["model", model],
             ["input", f"{d.model.input_size}×{d.model.input_size} px, squash-resized"],
             ["classes", f"{len(d.class_names)} ({kind}-label)"],
             ["best epoch", f"{m.get('best_epoch')} (val {m.get('monitor')} {_pct(m.get('best_value'))})"]
             if _has_value(m.get("best_value")) else ["result", f"last epoch {m.get('best_epoch')} (no val split)"],
             ["data", r.get("data", "")],
             ["split", f"{d.split}: {r['num_images']} images"]]
    if d.model.multi_label:
        facts.append(["thresholds", thresholds])
    parts = [_table(None, facts, "facts")] + [_paragraph(n, "note") for n in d.notes]
    return "\n".join(parts + [_headline_table(r)])


def _headline_table(r: dict) -> str:
    """Multi-label: mAP and the set metrics @0.5, calibrated and top-3 side by side; single: accuracy.
    The header names the split, so a table copied out of the page still says what it measured."""
    unit = f"% on {r['split']}"
    if "accuracy" in r:
        return _table(["metric", unit], [[METRIC_LABELS[k], _pct(r.get(k))] for k in ("accuracy", "top5", "macro_f1")],
                      "metrics")
    cols = ["at_0.5", "calibrated", "top3"] if "calibrated" in r else ["at_0.5", "top3"]
    header = [f"metric ({unit})"] + [{"at_0.5": "@0.5", "calibrated": "calibrated", "top3": "top-3"}[c] for c in cols]
    rows = [["mAP", _pct(r["mAP"])] + [""] * (len(cols) - 1)]
    rows += [[METRIC_LABELS[k]] + [_pct(r[c][k]) for c in cols] for k in SET_METRICS]
    return _table(header, rows, "metrics")


def curves_section(d: ReportData) -> str:
    history = read_history(d.model.run_dir)
    if not history:
        return _paragraph(f"No {HISTORY_FILE} in the run directory: no learning curves.", "note")
    staged = " Dashed lines separate the training stages." if len(plots.stage_spans(history)) > 1 else ""
    path = d.figure(plots.learning_curves(history, d.out / "learning_curves.png", d.model.meta.get("best_epoch")))
    return _figure(path, "Loss, validation metric and learning rate per epoch; the dotted line is the best "
                         "epoch, whose weights are the model." + staged)


def _per_class_columns(d: ReportData) -> dict[str, np.ndarray]:
    """Per-class quantities to chart, the sort key first."""
    pc = d.result["per_class"]
    keys = ("ap", "f1", "precision", "recall") if d.model.multi_label else ("accuracy", "f1", "precision")
    columns = {k: np.array([row[k] for row in pc], dtype=np.float64) for k in keys}
    columns["support"] = np.array([row["support"] for row in pc], dtype=np.int64)
    if d.model.multi_label:
        columns["threshold"] = np.array([row["threshold"] for row in pc], dtype=np.float64)
    return columns


def per_class_section(d: ReportData) -> str:
    """Per-class table (sorted, worst last) and one bar chart per quantity."""
    columns = _per_class_columns(d)
    order = plots.descending_order(next(iter(columns.values())))
    header = ["class"] + list(columns)
    rows = [[d.class_names[i]] + [_cell(k, v[i]) for k, v in columns.items()] for i in order]
    if d.model.multi_label:
        rule = "the calibrated thresholds" if "calibrated" in d.result else "threshold 0.5"
        what = f"F1, precision and recall at {rule}; support = images with the label"
    else:
        what = "accuracy = recall of the class; precision and F1 of the top-1 predictions; support = images"
    path = d.figure(plots.per_class_bars(d.class_names, columns, d.out / "per_class.png"))
    return "\n".join([_figure(path, f"Per-class metrics on {d.split}, sorted by {header[1]}; {what}."),
                      _table(header, rows, "per-class")])


def pr_section(d: ReportData) -> str | None:
    """Precision–recall curve per class with the operating point (multi-label only)."""
    if not d.model.multi_label:
        return None
    pc = d.result["per_class"]
    curves = pr_points(d.scores, d.positive, d.ignore)
    marks = [(row["recall"], row["precision"], row["threshold"]) for row in pc]
    path = d.figure(plots.pr_curves(d.class_names, curves, [row["ap"] for row in pc], marks, d.out / "pr_curves.png"))
    return _figure(path, "Precision–recall curve of each class; the red dot is the threshold the model uses.")


def confusion_counts(d: ReportData) -> dict[str, np.ndarray]:
    """Per-class TP, FP, FN, TN of the model's predicted label sets (ignored pairs in none)."""
    c = counts(d.predicted, d.positive, d.ignore)
    tn = (~d.ignore).sum(0) - c.tp - c.fp - c.fn
    return {"TP": c.tp, "FP": c.fp, "FN": c.fn, "TN": tn}


def predicted_vs_true(d: ReportData) -> np.ndarray:
    """(C, C) row i = images where class i is true: (i, i) is i's recall, (i, j) the fraction in which
    j was predicted although j is absent. Off the diagonal it counts only wrong predictions, so a
    pair of labels that merely occur together (person, chair) does not look like a confusion.
    """
    wrong = d.predicted & ~d.positive & ~d.ignore                            # (N, C) false positives
    pos = d.positive.astype(np.float64)
    m = pos.T @ wrong                                                        # (C, C) i true and j wrongly predicted
    np.fill_diagonal(m, (d.positive & d.predicted).sum(0))
    return per_row(m, d.positive.sum(0))


def confusion_section(d: ReportData) -> str:
    names = d.class_names
    if not d.model.multi_label:
        cm = np.asarray(d.result["confusion_matrix"], dtype=np.float64)
        path = d.figure(plots.matrix_heatmap(per_row(cm, cm.sum(1)), names, names, d.out / "confusion_matrix.png",
                                             title="confusion matrix (rows sum to 1)", xlabel="predicted",
                                             ylabel="true"))
        return _figure(path, "Row i: where the images of class i went; the diagonal is per-class accuracy.")
    cnt = confusion_counts(d)
    table = _table(["class"] + list(cnt), [[n] + [int(v[i]) for v in cnt.values()] for i, n in enumerate(names)],
                   "per-class")
    path = d.figure(plots.matrix_heatmap(predicted_vs_true(d), names, names, d.out / "predicted_vs_true.png",
                                         title="predicted vs true", xlabel="predicted (wrongly, off the diagonal)",
                                         ylabel="true"))
    return "\n".join([_figure(path, "Row i: images where class i is true. Diagonal: recall of i. Cell (i, j): "
                                    "fraction of them in which j was predicted although absent — which labels "
                                    "are confused with which."),
                      _paragraph("Per-class counts of the predicted label sets (TP, FP, FN, TN):"), table])


def label_stats_section(d: ReportData) -> str:
    """Label counts per class and split, label co-occurrence and labels per image, over all usable images."""
    p, t = d.prepared, d.prepared.table
    rows = p.rows("all")
    positive = t.positives(rows)                                             # (M, C)
    by_split = positives_by_split(positive, p.split[rows])
    parts = [_figure(d.figure(plots.label_counts(d.class_names, by_split, d.out / "label_counts.png")),
                     f"Images per class in the data ({len(rows)} usable images), by split.")]
    if d.model.multi_label:
        together = positive.T.astype(np.float64) @ positive                  # (C, C) images with both
        cond = per_row(together, np.diag(together))
        np.fill_diagonal(cond, np.nan)                                       # trivially 1
        parts.append(_figure(d.figure(plots.matrix_heatmap(
            cond, d.class_names, d.class_names, d.out / "label_cooccurrence.png",
            title="label co-occurrence P(j | i)", xlabel="j", ylabel="i")),
            "Row i: fraction of the images labelled i that are also labelled j (true labels)."))
        parts.append(_figure(d.figure(plots.labels_per_image(np.bincount(positive.sum(1)),
                                                             d.out / "labels_per_image.png")),
                             "How many labels the images carry."))
    return "\n".join(parts)


def _gallery(d: ReportData, kind: str) -> str:
    pairs = worst_errors(d, kind)
    what = {"fp": "false positives", "fn": "false negatives"}[kind]
    if not pairs:
        return _paragraph(f"No {what} on this split.")
    items = [(_original(d, i), error_caption(d, i, c)) for i, c in pairs]
    path = d.figure(plots.image_grid(items, d.out / f"worst_{kind}.png", title=f"worst {what}"))
    rule = ("score of a class the image does not have, highest first" if kind == "fp"
            else "score of a class the image has but the model missed, lowest first")
    return _figure(path, f"Worst {what} (one per image): {rule}.")


def error_caption(d: ReportData, i: int, c: int) -> str:
    """The class in error with its score against its threshold, then the image's true labels."""
    return f"{clipped(d.class_names[c] + ': ' + d.decision(c, d.scores[i, c]))}\n{d.true_line(i)}"


def errors_section(d: ReportData) -> str:
    return "\n".join(_gallery(d, kind) for kind in ("fp", "fn"))


def _cam_caption(d: ReportData, i: int, cam) -> str:
    """Class, score against its threshold (a top class need not be predicted), whether the label is true,
    and a word when the map is empty."""
    c = d.class_names.index(cam.class_name)
    true = " (true)" if d.positive[i, c] else ""
    empty = "\nno positive evidence" if cam.heatmap.max() == 0 else ""
    return f"{clipped(cam.class_name + ': ' + d.decision(c, cam.score) + true)}{empty}"


def gradcam_section(d: ReportData) -> str:
    """Grad-CAM of each of a few images' top classes, overlaid on the original image."""
    picks = np.unique(np.linspace(0, len(d.rows) - 1, min(CAM_IMAGES, len(d.rows))).astype(int))  # spread out
    originals = [_original(d, i) for i in picks]
    k = min(CAM_TOP_K, len(d.class_names))
    items = []
    for i, original, cams in zip(picks, originals, explain_images(d.model, originals, top_k=k)):
        items.append((original, f"{clipped(Path(d.prepared.table.paths[d.rows[i]]).name)}\n{d.true_line(i)}"))
        items += [(cam.overlay, _cam_caption(d, i, cam)) for cam in cams]
    path = d.figure(plots.image_grid(items, d.out / "gradcam.png", ncols=k + 1))
    return _figure(path, f"Grad-CAM of each image's top {k} classes (red = most evidence), computed on the exact "
                         "model input and resized back onto the original image.")


SECTIONS: list[tuple[str, str, Callable[[ReportData], str | None]]] = [
    ("summary", "Summary", summary_section),
    ("curves", "Learning curves", curves_section),
    ("per-class", "Per class", per_class_section),
    ("pr", "Precision–recall curves", pr_section),
    ("confusion", "Confusion", confusion_section),
    ("labels", "Label statistics", label_stats_section),
    ("errors", "Worst errors", errors_section),
    ("gradcam", "Grad-CAM", gradcam_section),
]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 1.5em 3em; color: #222; background: #fff; }
nav a { margin-right: 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-top: 0.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; } td { text-align: right; }
td:first-child, th:first-child { text-align: left; } thead th { background: #f3f3f3; }
table.facts td { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.note { background: #fff6d6; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
"""


def render_page(d: ReportData, sections: list[tuple[str, str, str]]) -> str:
    """The whole index.html from (anchor, title, body HTML) sections."""
    nav = " ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    body = "\n".join(f'<section id="{a}"><h2>{_esc(t)}</h2>\n{b}\n</section>' for a, t, b in sections)
    title = f"multitag report: {d.model.run_dir.name} ({d.split})"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_esc(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")


# ----------------------------------------------------------------------------- entry point

def report_folder(run_dir, data: str | None = None, split: str = REPORT_SPLIT) -> Path:
    """RUN_DIR/report for the run's own data and the test split; RUN_DIR/report-<name> for other data
    (--data) and report@<split> (report-<name>@<split>) for another split, so a report on other data
    or on val never replaces the test report on the data the run was trained on (what the app shows)."""
    check_split_name(split)                     # a split name becomes part of a path: only the known ones
    run_dir = Path(run_dir)
    folder = REPORT_DIR if _is_own_data(run_dir, data) else f"{REPORT_DIR}-{_data_name(data)}"
    return run_dir / (folder if split == REPORT_SPLIT else f"{folder}{SPLIT_MARK}{split}")


def _is_own_data(run_dir: Path, data: str | None) -> bool:
    """No --data, or the path the run was trained on."""
    if not data:
        return True
    try:
        own = read_json(run_dir / MODEL_META)["recipe"]["data"]["path"]
    except (UserError, KeyError, TypeError):
        own = ""
    return bool(own) and Path(data).resolve() == Path(own).resolve()


def _data_name(data: str) -> str:
    """Other data's part of its report folder name. A file is named with its folder: annotation files
    share names (labels.csv), and two datasets' reports must not land in one folder, the second
    replacing the first."""
    path = Path(data).resolve()
    return safe_name(f"{path.parent.name}-{path.name}" if path.is_file() else path.name) or "data"


def _emptied_of_figures(out: Path) -> Path:
    """``out`` created, emptied of figures of an earlier report."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    return out


def write_report(run_dir, data: str | None = None, split: str = "test", log=print,
                 scored: Scored | None = None) -> Path:
    """Score the run on a split (test, or val when the data has none) and write its index.html.

    ``scored`` reuses scores already computed (by `multitag eval`, of ``data``) instead of scoring again.
    The page goes to ``report_folder(run_dir, data, split)`` (the split asked for, or ``scored``'s):
    report/, report-<name>/ for other data, report@<split>/ for a split other than test.
    Also writes metrics.json beside it (the metrics, per-class counts, notes and figure names).
    Returns the path of index.html.
    """
    start = time.perf_counter()
    folder = report_folder(run_dir, data, split if scored is None else scored.split)
    check_writable(folder, directory=True)      # before the scoring, not after it
    if scored is None:
        model = load(run_dir)
        prepared = prepare_for(model, data, log)
        split, notes = choose_split(prepared, split, model.meta.get("thresholds") is not None)
        scored = score_run(model, data, split, log, prepared=prepared)
    else:
        _, notes = choose_split(scored.prepared, scored.split, scored.model.meta.get("thresholds") is not None)
    model, prepared, split, rows, scores, result = (scored.model, scored.prepared, scored.split, scored.rows,
                                                    scored.scores, scored.result)
    d = ReportData(model, prepared, split, rows, scores, result, _emptied_of_figures(folder), notes)

    sections = [(a, title, body) for a, title, build in SECTIONS if (body := build(d)) is not None]
    index = d.out / "index.html"
    index.write_text(render_page(d, sections), encoding="utf-8")
    extra = {"notes": notes, "figures": [p.name for p in d.figures]}
    if model.multi_label:
        extra["counts"] = {k: v.tolist() for k, v in confusion_counts(d).items()}
    write_json(d.out / "metrics.json", {**result, **extra})
    log(f"report on {split} ({len(rows)} images, {len(d.figures)} figures) in "
        f"{time.perf_counter() - start:.1f}s: {index}")
    return index


def rewrite_reports(run_dir, log=print) -> Path | None:
    """After `calibrate`: report/ written again at the new thresholds (its test metrics stay test metrics:
    the thresholds were fitted on val), so it and the app agree with model.json; the other report
    folders (other --data or --split, whose data a report does not record) are named as out of date.
    Returns report/index.html when it was rewritten (None when the run has no report/)."""
    run_dir = Path(run_dir)
    index = write_report(run_dir, log=log) if (run_dir / REPORT_DIR / "index.html").is_file() else None
    others = sorted(p.name for p in run_dir.glob(f"{REPORT_DIR}[-{SPLIT_MARK}]*") if p.is_dir())
    if others:
        log(f"{', '.join(others)} still show{'s' * (len(others) == 1)} metrics at the earlier thresholds; "
            "run `multitag eval` with their --data/--split again to refresh them")
    return index
