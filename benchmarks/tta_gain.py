"""What flip test-time augmentation (model.args.tta_flip) is worth on a trained run, same weights both ways.

    .venv/bin/python benchmarks/tta_gain.py RUN_DIR [--split test] [--data PATH]

The run is copied to a temporary folder whose model.json asks for tta_flip, and both are scored on the
split: the difference is the flip alone (the thresholds of a multi-label run were fitted without it, so
its calibrated set metrics are shown for completeness; mAP and accuracy do not depend on them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multitag.api import evaluate  # noqa: E402
from multitag.runtime import describe_cpu  # noqa: E402

HEADLINE = ("accuracy", "top5", "macro_f1", "mAP")


def headline(result: dict) -> dict:
    return {k: result[k] for k in HEADLINE if k in result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--data")
    a = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        flipped = Path(tmp) / Path(a.run_dir).name
        shutil.copytree(a.run_dir, flipped, ignore=shutil.ignore_patterns("report*", "*.onnx"))
        meta = json.loads((flipped / "model.json").read_text())
        meta["model"]["args"]["tta_flip"] = True
        meta.pop("export", None)                     # the copied record would name files not copied
        (flipped / "model.json").write_text(json.dumps(meta))
        for label, run in (("one view", a.run_dir), ("flip TTA", flipped)):
            start = time.perf_counter()
            result = evaluate(run, data=a.data, split=a.split, log=lambda *m: None)
            rows[label] = {**headline(result), "seconds": round(time.perf_counter() - start, 1)}
    print(f"CPU: {describe_cpu()}; run {a.run_dir}, split {a.split}")
    keys = [k for k in HEADLINE if k in rows["one view"]]
    print("| scoring | " + " | ".join(keys) + " | seconds |")
    print("|---|" + "---|" * (len(keys) + 1))
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(f"{100 * r[k]:.2f}" for k in keys) + f" | {r['seconds']} |")


if __name__ == "__main__":
    main()
