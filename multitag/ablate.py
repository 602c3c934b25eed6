"""`multitag ablate`: train variants of one config with the same seed and budget, then tabulate them.

Variants are the cartesian product of the varied keys' values (``--vary loss=bce,asl --vary
data.oversample_to=0,600``), optionally times named bundles of overrides from a grid file
(``variants:``, for a step that changes several keys at once, such as "+ augmentation/oversampling").
Each variant trains into DIR/<variant> with ``train.report=false``; DIR/ablation.md and
DIR/ablation.csv are rewritten after every variant. Calling again with the same arguments skips
the finished variants (model.json holds metrics), resumes those with a checkpoint and retrains the
rest, so an interrupted ablation continues where it stopped.

Scores come from the test split at the thresholds calibrated on val when the data has a test
split (multitag.evaluation), else from the val metrics in model.json — whose thresholds were fitted
on that same split, which flatters the F1 columns; the table says which it used.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from multitag.checkpoint import MODEL_META, TRAIN_META, read_json
from multitag.config import Config, apply_overrides, load_config
from multitag.config_checks import check_config
from multitag.data.prepare import require_data
from multitag.errors import UserError
from multitag.fileio import atomic_write_text

SHORTHANDS = {"loss": "train.loss"}       # --vary loss=... is train.loss
RARE_CLASSES = 3                          # per-class F1 columns: the rarest classes in the training split
EVAL_CACHE = "ablation_eval.json"         # a variant's test metrics, so a second call does not recompute them
TABLE_MD, TABLE_CSV = "ablation.md", "ablation.csv"
METRICS = (("mAP", "mAP"), ("micro_f1", "micro-F1"), ("macro_f1", "macro-F1"), ("CF1", "CF1"),
           ("micro_f1_at_0.5", "micro-F1 @0.5"))   # @0.5: no thresholds fitted, so unbiased even on val


@dataclass
class Variant:
    name: str              # e.g. "train.loss=asl,data.oversample_to=600"
    overrides: list[str]   # --set strings applied after the common ones

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name)


# --- the grid -----------------------------------------------------------------------------------

def _split_values(text: str) -> list[str]:
    """Split "a,b,[0.5, 1],c" at top-level commas only, so list values such as aug.scale survive."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "(": 1, "{": 1, "]": -1, ")": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_vary(spec: str) -> tuple[str, list[str]]:
    """``"loss=bce,asl"`` → ("train.loss", ["bce", "asl"]) (shorthands expanded, values as text)."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise UserError(f'--vary expects KEY=VALUE1,VALUE2,..., got "{spec}"; e.g. --vary loss=bce,asl.')
    key = key.strip()
    return SHORTHANDS.get(key, key), _split_values(values)


def _as_text(value) -> str:
    """A grid-file value as --set text (JSON is valid YAML: lists, numbers, booleans, null)."""
    return value if isinstance(value, str) else json.dumps(value)


def load_grid(path: str | Path) -> tuple[dict[str, list], dict[str, dict]]:
    """(vary, variants) from a YAML grid file: ``vary: {key: [values]}`` and/or ``variants: {name:
    {key: value}}``; a file with neither is read as the ``vary`` mapping itself."""
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the grid file {path}: {e}") from None
    if not isinstance(grid, dict):
        raise UserError(f"{path} must hold a mapping: vary: {{key: [values]}} and/or variants: {{name: {{key: value}}}}.")
    if "vary" not in grid and "variants" not in grid:
        grid = {"vary": grid}
    vary = {SHORTHANDS.get(k, k): v if isinstance(v, list) else [v] for k, v in (grid.get("vary") or {}).items()}
    variants = grid.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise UserError(f"{path}: variants must map each name to its overrides, e.g. baseline: {{}}.")
    return vary, {str(name): sets or {} for name, sets in variants.items()}


def expand_variants(vary: dict[str, list], variants: dict[str, dict] | None = None) -> list[Variant]:
    """Named variants (in order) × the cartesian product of the varied keys' values."""
    axes = []
    if variants:
        axes.append([(name, [f"{SHORTHANDS.get(k, k)}={_as_text(v)}" for k, v in sets.items()])
                     for name, sets in variants.items()])
    for key, values in vary.items():
        if not values:
            raise UserError(f'--vary {key} has no values; give at least one, e.g. --vary {key}=A,B.')
        key = SHORTHANDS.get(key, key)
        axes.append([(f"{key}={_as_text(v)}", [f"{key}={_as_text(v)}"]) for v in values])
    if not axes:
        raise UserError("nothing to vary; give --vary KEY=A,B (repeatable) or --grid GRID.yaml.")
    out = [Variant(",".join(name for name, _ in combo), [o for _, sets in combo for o in sets])
           for combo in itertools.product(*axes)]
    dirs = [v.dirname for v in out]
    if len(set(dirs)) < len(dirs):
        dup = next(d for d in dirs if dirs.count(d) > 1)
        raise UserError(f'two variants share the run directory "{dup}"; remove the repeated value.')
    return out


