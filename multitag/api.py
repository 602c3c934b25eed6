"""The Python API: ``multitag.train``, ``multitag.load``, ``multitag.evaluate``, ``multitag.calibrate``,
``multitag.lr_find``, ``multitag.inspect_data``, ``multitag.demo``."""
from __future__ import annotations

import time
from pathlib import Path

from multitag.config import Config, load_config
from multitag.errors import UserError


def default_run_dir(cfg: Config, kind: str = "") -> Path:
    return Path("runs") / f"{cfg.recipe or 'run'}{'-' + kind if kind else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: str | Config | None = None, data: str | None = None, out: str | Path | None = None,
          overrides: list[str] | tuple = (), resume: str | Path | None = None, overwrite: bool = False,
          log=print, runtime: dict | None = None) -> Path:
    """Train from a recipe name, YAML path or Config; returns the run directory.

    ``resume=RUN_DIR`` continues a killed run from its last checkpoint with its own config.
    ``out`` that already holds a run is refused unless ``overwrite=True``, which deletes that run first.
    ``runtime``: a runtime record (checkpoint.json's "runtime") to train with, unmeasured.
    """
    from multitag import distributed
    from multitag.config_checks import check_config
    from multitag.data.prepare import require_data
    from multitag.engine import fit, load_run_config

    if resume is not None:
        if overwrite:
            raise UserError("--resume continues a run and --overwrite deletes it; pass only one of them.")
        if config is not None or data is not None or overrides:
            raise UserError("--resume continues a run with its own config; drop the recipe, --data and --set.")
        cfg, run = load_run_config(Path(resume)), Path(resume)
    else:
        cfg = _config(config, data, overrides)
        run = Path(out) if out else default_run_dir(cfg)
    check_config(cfg)           # before "run directory:" is said of a run that would not start (fit checks too)
    require_data(cfg.data)
    t = cfg.train
    with distributed.session(t.device, t.dist_timeout_s, t.dist_setup_timeout_s):   # no-op without torchrun
        run = Path(distributed.broadcast_object(str(run)))     # rank 0's (timestamped) default directory
        if not distributed.is_main():                          # one process speaks for the job
            log = _quiet
        # Named first, so a user who stops a run (Ctrl-C, kill) knows what `--resume` needs.
        log(f"run directory: {run}")
        fit(cfg, run, resume=resume is not None, overwrite=overwrite, log=log, runtime=runtime)
    if cfg.train.report and distributed.is_main():
        from multitag.report import write_report

        write_report(run, log=log)
    return run


def _quiet(*args) -> None:
    pass


def _config(config: str | Config | None, data: str | None, overrides) -> Config:
    """A recipe name, YAML path or Config, with ``overrides`` applied and the data path set."""
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    if data is not None:
        cfg.data.path = str(data)
    return cfg


def lr_find(config: str | Config | None = None, data: str | None = None, out: str | Path | None = None,
            overrides: list[str] | tuple = (), *, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            stage: int = 0, log=print):
    """The learning-rate range test of a training config (see multitag/lr_find.py); returns an
    LrFindResult whose ``setting`` is the --set to train with. Writes lr_find.csv and lr_find.png to
    ``out`` (default runs/<recipe>-lr-find-<time>)."""
    from multitag.data.prepare import require_data
    from multitag.lr_find import lr_find as sweep

    cfg = _config(config, data, overrides)
    require_data(cfg.data)      # before its folder is named, as train does
    out = Path(out) if out else default_run_dir(cfg, "lr-find")
    log(f"lr-find folder: {out}")
    return sweep(cfg, out, start=start, end=end, steps=steps, stage_index=stage, log=log)


