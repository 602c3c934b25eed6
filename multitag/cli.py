"""The `multitag` command: parses, validates and calls the Python API; no logic of its own.

User errors (multitag.errors.UserError) print as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

from multitag import allocator, openmp
from multitag.config import PRUNE_AFTER_DAYS
from multitag.errors import UserError, counted



def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


DATA_HELP = "dataset: CSV, COCO JSON, VOC/YOLO folder or folder per class"


def _add_set(p: argparse.ArgumentParser, set_help: str | None = None) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _add_recipe(p: argparse.ArgumentParser, set_help: str) -> None:
    """The recipe, --data and --set arguments that train, lr-find and ablate share."""
    p.add_argument("config", nargs="?", help="recipe name (see `multitag recipes`) or a YAML config file")
    p.add_argument("--data", help=DATA_HELP)
    _add_set(p, set_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitag", description="Multi-label-first CNN image classification.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a recipe or config on a dataset")
    _add_recipe(p, "override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out and train afresh (without it such an --out is refused)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (starts torchrun; train.batch_size stays the "
                        "global batch); for several machines run torchrun yourself, see README")
    _add_json(p)

    p = sub.add_parser("lr-find", help="learning-rate range test: the loss as the rate grows, and the rate to train at")
    _add_recipe(p, "override a config value, as for train (repeatable)")
    p.add_argument("--out", help="folder for lr_find.csv and lr_find.png (default runs/<recipe>-lr-find-<time>)")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    p.add_argument("--steps", type=int, default=100, help="training batches to sweep over (default 100)")
    p.add_argument("--stage", type=int, default=0, help="stage of a staged recipe to sweep (0-based, default 0)")
    _add_json(p)

    p = sub.add_parser("data", help="look at a dataset as train would read it: classes, split, counts, problems",
                       description="Reads PATH as `multitag train` would (format, classes, split, difficult pairs) "
                                   "and reads every image's header and bytes once: no training, no image cache.",
                       epilog="exit status: 0 when no problems were found, 1 when some were (missing, unreadable "
                              "or oversized images, identical files), 2 on an error (e.g. no such PATH)")
    p.add_argument("path", metavar="PATH", help=DATA_HELP)
    p.add_argument("--recipe", dest="config", metavar="RECIPE",
                   help="recipe name or YAML config whose data settings apply (default: the defaults)")
    _add_set(p, "override a data setting, as for train, e.g. --set data.format=voc (repeatable)")
    p.add_argument("--plot", metavar="DIR", help="write label_counts.png, labels_per_image.png (multi-label) and "
                   "examples.png (one training image of each class) to DIR")
    _add_json(p)

    p = sub.add_parser("eval", help="metrics of a run on a split: at 0.5, calibrated thresholds and top-3")
    p.add_argument("run_dir")
    p.add_argument("--data", help="dataset to evaluate on (default: the training data)")
    p.add_argument("--split", default="test", help="train, val, test or all (default test)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write RUN_DIR/report/ (report-<name>/ for --data, report@<split>/ for another --split)")
    _add_json(p)

    p = sub.add_parser("calibrate", help="fit per-class thresholds on the validation split")
    p.add_argument("run_dir")
    p.add_argument("--data", help="dataset whose val split to use (default: the training data)")
    _add_json(p)

    p = sub.add_parser("predict", help="predict labels of image files, folders and globs (CSV, JSON or text)")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or quoted globs such as 'photos/**/*.jpg'")
    p.add_argument("--threshold", default="calibrated", help='"calibrated" (default) or a number such as 0.5')
    p.add_argument("--top-k", type=int, help="return the k best classes instead of thresholding")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--format", choices=["text", "csv", "json"],
                   help="output format (default: text, or from the --out suffix: .json → json, else csv)")
    p.add_argument("--out", metavar="FILE", help="write the predictions to FILE instead of stdout")
    p.add_argument("--backend", default="auto",
                   help="auto (ONNX Runtime when RUN_DIR/model.onnx exists, else PyTorch), torch, onnx or onnx-int8")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="same as --format json")

    p = sub.add_parser("report", help="write RUN_DIR/report/index.html with plots (curves, per-class, PR, errors, Grad-CAM)")
    p.add_argument("run_dir")
    p.add_argument("--data", help="dataset to report on (default: the training data)")
    p.add_argument("--split", default="test",
                   help="split to report on (default test, in RUN_DIR/report/, or val when there is no test; "
                        "another split writes report@<split>/)")
    _add_json(p)

    p = sub.add_parser("explain", help="Grad-CAM heat map of a class on an image, written as a PNG")
    p.add_argument("run_dir")
    p.add_argument("image")
    p.add_argument("--class", dest="class_name", help="class to explain (default: the top-scoring class)")
    p.add_argument("--method", default="gradcam", help="gradcam (default) or gradcam++")
    p.add_argument("--out", help="output .png file, or a folder for the default name (default: "
                   "<image name>.<class>.cam.png in the current folder)")
    _add_json(p)

    p = sub.add_parser("export", help="export a run to ONNX (with a parity check against PyTorch)")
    p.add_argument("run_dir")
    # model.onnx is always written; --onnx is still accepted (it was documented) but no longer offered
    p.add_argument("--onnx", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx and measure its accuracy cost on the val split")
    p.add_argument("--int8-method", default="static", choices=["static", "dynamic"],
                   help="static (default: QDQ calibrated on 64 train images; fast) or dynamic "
                        "(ORT dynamic quantisation; slower than fp32 on convolutions here)")
    p.add_argument("--data", help="dataset whose images the checks use (default: the run's own; when that is "
                   "gone, the fp32 parity check runs on synthetic images and --int8 is refused)")
    _add_json(p)

    p = sub.add_parser("serve", help="HTTP prediction service (FastAPI): POST /predict, GET /labels, GET /health")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max-mb", type=positive(float), default=20, help="largest request body in MB (default 20)")
    p.add_argument("--max-megapixels", type=positive(float), default=40,
                   help="largest image in megapixels (default 40)")
    p.add_argument("--max-batch", type=positive(int), default=32, help="most images per request (default 32)")

    p = sub.add_parser("app", help="Streamlit web app: upload images, see labels, scores and Grad-CAM")
    p.add_argument("run_dir")
    p.add_argument("--port", type=port_number, default=8501)

    p = sub.add_parser("ablate", help="train variants of a recipe (same seed and budget) and tabulate their metrics")
    _add_recipe(p, "override a config value in every variant (repeatable)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=A,B",
                   help="a config key and its values, e.g. --vary loss=bce,asl --vary data.oversample_to=0,600 "
                        "(repeatable; the variants are all combinations; loss= means train.loss)")
    p.add_argument("--grid", metavar="GRID.yaml",
                   help="YAML with vary: {key: [values]} and/or variants: {name: {key: value}} (named bundles)")
    p.add_argument("--out", metavar="DIR",
                   help="ablation directory (default runs/ablate-<recipe>-<time>); run again with the same "
                        "--out to resume: finished variants are skipped")
    _add_json(p)

    p = sub.add_parser("bench", help="training, data pipeline, inference and scaling speed vs a naive PyTorch loop")
    p.add_argument("--data", default="digits",
                   help='"digits" (built-in mosaics, default) or a dataset path, e.g. ../shared/data/voc2007')
    p.add_argument("--model", default="advanced_cnn", help="architecture (its recipe sets augmentation and optimizer)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="training images used (default 512; val: a quarter, at least one batch)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per system and round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are each system's best")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row (slow to compile)")
    p.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers of the naive loop (default 0)")
    p.add_argument("--scaling", default="1,4,16", help='dataset multiples for the scaling rows (default 1,4,16; "" skips)')
    p.add_argument("--no-inference", dest="inference", action="store_false", help="skip the ONNX / int8 rows")
    p.add_argument("--inference-rounds", type=int, default=10)
    _add_json(p)

    p = sub.add_parser("cache", help="list the decode-once image caches, or prune / clear them")
    p.add_argument("action", nargs="?", default="list", choices=["list", "prune", "clear"],
                   help="list (default); prune: those unused for --older-than days and broken ones; clear: all")
    p.add_argument("--older-than", type=float, default=float(PRUNE_AFTER_DAYS), metavar="DAYS",
                   help=f"prune's age limit (default {PRUNE_AFTER_DAYS})")
    p.add_argument("--dir", help="cache directory (default: <cache root>/images, as data.cache_dir's default)")
    p.add_argument("--dry-run", action="store_true", help="say what prune / clear would remove, remove nothing")
    _add_json(p)

    p = sub.add_parser("models", help="list the model architectures")
    _add_json(p)
    p = sub.add_parser("recipes", help="list the training recipes")
    _add_json(p)

    p = sub.add_parser("demo", help="train, calibrate, evaluate and predict on built-in digit mosaics (no download)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    _add_set(p)
    _add_json(p)
    return parser


# --- handlers: call the API, print for people (or return data for --json) -----------------------

def _log_for(args):
    """Human progress goes to stderr under --json so stdout stays valid JSON."""
    return (lambda *a: print(*a, file=sys.stderr)) if getattr(args, "json", False) else print


def _print_metrics(result: dict, title: str) -> None:
    from rich.console import Console

    from multitag.summary import metrics_table

    console = Console()
    console.print(title)
    console.print(metrics_table(result))


def cmd_train(args):
    from multitag import api

    if args.nproc is not None and args.nproc != 1:
        from multitag.distributed import launch_local

        launch_local(args.nproc, _train_argv(args))      # rank 0 prints the --json result
        return None
    run = api.train(args.config, data=args.data, out=args.out, overrides=args.overrides, resume=args.resume,
                    overwrite=args.overwrite, log=_log_for(args))
    from multitag.distributed import is_main

    return {"run_dir": str(run)} if is_main() else None


def cmd_lr_find(args):
    from dataclasses import asdict

    from multitag import api

    result = api.lr_find(args.config, data=args.data, out=args.out, overrides=args.overrides, start=args.start,
                         end=args.end, steps=args.steps, stage=args.stage, log=_log_for(args))
    if not args.json:
        ended = "the loss blew up" if result.stopped_early else "the last rate"
        print(f"swept {result.steps} steps to {ended}; lowest loss at lr {result.min_loss_lr:.2g}\n"
              f"suggested: --set {result.setting}\ncurve: {result.plot}")
    return asdict(result)


def cmd_data(args):
    from multitag import api

    result = api.inspect_data(args.path, config=args.config, overrides=args.overrides, plot=args.plot,
                              log=_log_for(args))
    if not args.json:
        from multitag.data.overview import print_survey

        print_survey(result)
        for path in result.get("plots", {}).values():
            print(f"wrote {path}")
    return result


def _train_argv(args) -> list[str]:
    """The `multitag train` arguments of ``args`` without --nproc, for the processes torchrun starts."""
    argv = [args.config] if args.config else []
    for flag, value in (("--data", args.data), ("--out", args.out), ("--resume", args.resume)):
        argv += [flag, value] if value is not None else []
    argv += [item for setting in args.overrides for item in ("--set", setting)]
    return argv + (["--overwrite"] if args.overwrite else []) + (["--json"] if args.json else [])


def cmd_eval(args):
    from multitag.evaluation import score_run
    from multitag.fileio import check_writable
    from multitag.report import report_folder

    if args.report:      # before scoring, so --json output is not lost
        check_writable(report_folder(args.run_dir, args.data, args.split), directory=True)
    scored = score_run(args.run_dir, data=args.data, split=args.split, log=_log_for(args))
    result = scored.result
    if not args.json:
        _print_metrics(result, f"{args.run_dir}: {result['split']} split, {result['num_images']} images")
    if args.report:
        from multitag.report import write_report

        index = write_report(args.run_dir, data=args.data, log=_log_for(args), scored=scored)
        result["report"] = str(index)
    return result


def cmd_calibrate(args):
    from multitag import api

    thresholds = api.calibrate(args.run_dir, data=args.data, log=_log_for(args))
    if not args.json:
        print(f"calibrated {len(thresholds)} per-class thresholds on the val split; stored in {args.run_dir}/model.json")
    return {"thresholds": thresholds}


def _predict_format(args) -> str:
    """--json, else --format, else from the --out suffix (.json → json, anything else csv), else text.
    --json with another --format is refused; a --format unlike the --out suffix is said, then obeyed."""
    if args.json and args.format not in (None, "json"):
        raise UserError(f"--json means --format json, but --format {args.format} was given too; pass one of them.")
    fmt = "json" if args.json else args.format
    by_suffix = None if not args.out else "json" if args.out.lower().endswith(".json") else "csv"
    if fmt and by_suffix and (fmt == "json") != (by_suffix == "json"):
        print(f"multitag predict: writing {fmt} to {args.out}, as --format says (its suffix suggests {by_suffix})",
              file=sys.stderr)
    return fmt or by_suffix or "text"


def cmd_predict(args):
    from multitag.fileio import atomic_write, check_writable
    from multitag.predict import (check_top_k, check_top_k_alone, expand_images, load, parse_threshold,
                                  write_predictions)

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    fmt = _predict_format(args)          # conflicts are said before any image is scored
    if args.out:
        check_writable(args.out)         # now, not after every image was scored
    threshold = parse_threshold(args.threshold, "--threshold")
    check_top_k_alone(args.top_k, threshold, "--top-k", "--threshold")
    model = load(args.run_dir, device=args.device, backend=args.backend)
    check_top_k(args.top_k, len(model.class_names), "--top-k")
    paths = expand_images(args.images)
    print(f"predicting {counted(len(paths), 'file')} on the {model.backend} backend ({model.runtime.device})",
          file=sys.stderr)
    preds = list(model.predict_each(paths, threshold=threshold, top_k=args.top_k, batch_size=args.batch_size,
                                    progress=True))
    if args.out:
        def write(tmp):
            with open(tmp, "w", newline="") as f:      # newline="": the csv module writes its own
                write_predictions(preds, model.class_names, fmt, f)
        atomic_write(args.out, write)
        print(f"wrote {len(preds)} predictions to {args.out} ({fmt})", file=sys.stderr)
    else:
        write_predictions(preds, model.class_names, fmt, sys.stdout)
    failed = sum(p.error is not None for p in preds)
    if failed == len(preds):
        raise UserError(f"none of the {counted(failed, 'file')} could be read as an image (reasons in the output).")
    if failed:
        print(f"multitag predict: {failed} of {counted(len(preds), 'file')} could not be read; "
              "they are listed in the output with the reason", file=sys.stderr)
    # returns None: the predictions were printed above in the asked-for format, not by main()


def cmd_models(args):
    from multitag.models.registry import describe_models

    rows = describe_models()
    if not args.json:
        width = max(len(r["name"]) for r in rows) + 2
        for r in rows:
            gflops = ("≥" if r["gflops_partial"] else " ") + f"{r['gflops']:.2f}"
            print(f"{r['name']:<{width}}{r['parameters']:>11,} params {gflops:>7} GFLOPs @{r['input_size']}px, "
                  f"10 classes   {r['description']}")
        print(f"{'timm/<arch>':<{width}}any timm architecture, e.g. timm/resnet34 (weights from a local file via model.weights);"
              " timm/<arch>.<tag> (e.g. timm/resnet18.a1_in1k) also takes that tag's mean and std")
    return rows


def cmd_recipes(args):
    from multitag.config import describe_recipes

    rows = describe_recipes()
    if not args.json:
        for r in rows:
            print(f"{r['name']:<18} {r['notes']}")
    return rows


def cmd_cache(args):
    from pathlib import Path

    from multitag.data import cache_admin
    from multitag.data.cache import default_cache_dir

    if args.older_than < 0:
        raise UserError(f"--older-than must be 0 days or more, got {args.older_than:g}.")
    folder = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    if args.action == "list":
        rows = [e.as_row() for e in cache_admin.list_caches(folder)]
        if not args.json:
            _print_caches(folder, rows)
        return rows
    result = cache_admin.prune(folder, args.older_than if args.action == "prune" else None, args.dry_run)
    if not args.json:
        verb = "would remove" if args.dry_run else "removed"
        gone, temps = result["removed"], result["temporaries"]
        for r in gone:
            print(f"{verb} {r['cache']} ({r['images']:,} images, {r['bytes'] / 2**20:,.1f} MiB, last used "
                  f"{r['last_used']}{'' if r['complete'] else ', incomplete'}) {r['source']}")
        print(f"{verb} {len(gone)} cache{'s' * (len(gone) != 1)} and {len(temps)} leftover temporar"
              f"{'ies' if len(temps) != 1 else 'y'} from {folder}: {result['bytes'] / 2**20:,.1f} MiB; "
              f"{result['kept']} kept")
    return result


def _print_caches(folder, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"image caches in {folder}", title_justify="left")
    for name in ("cache", "images", "px", "MiB", "last used", "source"):
        table.add_column(name, justify="right" if name in ("images", "px", "MiB") else "left")
    for r in rows:
        note = "" if r["complete"] else "  (incomplete: prune removes it)"
        table.add_row(r["cache"], f"{r['images']:,}", str(r["image_size"]), f"{r['bytes'] / 2**20:,.1f}",
                      r["last_used"], (r["source"] or "?") + note)
    console = Console()
    console.print(table)
    console.print(f"{len(rows)} cache{'s' * (len(rows) != 1)}, {sum(r['bytes'] for r in rows) / 2**20:,.1f} MiB; "
                  f"`multitag cache prune` removes those unused for {PRUNE_AFTER_DAYS} days")


def cmd_demo(args):
    from multitag import api

    result = api.demo(args.out, overrides=args.overrides, log=_log_for(args))
    if not args.json:
        _print_metrics(result["test"], f"demo: held-out test split, {result['test']['num_images']} images")
        for ex in result["examples"]:
            print(f"  {ex['image']}: true {' '.join(ex['true'])}  predicted {' '.join(ex['predicted']) or '(none)'}")
        print(f"run directory: {result['run_dir']}  (try: multitag predict {result['run_dir']} IMAGE)")
    return result


def cmd_ablate(args):
    from multitag.ablate import TABLE_CSV, TABLE_MD, ablate, load_grid, parse_vary

    vary, variants = load_grid(args.grid) if args.grid else ({}, {})
    vary.update(parse_vary(spec) for spec in args.vary)
    out = ablate(args.config, args.data, vary, args.overrides, args.out, log=_log_for(args), variants=variants)
    if not args.json:
        print((out / TABLE_MD).read_text())
    return {"out_dir": str(out), "markdown": str(out / TABLE_MD), "csv": str(out / TABLE_CSV)}


def cmd_bench(args):
    from multitag.bench import BenchOptions, print_bench, run_bench

    try:
        scaling = tuple(int(k) for k in args.scaling.split(",") if k.strip())
    except ValueError:
        raise UserError(f'--scaling must be whole numbers separated by commas, such as 1,4,16, got "{args.scaling}".') from None
    opts = BenchOptions(data=args.data, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                        images=args.images, steps=args.steps, rounds=args.rounds, device=args.device,
                        threads=args.threads, compile=args.compile, naive_workers=args.naive_workers,
                        scaling=scaling, inference=args.inference, inference_rounds=args.inference_rounds)
    result = run_bench(opts, log=lambda *a: print(*a, file=sys.stderr))
    if not args.json:
        print_bench(result)
    return result


def cmd_report(args):
    from multitag.report import write_report

    index = write_report(args.run_dir, data=args.data, split=args.split, log=_log_for(args))
    if not args.json:
        print(f"report: {index}")
    return {"report": str(index)}


def cmd_explain(args):
    from multitag.explain import explain_to_png

    out = explain_to_png(args.run_dir, args.image, class_name=args.class_name, method=args.method, out=args.out)
    if not args.json:
        print(f"wrote {out}")
    return {"png": str(out)}


def cmd_export(args):
    from multitag.export import export_onnx

    result = export_onnx(args.run_dir, int8=args.int8, log=_log_for(args), data=args.data,
                         int8_method=args.int8_method)
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def cmd_serve(args):
    from multitag.serve import serve

    serve(args.run_dir, host=args.host, port=args.port, max_bytes=int(args.max_mb * 2**20),
          max_pixels=int(args.max_megapixels * 1e6), max_batch=args.max_batch)


def cmd_app(args):
    from multitag.app import launch

    code = launch(args.run_dir, port=args.port)
    if code:
        raise UserError(f"Streamlit stopped with exit status {code}; its own message is above.")


HANDLERS = {"report": cmd_report, "explain": cmd_explain, "export": cmd_export, "serve": cmd_serve, "app": cmd_app,
            "train": cmd_train, "eval": cmd_eval, "calibrate": cmd_calibrate, "predict": cmd_predict,
            "models": cmd_models, "bench": cmd_bench, "recipes": cmd_recipes, "demo": cmd_demo, "ablate": cmd_ablate,
            "cache": cmd_cache, "lr-find": cmd_lr_find, "data": cmd_data}


def _resume_hint(args) -> str:
    """What a stopped `train` kept and the command that continues it ("" for other commands).

    Every finished epoch ends with a checkpoint, so a stop loses at most the epoch in progress.
    """
    if args.command != "train":
        return ""
    run = args.resume or args.out
    if run is None:   # the API chose the directory and logged it when training started
        return ("; the checkpoint of the last completed epoch is kept in the run directory printed above: "
                "continue with `multitag train --resume RUN_DIR`")
    epoch = _checkpoint_epoch(run)
    if epoch is None:
        return f"; no epoch of {run} had finished, so there is nothing to resume: run the same command again"
    return f"; the checkpoint of epoch {epoch} is kept: continue with `multitag train --resume {run}`"


def _checkpoint_epoch(run: str) -> int | None:
    """Epochs completed according to RUN's last checkpoint, or None when it is absent or unreadable."""
    from multitag.checkpoint import read_checkpoint_meta

    try:
        return int(read_checkpoint_meta(run)["state"]["epoch"])
    except (UserError, KeyError, TypeError, ValueError):
        return None


