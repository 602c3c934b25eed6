"""How much the decode-once cache saves: decoding every epoch vs building the cache once vs reading it.

    python benchmarks/bench_cache.py [--data DIR] [--limit 1000] [--size 224] [--repeats 3]

Measures, on the first --limit images of DIR (default: the shared VOC2007 images):
  decoder  torchvision vs PIL, JPEG decode only, images re-encoded at 320 px and 32 px
  (a)      decode + resize from files, one epoch, 1 and 2 threads (what every epoch costs without a cache)
  (b)      first cache build (decode + resize + write), 1 and 2 workers, and reopening the built cache
  (c)      one epoch of random batch gathers from the warm cache, NCHW-contiguous and channels_last
Files are read once first so that (a) and (b) measure decoding, not the disk. Each figure is the
best of --repeats runs (other work on a shared 2-core machine only ever slows a run down).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from multitag.ceiling import best_seconds  # noqa: E402
from multitag.data.cache import build_cache  # noqa: E402
from multitag.data.decode import _decode_pil, _decode_torchvision, load_and_resize  # noqa: E402
from multitag.runtime import describe_cpu  # noqa: E402

DEFAULT_DATA = "/work/shared/data/voc2007/images"
EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def best_time(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls, seconds; no warm-up call (the first build and the cold
    gather are what some rows time)."""
    return best_seconds(fn, repeats, warmup=0)


def bench_decoders(paths: list[str], repeats: int) -> list[tuple[str, str]]:
    """JPEG decode time per image, torchvision vs PIL, at a long side of 320 px and at 32 px."""
    rows = []
    for side in (320, 32):
        blobs = []
        for p in paths[:200]:
            im = Image.open(p).convert("RGB")
            scale = side / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        for b in blobs[:5]:  # first calls load libraries and warm caches
            _decode_torchvision(b), _decode_pil(b, "x")
        tv = best_time(lambda: [_decode_torchvision(b) for b in blobs], repeats) / len(blobs)
        pil = best_time(lambda: [_decode_pil(b, "x") for b in blobs], repeats) / len(blobs)
        rows.append((f"decoder, JPEG {side} px: torchvision / PIL",
                     f"{tv * 1e6:,.0f} us / {pil * 1e6:,.0f} us per image ({pil / tv:.1f}x)"))
    return rows


def decode_epoch(paths: list[str], size: int, workers: int) -> None:
    """(a): what a data loader without a cache does every epoch."""
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda p: load_and_resize(p, size), paths):
            pass


def gather_epoch(cache, batch: int, channels_last: bool) -> None:
    """(c): one epoch of shuffled batches, as training reads them."""
    order = np.random.default_rng(0).permutation(len(cache))
    for i in range(0, len(order), batch):
        cache.get_batch(order[i:i + batch], channels_last=channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    data = Path(args.data)
    if not data.is_dir():
        print(f"skipped: no image folder at {data} (pass --data DIR)")
        return
    paths = sorted(str(p) for p in data.iterdir() if p.suffix.lower() in EXTS)[: args.limit]
    if not paths:
        print(f"skipped: no images in {data}")
        return
    for p in paths:  # warm the page cache: measure decoding, not the disk
        Path(p).read_bytes()
    n, size = len(paths), args.size

    print(f"CPU: {describe_cpu()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"data: {n} images from {data}, size {size}, batch {args.batch}, best of {args.repeats}\n")

    rows = bench_decoders(paths, args.repeats)
    for workers in (1, 2):
        t = best_time(lambda: decode_epoch(paths, size, workers), args.repeats)
        rows.append((f"(a) decode+resize epoch from files, {workers} thread{'s' * (workers > 1)}",
                     f"{n / t:,.0f} img/s ({t:.2f} s/epoch)"))

    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            def first_build(w=workers):
                d = tempfile.mkdtemp(dir=tmp)
                build_cache(paths, size, d, num_workers=w, progress=False)
            t = best_time(first_build, args.repeats)
            rows.append((f"(b) first cache build, {workers} worker{'s' * (workers > 1)}",
                         f"{t:.2f} s ({n / t:,.0f} img/s)"))
        cache_dir = Path(tmp) / "warm"
        cache = build_cache(paths, size, cache_dir, progress=False)
        t = best_time(lambda: build_cache(paths, size, cache_dir, progress=False), args.repeats)
        rows.append(("(b) reopen the built cache (stat + key + map)", f"{t * 1e3:.1f} ms"))
        rows.append(("    cache file size", f"{cache.path.stat().st_size / 2**20:,.0f} MiB"))
        reopened = build_cache(paths, size, cache_dir, progress=False)  # fresh mapping: pages fault in
        t = best_time(lambda: gather_epoch(reopened, args.batch, False), 1)
        rows.append(("(c) first epoch of batch gathers after opening, NCHW contiguous",
                     f"{n / t:,.0f} img/s ({t * 1e3:.0f} ms/epoch)"))
        del reopened
        for cl in (False, True):
            t = best_time(lambda: gather_epoch(cache, args.batch, cl), args.repeats)
            rows.append((f"(c) warm-cache epoch of batch gathers, {'channels_last' if cl else 'NCHW contiguous'}",
                         f"{n / t:,.0f} img/s ({t * 1e3:.0f} ms/epoch)"))
        del cache

    rows.append(("load average at end", f"{os.getloadavg()[0]:.2f}"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  result")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