def variant_config(base: Config, data: str | None, overrides, variant: Variant) -> Config:
    """The variant's full config: base, common overrides, the variant's own, then train.report=false.
    Every key is checked here (closest-name errors), before anything trains."""
    def keys(items) -> list[str]:
        return [item.split("=", 1)[0].strip() for item in items]

    clash = [key for key in keys(variant.overrides) if key in keys(overrides)]
    if clash:         # which would win is a guess the table's "common overrides" line would then misstate
        raise UserError(f"variant {variant.name} sets {clash[0]}, which --set also sets for every variant; "
                        "drop one of the two")
    cfg = apply_overrides(base, [*overrides, *variant.overrides, "train.report=false"])
    if data is not None:
        cfg.data.path = str(data)
    require_data(cfg.data)
    try:
        check_config(cfg)
    except UserError as e:
        raise UserError(f"variant {variant.name}: {e}") from None
    return cfg


# --- running ------------------------------------------------------------------------------------

def ablate(config: str | Config | None, data: str | None, vary: dict[str, list], overrides=(),
           out: str | Path | None = None, log=print, variants: dict[str, dict] | None = None) -> Path:
    """Train every variant into ``out``/<variant> and write ``out``/ablation.md and ablation.csv.

    config: recipe name, YAML path or Config; vary: {config key (or "loss"): [values]};
    variants: optional {name: {key: value}} bundles, crossed with ``vary``. Returns ``out``.
    """
    base = config if isinstance(config, Config) else load_config(config)
    grid = expand_variants(vary, variants)
    configs = [variant_config(base, data, overrides, v) for v in grid]
    out = Path(out) if out else Path("runs") / f"ablate-{base.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    log(f"ablation: {len(grid)} variants of {base.recipe or 'the config'} into {out}")
    note_replaced_table(out, [v.name for v in grid], log)
    rows, rare, pinned = [], None, {}
    for i, (variant, cfg) in enumerate(zip(grid, configs)):
        run = out / variant.dirname
        log(f"--- variant {i + 1}/{len(grid)}: {variant.name}")
        # Variants of one model and batch compute alike: the runtime measured for the first is pinned
        # for the rest (a re-measurement under another load may pick other kernels, which alone moves
        # the metrics by about 0.001 mAP).
        key = runtime_key(cfg)
        diverged = run_variant(cfg, run, log, pinned.get(key)) == "diverged"
        if key not in pinned and (run / TRAIN_META).exists():
            pinned[key] = read_json(run / TRAIN_META)["runtime"]
        rare = rare or rarest_classes(run)          # the split is shared, so the first run's serves all
        rows.append(variant_row(variant, run, diverged, rare, log))
        write_tables(out, rows, configs[0], rare, total=len(grid), common=list(overrides))
    log(f"ablation table: {out / TABLE_MD} and {out / TABLE_CSV}")
    return out