def _rank_label() -> str:
    """" (rank 1 of 2)" in a process torchrun started among several, so each error says whose it is."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '0')} of {size})" if size > 1 else ""


def positive(kind):
    """An argparse type: a number of ``kind`` above 0 (a limit of 0 would refuse every request)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__} above 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def port_number(text: str) -> int:
    """--port: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; use a number from 1 to 65535 (0: any free one)")
    return port


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """multitag's own warnings (e.g. a stale model.onnx, so the torch backend is used) as one line like its
    errors, not Python's file:line: UserWarning + source line; other libraries' keep Python's format."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            print(f"multitag {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = default


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        openmp.choose_wait_policy(args.command)   # before torch loads: libgomp reads it then
        allocator.keep_freed_memory()     # before any tensor: large blocks are then reused, not mmapped anew
        with _warnings_as_lines(args.command):
            result = HANDLERS[args.command](args)
    except UserError as e:
        from multitag.fileio import DiskFullError

        hint = _resume_hint(args) if isinstance(e, DiskFullError) else ""
        print(f"multitag {args.command}{_rank_label()}: error: {e}{hint}", file=sys.stderr)
        return 2
    except OSError as e:
        from multitag.fileio import os_error

        error = os_error(e)
        if error is None:
            raise
        print(f"multitag {args.command}{_rank_label()}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not _rank_label() or os.environ.get("RANK") == "0":    # one line for a job of several processes
            print(f"multitag {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        from multitag.fileio import json_safe

        try:
            print(json.dumps(json_safe(result), indent=2, default=str, allow_nan=False))
            sys.stdout.flush()
        except BrokenPipeError:      # `... --json | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
    return _exit_status(args.command, result)


def _exit_status(command: str, result) -> int:
    """0, or 1 where `multitag data` found problems in the data (so CI can gate on it); errors are 2."""
    return 1 if command == "data" and result["problem_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
