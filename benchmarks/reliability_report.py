"""Write docs/RELIABILITY.md: every reliability case tried, its outcome, and the figures.

    python benchmarks/reliability_report.py                  # ~3 minutes on 2 cores
    python benchmarks/reliability_report.py --kills 10 --fuzz 5000

Nothing in the document is typed by hand. The script
1. runs the reliability test files with pytest (junit XML) and lists every test with its result;
2. runs the case lists those tests use again to record each case's actual outcome: the images
   (tests/test_fuzz_images.py), annotation files (tests/test_fuzz_annotations.py) and tampered
   run directories (tests/test_untrusted_artifacts.py), with the messages users see;
3. fuzzes with the tests' own hypothesis strategies, more examples than the tests run: mutated
   images through decode_image, random and CSV-shaped text through the CSV reader, random COCO JSON;
4. kills `multitag train` subprocesses with SIGKILL/SIGINT at random moments and resumes them
   (tests/test_reliability_runs.py's kill_and_resume), comparing with an uninterrupted run;
5. reads benchmarks/reliability_http.json from benchmarks/reliability_http.py, when present.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as the tests set it, before torch loads

import test_fuzz_annotations as annotations
import test_fuzz_images as images
import test_reliability_runs as runs
import test_untrusted_artifacts as artifacts
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

TEST_FILES = ["tests/test_fuzz_images.py", "tests/test_fuzz_annotations.py", "tests/test_reliability_runs.py",
              "tests/test_cache.py",
              "tests/test_untrusted_artifacts.py", "tests/test_serve.py"]


def cell(text: object, width: int = 160) -> str:
    """Text for a markdown table cell: one line, pipes escaped, long messages cut."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def relative(rows: list[list[object]], root: Path) -> list[list[str]]:
    """Rows with the temporary folder the cases ran in cut from paths: "…/ann/a7/l.csv row 2 ..."."""
    return [[str(c).replace(f"{root}/", "…/") for c in row] for row in rows]


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


# --- 1. pytest -------------------------------------------------------------------------------------