def note_replaced_table(out: Path, names: list[str], log) -> None:
    """Say when DIR's table is of another grid: it is rewritten for this one (the other grid's variant
    folders stay, so running that grid again rebuilds its table without training)."""
    if not (out / TABLE_CSV).exists():
        return
    with (out / TABLE_CSV).open(newline="") as f:
        before = [row.get("variant", "") for row in csv.DictReader(f)]
    dropped = [name for name in before if name not in names]
    if dropped:
        log(f"note: {out / TABLE_MD} listed other variants ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}); "
            "it is rewritten for this grid, and their run folders stay")


def is_complete(run: Path) -> bool:
    """A finished run: model.json with the final (val) metrics, written after calibration."""
    return (run / MODEL_META).exists() and "metrics" in read_json(run / MODEL_META)


def runtime_key(cfg: Config) -> str:
    """What a runtime choice depends on: variants that agree on it can share one."""
    m, t = cfg.model, cfg.train
    return json.dumps([m.name, m.args, cfg.data.image_size, t.batch_size, t.accumulate, t.device, t.precision,
                       t.channels_last, t.threads, t.compile], sort_keys=True, default=str)


def run_variant(cfg: Config, run: Path, log, runtime: dict | None = None) -> str:
    """Train one variant unless it is finished (with ``runtime`` pinned, when given); returns
    done | resumed | trained | diverged."""
    from multitag import api
    from multitag.engine import CONFIG_FILE, TrainingDiverged

    if (run / CONFIG_FILE).exists():
        check_same_config(run, cfg)
    if is_complete(run):
        log(f"{run.name}: finished before, skipped")
        return "done"
    (run / EVAL_CACHE).unlink(missing_ok=True)
    resume = (run / TRAIN_META).exists()
    if not resume and run.exists():
        if any(run.iterdir()) and not (run / CONFIG_FILE).exists():
            raise UserError(f"{run} exists and is not a multitag run; move it away or choose another --out.")
        shutil.rmtree(run)          # killed before its first checkpoint: nothing worth keeping
    try:
        if resume:
            log(f"{run.name}: resuming from its checkpoint")
            api.train(resume=run, log=log)
        else:
            api.train(cfg, out=run, log=log, runtime=runtime)
    except TrainingDiverged as e:
        log(f"{run.name}: diverged ({e}); continuing with the next variant")
        return "diverged"
    return "resumed" if resume else "trained"