def inspect_data(data: str, config: str | Config | None = None, overrides: list[str] | tuple = (), *,
                 plot: str | Path | None = None, log=print) -> dict:
    """What train would make of the dataset at ``data`` under a recipe's data settings and ``overrides``
    (format, classes, split, positives per class and split, problems such as missing, unreadable or
    duplicate files; see multitag/data/overview.py), without training or caching. ``plot``: a folder
    for label_counts.png, labels_per_image.png (multi-label) and examples.png, named under "plots"."""
    from multitag.data.overview import survey
    from multitag.fileio import check_writable

    cfg = _config(config, data, overrides)
    if plot is not None:
        check_writable(plot, directory=True)      # before the pass over every image, not after it
    other = [o for o in overrides if not str(o).strip().startswith("data.")]
    if other:
        log(f"note: only data.* settings change how the data is read; {', '.join(other)} do not")
    result = survey(cfg.data, log=log)
    if plot is not None:
        result["plots"] = _plot_survey(result, Path(plot))
    return result


EXAMPLE_CLASSES = 36      # examples.png shows at most this many classes (6 rows of 6 thumbnails)


def _plot_survey(result: dict, folder: Path) -> dict:
    """The report's label figures of a data survey, written to ``folder``: {name: path}."""
    import numpy as np

    from multitag import plots
    from multitag.data.decode import to_uint8_array
    from multitag.data.table import SPLITS

    folder.mkdir(parents=True, exist_ok=True)
    rows, names = result["per_class"], [r["name"] for r in result["per_class"]]
    by_split = {s: np.array([r[s] for r in rows]) for s in SPLITS if result["split"][s]}
    written = {"label_counts": plots.label_counts(names, by_split, folder / "label_counts.png")}
    if result["multi_label"]:        # as in the report: single-label images carry one label each
        written["labels_per_image"] = plots.labels_per_image(np.array(result["labels_per_image"]),
                                                             folder / "labels_per_image.png")
    examples = list(result["examples"].items())[:EXAMPLE_CLASSES]
    if examples:
        items = [(to_uint8_array(path).permute(1, 2, 0).numpy(), name) for name, path in examples]   # (H, W, 3)
        shown = "" if len(examples) == len(result["examples"]) else f" (the first {len(examples)} classes)"
        written["examples"] = plots.image_grid(items, folder / "examples.png", ncols=min(6, len(items)),
                                               title=f"one training image of each class{shown}")
    return {k: str(v) for k, v in written.items()}


def evaluate(run_dir: str | Path, data: str | None = None, split: str = "test", log=print) -> dict:
    from multitag.evaluation import evaluate_run

    return evaluate_run(run_dir, data, split, log=log)


def calibrate(run_dir: str | Path, data: str | None = None, log=print) -> list[float]:
    """Refit the thresholds on val (model.json's val metrics with them), and rewrite report/ when they moved."""
    from multitag.checkpoint import MODEL_META, read_json
    from multitag.evaluation import calibrate_run
    from multitag.report import rewrite_reports

    meta = Path(run_dir) / MODEL_META
    before = read_json(meta).get("thresholds") if meta.is_file() else None    # a missing one: load says so
    thresholds = calibrate_run(run_dir, data, log=log)
    if thresholds != before:     # the same fit as train's (no --data): the report is already at them
        rewrite_reports(run_dir, log=log)
    return thresholds


def demo_data_dir() -> Path:
    from multitag.config import cache_root

    return cache_root() / "demo_digits"


def demo(out: str | Path = "runs/demo", overrides: list[str] | tuple = (), log=print) -> dict:
    """Build the digit-mosaic dataset, train the demo recipe (replacing an earlier demo run in ``out``),
    then evaluate on its held-out test split."""
    from multitag.demo_data import make_digit_mosaics
    from multitag.predict import load

    csv_path = make_digit_mosaics(demo_data_dir())
    log(f"demo data: {csv_path} (scikit-learn digits tiled 2-4 per image; labels = digits present)")
    run = train("demo", data=str(csv_path), out=out, overrides=overrides, overwrite=True, log=log)   # its own dir
    result = evaluate(run, split="test", log=log)
    model = load(run)
    from multitag.data.formats import read_table

    table = read_table(csv_path)
    test_rows = [i for i, s in enumerate(table.split or []) if s == "test"][:4]
    predictions = model.predict([table.paths[i] for i in test_rows])
    examples = [{"image": table.paths[i], "true": table.labels_of(i), "predicted": p.labels}
                for i, p in zip(test_rows, predictions)]
    return {"run_dir": str(run), "test": result, "examples": examples}