def run_pytest(log) -> tuple[list[list[str]], Counter]:
    """[test, result, seconds] for every test of TEST_FILES, and the results counted."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        log("pytest on the reliability test files ...")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *TEST_FILES], cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
        rows, counts = [], Counter()
        for case in ET.parse(junit).iter("testcase"):
            outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            result = "passed" if outcome is None else outcome.tag
            if result == "skipped" and "xfail" in (outcome.get("type") or "") + (outcome.get("message") or ""):
                result = "xfail (known bug)"
            counts[result] += 1
            if result in ("failure", "error"):     # say why, so a failure in this document can be acted on
                result = f"{result}: {outcome.get('message')}"
            rows.append([f"{case.get('classname').split('.')[-1]}::{case.get('name')}", result,
                         f"{float(case.get('time')):.2f}"])
    return rows, counts


# --- 2. the case lists -----------------------------------------------------------------------------

def image_rows() -> list[list[str]]:
    rows = []
    for case in images.IMAGE_CASES:
        expected = f"decoded {'x'.join(map(str, case.shape))}" if case.error is None else f"{case.error.__name__}"
        kind, detail = images.outcome(case.data(), case.name)
        ok = (kind == "decoded") == (case.error is None)
        rows.append([case.name, expected, f"{kind}: {detail}", "yes" if ok else "NO"])
    return rows


def annotation_rows(tmp: Path) -> list[list[str]]:
    rows = []
    for i, case in enumerate(annotations.ANNOTATION_CASES):
        root = tmp / f"a{i}"
        root.mkdir()
        try:
            result = annotations.case_outcome(root, case)
        except AssertionError as e:            # e.g. a multi-line message: the contract broken
            result = f"contract broken: {e}"
        expected = "read" if case.labels is not None else "UserError"
        status = "yes" if result == "as expected" else ("KNOWN BUG" if case.known_bug else "NO")
        shown = result if result != "as expected" else _message_of(root, case)
        rows.append([case.name, expected, shown + (f" — {case.known_bug}" if case.known_bug else ""), status])
    return rows


def _message_of(root: Path, case) -> str:
    """What reading the case shows the user: the labels read, or the error message."""
    kind, detail = annotations.read_outcome(root / case.entry)
    return f"{kind}: {detail}" if kind == "refused" else f"read: {sorted((k, sorted(v)) for k, v in detail.items())}"


def artifact_rows(run: Path, tmp: Path, image: Path) -> list[list[str]]:
    rows = []
    with artifacts.unpickling_refused():
        for i, case in enumerate(artifacts.ARTIFACT_CASES):
            message = artifacts.artifact_outcome(run, tmp / f"r{i}", case, image)
            rows.append([case.name, case.backend, message, "yes" if case.fragment in message else "NO"])
    return rows


# --- 3. fuzzing with the tests' strategies ----------------------------------------------------------

def fuzz(strategy, check, n: int) -> Counter:
    """Run ``check`` on ``n`` examples of ``strategy`` (hypothesis, no shrinking on failure needed);
    count the outcomes it returns. An exception other than the ones ``check`` handles propagates."""
    counts: Counter = Counter()

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate])
    @given(strategy)
    def probe(example):
        counts[check(example)] += 1

    probe()
    return counts


def fuzz_images(n: int) -> Counter:
    def check(example):
        name, ops = example
        kind, _ = images.outcome(images.mutate(images.seed_bytes(name), ops), f"mutated {name}")
        return kind
    return fuzz(st.tuples(st.sampled_from(sorted(images.SEEDS)), images.OPS), check, n)


def fuzz_text(strategy, file_name: str, n: int, tmp: Path) -> Counter:
    folder_ids = iter(range(10**9))

    def check(text):
        folder = tmp / f"t{next(folder_ids)}"
        folder.mkdir()
        annotations.write_case(folder, {file_name: text})
        try:
            return annotations.read_outcome(folder / file_name)[0]
        except AssertionError:
            annotations.read_outcome(folder / file_name, echoed_breaks_ok=True)   # any other breach still fails
            return "refused in several lines (known bug)"
    return fuzz(strategy, check, n)


# --- 4. kills --------------------------------------------------------------------------------------

def kill_campaign(data: Path, tmp: Path, kills: int, seed: int, log) -> tuple[list[dict], str]:
    """Alternating SIGKILL/SIGINT at random moments, resumed each time; compared with an unbroken run."""
    epochs = max(10, 3 * kills)          # each signal waits for a new checkpoint: leave epochs to hit
    log(f"kill campaign: {kills} signals, {epochs} epochs, seed {seed} ...")
    reference = runs.cli_train(*runs.train_args(data, tmp / "reference", epochs))
    sigs = [signal.SIGKILL if i % 2 == 0 else signal.SIGINT for i in range(kills)]
    events = runs.kill_and_resume(data, tmp / "killed", sigs, random.Random(seed), epochs=epochs)
    assert reference.wait() == 0, reference.stderr.read()
    try:
        runs.assert_same_result(tmp / "killed", tmp / "reference")
        same = "yes"
    except AssertionError as e:         # say what differed, so a failure can be chased
        same = "NO (" + " ".join(str(e).split())[:400] + ")"
    return events, same


# --- the document ----------------------------------------------------------------------------------

def http_section(path: Path) -> tuple[str, dict | None]:
    if not path.exists():
        return f"No HTTP load results: run `python benchmarks/reliability_http.py` first ({path}).", None
    r = json.loads(path.read_text())
    rows = [[name, row["expected"], ", ".join(f"{s}: {n}" for s, n in sorted(row["got"].items()))]
            for name, row in r["by_kind"].items()]
    checks = [[check, "pass" if ok else "FAIL"] for check, ok in r["checks"].items()]
    text = (f"`benchmarks/reliability_http.py`, {r['date']}, {r['machine']}, load average "
            f"{', '.join(f'{x:.1f}' for x in r['load_average'])}: **{r['requests']} requests, {r['concurrency']} "
            f"concurrent** on loopback, {r['requests_per_s']} req/s, latency median {r['latency_ms']['median']} ms, "
            f"p99 {r['latency_ms']['p99']} ms; server exit status after SIGINT: {r['server_exit_status']}.\n\n"
            + table(["request kind", "expected status", "statuses received"], rows)
            + "\n\nServer RSS (MB): " + ", ".join(f"{k} {v}" for k, v in r["rss_mb"].items() if k != "100%")
            + f"; growth {r['rss_growth_mb']} MB after the warm-up, {r['rss_growth_second_half_mb']} MB over the "
              "second half.\n\n" + table(["check", "result"], checks))
    return text, r


def write_document(out: Path, sections: dict, figures: list[list[str]], args, seconds: float) -> None:
    head = f"""# Reliability