def check_same_config(run: Path, cfg: Config) -> None:
    """A run directory left by an earlier call must hold this variant's config, else its results
    would be reported under the wrong settings."""
    from multitag.engine import CONFIG_FILE, resolved_config

    expected = yaml.safe_load(yaml.safe_dump(resolved_config(cfg).to_dict(), sort_keys=False))
    found = yaml.safe_load((run / CONFIG_FILE).read_text()) or {}
    changed = _changed_keys(expected, found)
    if changed:
        raise UserError(f"{run} was trained with other settings ({', '.join(changed[:5])}); delete it or "
                        "choose another --out.")


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _changed_keys(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(prefix + k)
    return keys


# --- scoring ------------------------------------------------------------------------------------

def rarest_classes(run: Path, k: int = RARE_CLASSES) -> list[tuple[str, int]]:
    """The k classes with the fewest positives in the run's training split, as (name, count)."""
    from multitag.data.prepare import load_table, resolve_split
    from multitag.engine import load_run_config

    cfg = load_run_config(run)
    table = load_table(cfg.data)
    train = resolve_split(table, run, cfg.data.split_seed, reuse=True) == "train"
    counts = ((table.targets[train] > 0.5) & ~table.ignore[train]).sum(0)
    order = np.argsort(counts, kind="stable")[:k]
    return [(table.class_names[c], int(counts[c])) for c in order]


def has_test_split(run: Path) -> bool:
    from multitag.data.prepare import SPLIT_FILE
    from multitag.data.split import read_split_csv

    return "test" in read_split_csv(run / SPLIT_FILE).values()


def variant_metrics(run: Path, log) -> tuple[str, dict]:
    """(split, metrics): test at the val-calibrated thresholds when there is a test split, else val."""
    from multitag.evaluation import evaluate_run

    if not has_test_split(run):
        return "val", read_json(run / MODEL_META)["metrics"]["val"]
    cache = run / EVAL_CACHE
    if not cache.exists():
        atomic_write_text(cache, json.dumps(evaluate_run(run, split="test", log=log)))
    return "test", json.loads(cache.read_text())


def variant_row(variant: Variant, run: Path, diverged: bool, rare: list[tuple[str, int]], log) -> dict:
    """One table row; metric values are fractions (NaN when absent, e.g. mAP of single-label data)."""
    row = {"variant": variant.name, "status": "diverged" if diverged else "ok", "split": ""}
    row.update({key: math.nan for key, _ in METRICS})
    row.update({f"f1_{name}": math.nan for name, _ in rare})
    from multitag.report import read_history

    epochs = read_history(run)
    # Steps, not epochs, are the budget that oversampling changes; runs of older versions lack them.
    steps = [e.get("steps") for e in epochs]
    row.update(best_epoch="", epochs=len(epochs), steps=sum(steps) if None not in steps else "",
               train_seconds=round(sum(e["seconds"] for e in epochs), 1))
    if diverged:
        return row
    split, m = variant_metrics(run, log)
    row.update(split=split, best_epoch=read_json(run / MODEL_META)["best_epoch"])
    if "calibrated" in m:                          # multi-label
        row.update({key: m["calibrated"][key] for key in ("micro_f1", "macro_f1", "CF1")})
        row.update({"mAP": m["mAP"], "micro_f1_at_0.5": m["at_0.5"]["micro_f1"]})
    else:                                          # single-label: micro-F1 equals accuracy
        row.update(micro_f1=m["accuracy"], macro_f1=m["macro_f1"])
    f1 = {c["name"]: c["f1"] for c in m["per_class"]}
    row.update({f"f1_{name}": f1[name] for name, _ in rare})
    return row


# --- the table ----------------------------------------------------------------------------------

def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_tables(out: Path, rows: list[dict], cfg: Config, rare: list[tuple[str, int]], total: int,
                 common: list[str]) -> None:
    """DIR/ablation.csv (fractions, seconds) and DIR/ablation.md (percentages), atomically.
    Train time is the sum of the epochs' times in metrics.jsonl (training + per-epoch validation)."""
    from multitag.finetune import resolve_stages

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / TABLE_CSV, buf.getvalue())

    splits = {r["split"] for r in rows if r["split"]}
    scored = ("the test split at thresholds calibrated on val" if splits == {"test"} else
              "the val split (its thresholds were fitted on val too, so F1 is optimistic; give the data a "
              "test split for unbiased numbers)" if splits == {"val"} else f"splits {sorted(splits)}")
    epochs = sum(s.epochs for s in resolve_stages(cfg))
    header = ["variant", *(title for _, title in METRICS), *(f"F1 {n} ({c})" for n, c in rare),
              "best epoch", "steps", "train time"]
    about = (f"{len(rows)} of {total} variants; seed {cfg.train.seed}, {epochs} epoch{'s' * (epochs != 1)} each. "
             f"Metrics in % on {scored}; F1 columns at the calibrated thresholds except micro-F1 @0.5; mAP is "
             f"threshold-free. F1 per class for the {len(rare)} rarest classes (training positives in brackets). "
             f"Common overrides: {' '.join(c for c in common if c != 'train.report=false') or 'none'}; "
             "train.report=false. Variants of one model and batch size train on the runtime measured for the first. "
             "Steps are optimizer steps: oversampled variants take more per epoch.")
    lines = [f"# Ablation: {cfg.recipe or 'config'} on {cfg.data.path}", "", about, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["variant"] + (" (diverged)" if r["status"] == "diverged" else ""),
                 *(_pct(r[key]) for key, _ in METRICS), *(_pct(r[f"f1_{n}"]) for n, _ in rare),
                 str(r["best_epoch"]), str(r["steps"] or "—"), _duration(r["train_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / TABLE_MD, "\n".join(lines) + "\n")
