"""Bounded loopback load test of `multitag serve`: mixed good and bad uploads, status counts, server memory.

    python benchmarks/reliability_http.py                        # 2,000 requests, 16 at a time
    python benchmarks/reliability_http.py --requests 300         # a quick check
    python benchmarks/reliability_http.py --run RUN_DIR          # serve a trained run (default: a 1-epoch demo run)

The server is the real command (`python -m multitag.cli serve RUN --port P`) in a subprocess on
127.0.0.1 and a free port, stopped with SIGINT at the end. Its limits are set low so that the
"too large" inputs stay cheap to send: --max-mb 1, --max-megapixels 0.25, --max-batch 32.
Requests cycle through KINDS (weighted), each with the status it must get; 16 client threads
share one httpx connection pool. The server's resident memory (psutil, else /proc/PID/status
VmRSS) is read after a warm-up (the first 10 % of the requests) and after each further quarter,
and sampled every 0.25 s for the peak.

Pass: no 5xx, no transport error, every kind answered with its expected status, the RSS at the
end within max(16 MB, 5 %) of the RSS after the warm-up, and within 8 MB of the RSS half-way.
Prints a table, writes JSON (default benchmarks/reliability_http.json) that
benchmarks/reliability_report.py reads.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_inference import demo_run  # one demo-run recipe for the benchmarks
from test_fuzz_images import _animated_gif, _corrupt_idat, _png_bomb  # the fuzz suite's hostile files

MAX_MB, MAX_MEGAPIXELS, MAX_BATCH = 1, 0.25, 32
# After the warm-up, allocator caches and thread pools still fill up a little (~20 MB over the
# first half here); a leak keeps growing, so the second half's growth is held to a few MB.
GROWTH_ALLOWED_MB, GROWTH_ALLOWED_FRACTION, SECOND_HALF_ALLOWED_MB = 16, 0.05, 8


class Kind(NamedTuple):
    """One kind of request: its share of the mix, how to send it, and the status it must get."""

    name: str
    weight: int
    expected: int
    request: dict          # keyword arguments of httpx.Client.post


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _file(name: str, data: bytes, mime: str = "image/png") -> dict:
    return {"files": {"file": (name, data, mime)}}


def request_kinds(images: list[Path]) -> list[Kind]:
    """The request mix. Good images are the demo's digit mosaics (PNG, and the same as JPEG)."""
    good = images[0].read_bytes()
    as_jpeg = io.BytesIO()
    Image.open(images[1]).convert("RGB").save(as_jpeg, "JPEG", quality=90)
    return [
        Kind("good png", 40, 200, _file(images[0].name, good)),
        Kind("good jpeg", 10, 200, _file("digits.jpg", as_jpeg.getvalue(), "image/jpeg")),
        Kind("good batch of 8", 5, 200, {"files": [("files", (p.name, p.read_bytes(), "image/png")) for p in images[:8]]}),
        Kind("corrupt png pixel data", 8, 415, _file("corrupt.png", _corrupt_idat(good))),
        Kind("truncated png", 5, 415, _file("truncated.png", good[: len(good) // 2])),
        Kind("animated gif cut short (was a 500)", 4, 415,
             _file("cut.gif", _animated_gif()[: len(_animated_gif()) * 3 // 8], "image/gif")),
        Kind("text named .jpg", 5, 415, _file("notes.jpg", b"not an image at all", "image/jpeg")),
        Kind("empty file", 5, 400, _file("empty.png", b"")),
        Kind("empty body", 5, 400, {"content": b""}),
        Kind("image over the pixel limit", 5, 413, _file("big.png", _png((600, 600)))),
        Kind("decompression bomb (20000x20000)", 4, 413, _file("bomb.png", _png_bomb())),
        Kind("body over the byte limit", 4, 413, _file("huge.png", os.urandom(int(1.1 * MAX_MB * 2**20)))),
        Kind("33 files (over max batch)", 4, 413, {"files": [("files", (f"{i}.png", good, "image/png"))
                                                             for i in range(MAX_BATCH + 1)]}),
    ]


# --- the server --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int) -> subprocess.Popen:
    """`multitag serve` in a subprocess; returns once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "multitag.cli", "serve", str(run), "--port", str(port),
                             "--max-mb", str(MAX_MB), "--max-megapixels", str(MAX_MEGAPIXELS),
                             "--max-batch", str(MAX_BATCH)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"multitag serve exited with status {proc.returncode} before answering")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("multitag serve did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGINT (uvicorn's graceful stop), then SIGKILL after 15 s; the exit status."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB: psutil when installed, else /proc/PID/status."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"cannot read the memory of process {pid}")


class PeakSampler(threading.Thread):
    """Samples a process's RSS every ``period`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self.stopped = pid, period, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.peak = max(self.peak, rss_mb(self.pid))


# --- the load ----------------------------------------------------------------------------------------

def schedule(kinds: list[Kind], n: int) -> list[Kind]:
    """``n`` requests cycling through the kinds in proportion to their weights (deterministic)."""
    cycle = [k for k in kinds for _ in range(k.weight)]
    order = np.random.default_rng(0).permutation(len(cycle))
    return [cycle[i] for i in itertools.islice(itertools.cycle(order), n)]


def send(client: httpx.Client, url: str, kind: Kind) -> tuple[str, int | str, float]:
    """(kind, status or transport error name, seconds)."""
    start = time.perf_counter()
    try:
        status = client.post(url, **kind.request).status_code
    except httpx.TransportError as e:
        status = type(e).__name__
    return kind.name, status, time.perf_counter() - start


def load_test(port: int, pid: int, kinds: list[Kind], n: int, concurrency: int, log) -> dict:
    """Send ``n`` requests; the first 10 % warm the server up (thread pools, allocator caches), then
    the RSS is read after each further quarter."""
    url = f"http://127.0.0.1:{port}/predict"
    plan = schedule(kinds, n)
    warmup = max(concurrency, n // 10)
    marks = [warmup + (n - warmup) * q // 4 for q in range(5)]      # warm-up end, 25/50/75/100 % of the rest
    results, rss = [], {}
    sampler = PeakSampler(pid)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=60, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        results.extend(pool.map(lambda k: send(client, url, k), plan[:warmup]))
        rss["after warm-up"] = rss_mb(pid)
        sampler.start()
        start = time.perf_counter()
        for q, (a, b) in enumerate(itertools.pairwise(marks), 1):
            results.extend(pool.map(lambda k: send(client, url, k), plan[a:b]))
            rss[f"{25 * q}%"] = rss_mb(pid)
            log(f"  {b}/{n} requests, server RSS {rss[f'{25 * q}%']:.1f} MB")
        seconds = time.perf_counter() - start
        sampler.stopped.set()
    rss["end"] = rss["100%"]
    rss["peak"] = max(sampler.peak, *rss.values())
    return summarise(kinds, results, rss, seconds, n - warmup, concurrency)


def summarise(kinds: list[Kind], results: list[tuple], rss: dict, seconds: float, timed: int,
              concurrency: int) -> dict:
    """Counts by kind and status, the pass/fail checks, throughput and latency."""
    expected = {k.name: k.expected for k in kinds}
    by_kind: dict[str, Counter] = {k.name: Counter() for k in kinds}
    latencies = sorted(t for _, _, t in results)
    for name, status, _ in results:
        by_kind[name][str(status)] += 1
    statuses = Counter(str(s) for _, s, _ in results)
    growth, second_half = rss["end"] - rss["after warm-up"], rss["end"] - rss["50%"]
    allowed = max(GROWTH_ALLOWED_MB, GROWTH_ALLOWED_FRACTION * rss["after warm-up"])
    checks = {
        "no 5xx": not any(s.startswith("5") for s in statuses),
        "no transport errors": all(s.isdigit() for s in statuses),
        "every kind got its expected status": all(set(c) == {str(expected[k])} for k, c in by_kind.items() if c),
        f"RSS growth after the warm-up within {allowed:.0f} MB": growth <= allowed,
        f"RSS growth over the second half within {SECOND_HALF_ALLOWED_MB} MB": second_half <= SECOND_HALF_ALLOWED_MB,
    }
    return {
        "requests": len(results), "concurrency": concurrency, "statuses": dict(sorted(statuses.items())),
        "by_kind": {k: {"expected": expected[k], "got": dict(c)} for k, c in by_kind.items()},
        "rss_mb": {k: round(v, 1) for k, v in rss.items()}, "rss_growth_mb": round(growth, 1),
        "rss_growth_second_half_mb": round(second_half, 1),
        "requests_per_s": round(timed / seconds, 1),
        "latency_ms": {"median": round(1000 * latencies[len(latencies) // 2], 1),
                       "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1)},
        "checks": checks, "passed": all(checks.values()),
    }


def print_table(r: dict) -> None:
    print(f"\n{r['requests']} requests, {r['concurrency']} concurrent: {r['requests_per_s']} req/s, "
          f"latency median {r['latency_ms']['median']} ms, p99 {r['latency_ms']['p99']} ms")
    print(f"{'kind':<36}{'expected':>9}  got")
    for name, row in r["by_kind"].items():
        print(f"{name:<36}{row['expected']:>9}  {', '.join(f'{s}: {n}' for s, n in sorted(row['got'].items()))}")
    print("statuses: " + ", ".join(f"{s}: {n}" for s, n in r["statuses"].items()))
    print("server RSS (MB): " + ", ".join(f"{k} {v}" for k, v in r["rss_mb"].items() if k != "100%")
          + f"; growth {r['rss_growth_mb']} MB after the warm-up, {r['rss_growth_second_half_mb']} MB "
            "over the second half")
    for check, ok in r["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {check}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="trained run directory (default: train a 1-epoch demo run in a temp dir)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default=str(HERE / "reliability_http.json"), help="JSON results file")
    return p.parse_args(argv)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log("preparing the run and the request images ...")
        run = Path(args.run) if args.run else demo_run(Path(tmp))
        from multitag.demo_data import make_digit_mosaics

        images = sorted((make_digit_mosaics(Path(tmp) / "images", {"train": 0, "val": 0, "test": 16}, seed=2)
                         .parent / "images").glob("test_*.png"))
        port = free_port()
        server = start_server(run, port)
        log(f"multitag serve {run} on 127.0.0.1:{port} (pid {server.pid}); {args.requests} requests ...")
        try:
            result = load_test(port, server.pid, request_kinds(images), args.requests, args.concurrency, log)
        finally:
            result_exit = stop_server(server)
    result.update({"server_exit_status": result_exit, "load_average": os.getloadavg(),
                   "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M")})
    print_table(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