Produced by `python benchmarks/reliability_report.py` ({time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s,
{os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}); do not edit by hand.
Every case below was run by that script; "as expected" compares with the outcome the tests require.
Known bugs are cases that do not yet behave as they should: the tests mark them xfail(strict), so
a fix turns them into failures until the mark is removed.

## Figures

{table(["figure", "value"], figures)}
"""
    out.write_text(head + "".join(f"\n## {title}\n\n{body}\n" for title, body in sections.items()))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fuzz", type=int, default=2000, help="mutated images to decode (CSV texts: half, COCO: a quarter)")
    p.add_argument("--kills", type=int, default=6, help="signals sent to training runs (SIGKILL/SIGINT alternating)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100_000, help="seed of the kill delays")
    p.add_argument("--http", default=str(HERE / "reliability_http.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    p.add_argument("--no-pytest", action="store_true", help="skip step 1 (the test run)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    test_rows, test_counts = ([], Counter()) if args.no_pytest else run_pytest(log)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MULTITAG_CACHE"] = str(tmp / "cache")     # like the tests: nothing in ~/.cache
        from bench_inference import demo_run

        log("case lists ...")
        run = demo_run(tmp / "demo")
        data = tmp / "demo" / "digits" / "labels.csv"
        img_rows = image_rows()
        (tmp / "ann").mkdir()
        ann_rows = annotation_rows(tmp / "ann")
        (tmp / "art").mkdir()
        art_rows = artifact_rows(run, tmp / "art", data.parent / "images" / "test_00000.png")
        log(f"fuzzing: {args.fuzz} images, {args.fuzz // 2} CSV texts, {args.fuzz // 4} COCO files ...")
        (tmp / "csv").mkdir()
        (tmp / "coco").mkdir()
        image_fuzz = fuzz_images(args.fuzz)
        csv_fuzz = fuzz_text(st.one_of(st.text(max_size=200), annotations.csv_like()), "labels.csv",
                             args.fuzz // 2, tmp / "csv")
        coco_fuzz = fuzz_text(annotations.coco_like(), "instances.json", args.fuzz // 4, tmp / "coco")
        (tmp / "kill").mkdir()
        events, same = kill_campaign(data, tmp / "kill", args.kills, args.seed, log)
        ann_rows, art_rows = relative(ann_rows, tmp), relative(art_rows, tmp)
        kill_rows = relative([[e["signal"], e["delay_s"], "yes" if e["landed"] else "no (training had finished)",
                               e["checkpointed_epochs"], e["exit_status"], " ".join(e["message"])] for e in events],
                             tmp)

    http_text, http = http_section(Path(args.http))
    landed = [e for e in events if e["landed"]]
    fuzzed = sum(image_fuzz.values()) + sum(csv_fuzz.values()) + sum(coco_fuzz.values())
    figures = [
        ["tests (reliability files + test_serve.py)", ", ".join(f"{n} {k}" for k, n in sorted(test_counts.items()))
         or "not run (--no-pytest)"],
        ["named cases", f"{len(img_rows)} images, {len(ann_rows)} annotation files, {len(art_rows)} run directories"],
        ["cases fuzzed", (f"{fuzzed:,} ({sum(image_fuzz.values()):,} mutated images, {sum(csv_fuzz.values()):,} CSV "
                          f"texts, {sum(coco_fuzz.values()):,} COCO files): each used or refused in a UserError "
                          "naming the file; none raised anything else or crashed")],
        ["kills survived", (f"{len(landed)} of {len(events)} signals landed during training ("
                            + ", ".join(f"{s} {n}" for s, n in Counter(e["signal"] for e in landed).items())
                            + f"); resumed result equals the unbroken run's: {same}")],
        ["requests served", f"{http['requests']:,} at {http['concurrency']} concurrent, "
                            f"{sum(n for s, n in http['statuses'].items() if s.startswith('5'))} 5xx"
         if http else "no HTTP results"],
        ["errors by kind (HTTP)", ", ".join(f"{s}: {n}" for s, n in http["statuses"].items()) if http else "—"],
    ]
    sections = {
        "Images (tests/test_fuzz_images.py)": table(["case", "must be", "outcome", "as expected"], img_rows)
        + "\n\nMutated images (flips, truncations, insertions, deletions of every seed file): "
        + ", ".join(f"{k} {n}" for k, n in image_fuzz.most_common()) + ".",
        "Annotation files (tests/test_fuzz_annotations.py)": table(["case", "must be", "outcome", "as expected"],
                                                                   ann_rows)
        + "\n\nRandom and CSV-shaped text as labels.csv: " + ", ".join(f"{k} {n}" for k, n in csv_fuzz.most_common())
        + ". Random COCO JSON: " + ", ".join(f"{k} {n}" for k, n in coco_fuzz.most_common()) + ".",
        "Tampered run directories (tests/test_untrusted_artifacts.py)":
            "Loaded with `pickle.load`/`loads`/`Unpickler` and `torch.load` replaced by functions that fail: "
            "nothing is unpickled on any path.\n\n"
            + table(["case", "backend", "message", "as expected"], art_rows),
        "Killed and interrupted training (tests/test_reliability_runs.py)":
            f"Seed {args.seed}; `multitag train demo` at 32 px, {max(10, 3 * args.kills)} epochs, one thread; each "
            "signal is sent a random "
            f"0-0.8 s after a new checkpoint appears, then `multitag train --resume` continues the run. Final "
            f"per-epoch losses, val mAP, best epoch and thresholds equal the uninterrupted run's (1e-6): "
            f"**{same}**.\n\n"
            + table(["signal", "delay (s)", "landed", "epochs checkpointed", "exit status", "message"], kill_rows),
        "HTTP service under load (benchmarks/reliability_http.py)": http_text,
        "Every reliability test": table(["test", "result", "seconds"], test_rows) if test_rows else "not run",
    }
    write_document(Path(args.out), sections, figures, args, time.perf_counter() - start)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
