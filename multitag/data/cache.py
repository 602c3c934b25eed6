"""Decode-once image cache: every image decoded and resized once, kept as uint8 in a memory-mapped file.

Layout, in ``cache_dir``:
    <key16>_<size>.u8                 raw uint8, shape (N, size, size, 3): HWC so that one image
                                      is one contiguous row; ``get_batch`` permutes to NCHW.
    <key16>_<size>.json               sidecar: format version, full key, shape, bad rows, the images'
                                      folder; its mtime is the cache's last use (touched on reuse).
    <key16>_<size>.bad_images.txt     only when images were skipped: "index<TAB>path<TAB>reason" lines.

The key is the sha256 of the format versions, the size, and for every path in order its
absolute path, file size and mtime_ns. So the cache is reused across epochs and runs, and
rebuilt when any file is touched or rewritten, a path is added, removed or reordered, or the
size changes. Nothing is deleted unasked: `multitag cache` lists the caches and prunes them
(data/cache_admin.py). It is not rebuilt when a file's bytes change with its size and mtime kept
(nothing ordinary does that; hashing every file's bytes would cost a full read per run).

Writes are atomic: the data and sidecar are built under temporary names and moved into place
with os.replace, sidecar last. A cache counts only when its sidecar names the same key and
the data file has the right length, so a killed build never looks valid.

Decoding runs in a thread pool: torchvision's decoders and torch's resize release the GIL.
Measured on 2 cores (benchmarks/bench_cache.py: 1000 VOC2007 JPEGs -> 224 px, warm page cache):
decode + resize 2,451 img/s with 1 thread, 4,372 with 2; a first build (which also writes
144 MiB through the page cache) 1,975 img/s with 1 worker, 2,728 with 2. A 2-process pool
(fork) was slower than 2 threads (~1,800 vs ~2,950 img/s, same run) and a forkserver pool
much slower to start; torch's intra-op thread count made no measurable difference.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from multitag.data.decode import PREPROCESS_VERSION, BadImageError, DatasetImageError, load_and_resize
from multitag.config import PRUNE_AFTER_DAYS, cache_root
from multitag.errors import UserError, did_you_mean
from multitag.fileio import DiskFullError, atomic_write_text, is_disk_full
from multitag.machine import usable_cores

CACHE_FORMAT_VERSION = 1
ON_BAD_IMAGE = ("error", "skip")
_SUMMARY_NAMES = 3  # bad files named in the one-line summary; the rest are in bad_images.txt
_LOG_EVERY_S = 10.0  # progress line period when stderr is not a terminal
# After a build, when the directory's caches hold more than this, say how to list and prune them
# (caches are never deleted unasked: data/cache_admin.py, `multitag cache`).
SIZE_HINT_BYTES = 20 * 2**30
# The files of one cache, stem <key16>_<size> (see the layout above), and a build's temporaries: the
# names data/cache_admin.py lists and prunes, and the only ones the size hint counts.
CACHE_FILE = re.compile(r"^(?P<stem>[0-9a-f]{16}_(?P<size>\d+))\.(?:u8|json|bad_images\.txt)$")
CACHE_TEMP = re.compile(r"^[0-9a-f]{16}_\d+\.(?:u8|json)\.tmp-(?P<pid>\d+)$")


def default_cache_dir() -> Path:
    """<cache root>/images, the root being $MULTITAG_CACHE, else $XDG_CACHE_HOME/multitag or ~/.cache/multitag."""
    return cache_root() / "images"


@dataclass(eq=False)  # compared by identity: field-wise == on arrays is ambiguous
class ImageCache:
    """N decoded images of size x size, read-only, in a memory-mapped uint8 file.

    array: (N, size, size, 3) uint8, read-only np.memmap (HWC rows).
    valid: (N,) bool; False for images that could not be read (on_bad_image="skip"),
           whose rows are all zeros.
    bad:   (index, path, reason) for each of those.
    """

    path: Path
    array: np.ndarray
    size: int
    valid: np.ndarray
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    key: str = ""

    def __len__(self) -> int:
        return self.array.shape[0]

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor,
                  channels_last: bool = False) -> torch.Tensor:
        """Gather rows -> (B, 3, size, size) uint8.

        Default: contiguous NCHW (one copy of the gathered rows). channels_last=True returns
        the gathered HWC rows as an NCHW view without that copy (torch.channels_last strides),
        which channels_last models take as is.
        """
        idx = np.asarray(indices, dtype=np.int64)
        rows = torch.from_numpy(self.array[idx])  # fancy indexing copies: (B, S, S, 3), writable
        batch = rows.permute(0, 3, 1, 2)  # (B, 3, S, S) view with channels_last strides
        return batch if channels_last else batch.contiguous()

    # Pickle by path (e.g. to DataLoader workers under spawn): a memmap would pickle its data.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["array"] = None
        state["_shape"] = self.array.shape
        return state

    def __setstate__(self, state: dict) -> None:
        shape = state.pop("_shape")
        self.__dict__.update(state)
        self.array = _open_readonly(self.path, shape)


# Decoding threads at most: PIL's JPEG decode and the resize release the GIL, the per-image Python around
# them does not, so past a dozen threads they mostly queue for it. It was a fixed 2: the 16-core host of a
# GPU machine decoded CIFAR-10 at 4,121 img/s, as this 2-core machine does (benchmarks/RESULTS.md).
MAX_DECODE_WORKERS = 16


def decode_workers() -> int:
    """Threads for building a cache: one per usable core, at most MAX_DECODE_WORKERS."""
    return max(1, min(usable_cores(), MAX_DECODE_WORKERS))


def build_cache(
    paths: Sequence[str],
    size: int,
    cache_dir: str | os.PathLike,
    *,
    on_bad_image: str = "error",
    num_workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Decode and resize every image once into ``cache_dir``, or reuse the cache built before.

    on_bad_image="error": the first unreadable image (in list order) raises BadImageError.
    on_bad_image="skip":  unreadable images get all-zero rows, valid=False and an entry in
                          ``bad``; one summary line goes to stderr and the full list to
                          <key16>_<size>.bad_images.txt beside the cache.
    num_workers: decoding threads, default decode_workers() (one per usable core, at most 16).
    """
    if on_bad_image not in ON_BAD_IMAGE:
        hint = did_you_mean(on_bad_image, ON_BAD_IMAGE)
        raise UserError(f"data.on_bad_image={on_bad_image!r} is not a choice{hint}")
    if int(size) != size or size < 1:
        raise UserError(f"image size must be a positive integer, got {size!r}")
    size, paths = int(size), [str(p) for p in paths]
    stats = [_stat(p) for p in paths]
    if on_bad_image == "error":
        for p, st in zip(paths, stats):
            if st is None:  # fail before spending minutes decoding
                raise DatasetImageError(p, "file not found or not a regular file")

    key = cache_key(paths, size, stats)
    cache_dir = Path(cache_dir).expanduser()
    stem = f"{key[:16]}_{size}"
    cache = _load(cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json", key, (len(paths), size, size, 3))
    if cache is None:
        cache = _build(paths, size, cache_dir, stem, key, on_bad_image, num_workers or decode_workers(), progress)
        _hint_if_large(cache_dir)
    _report_bad(cache, len(paths), on_bad_image)
    return cache


def cache_key(paths: Sequence[str], size: int, stats: Sequence[tuple[int, int] | None] | None = None) -> str:
    """sha256 hex of format versions, size and (absolute path, file size, mtime_ns) per path, in order."""
    stats = stats if stats is not None else [_stat(p) for p in paths]
    h = hashlib.sha256(f"multitag-cache v{CACHE_FORMAT_VERSION} pre{PREPROCESS_VERSION} size={size}\n".encode())
    for p, st in zip(paths, stats):
        h.update(f"{os.path.abspath(p)}\0{st if st is not None else 'missing'}\n".encode())
    return h.hexdigest()


def _stat(path: str) -> tuple[int, int] | None:
    """(file size, mtime_ns), or None when the path is missing or not a file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


def _open_readonly(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read-only (N, S, S, 3) uint8 view of the cache file (np.memmap cannot map 0 bytes)."""
    if shape[0] == 0:
        empty = np.zeros(shape, dtype=np.uint8)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)


def _load(data_path: Path, meta_path: Path, key: str, shape: tuple[int, ...]) -> ImageCache | None:
    """The existing cache for ``key``, or None when there is none or it is incomplete."""
    try:
        meta = json.loads(meta_path.read_text())
        ok = meta.get("key") == key and tuple(meta.get("shape", ())) == shape
        ok = ok and data_path.stat().st_size == int(np.prod(shape))
        bad = [(int(i), str(p), str(r)) for i, p, r in meta.get("bad", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if not ok:
        return None
    with contextlib.suppress(OSError):  # "last used", for `multitag cache prune` (a read-only dir keeps its date)
        os.utime(meta_path)
    return _make_cache(data_path, shape, bad, key)


def _make_cache(data_path: Path, shape: tuple[int, ...], bad: list[tuple[int, str, str]], key: str) -> ImageCache:
    valid = np.ones(shape[0], dtype=bool)
    valid[[i for i, _, _ in bad]] = False
    return ImageCache(data_path, _open_readonly(data_path, shape), shape[1], valid, bad, key)


def _build(paths: list[str], size: int, cache_dir: Path, stem: str, key: str,
           on_bad_image: str, num_workers: int, progress: bool) -> ImageCache:
    """Decode all images into temporary files, then move them into place (sidecar last)."""
    shape = (len(paths), size, size, 3)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_dir, stem)
    _check_free_space(cache_dir, int(np.prod(shape)))
    data_path, meta_path = cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"
    tmp_data = cache_dir / f"{stem}.u8.tmp-{os.getpid()}"
    tmp_meta = cache_dir / f"{stem}.json.tmp-{os.getpid()}"
    try:
        bad = _decode_into(tmp_data, paths, size, on_bad_image, num_workers, progress)
        tmp_meta.write_text(json.dumps({
            "format_version": CACHE_FORMAT_VERSION, "preprocess_version": PREPROCESS_VERSION,
            "key": key, "shape": list(shape), "layout": "NHWC uint8",
            "bad": [list(b) for b in bad], "source": common_folder(paths),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }))
        os.replace(tmp_data, data_path)
        os.replace(tmp_meta, meta_path)  # the commit point: now the cache counts
    except Exception as e:
        if not is_disk_full(e):
            raise
        # e.g. the sidecar, written after gigabytes of pixels, found the disk full: nothing counts
        # as cached (the commit point was not reached), the temporaries go, the next run rebuilds.
        raise _no_space(cache_dir, "the image cache's index") from None
    finally:
        for tmp in (tmp_data, tmp_meta):
            tmp.unlink(missing_ok=True)
    return _make_cache(data_path, shape, bad, key)


def common_folder(paths: list[str]) -> str:
    """The folder all the images are under (shown by `multitag cache`); "" when they share none."""
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    except ValueError:  # e.g. paths on different Windows drives
        return ""


def _hint_if_large(cache_dir: Path) -> None:
    total = sum(p.stat().st_size for p in cache_dir.iterdir() if CACHE_FILE.match(p.name))
    if total > SIZE_HINT_BYTES:
        print(f"image caches in {cache_dir} now take {total / 2**30:.1f} GiB: `multitag cache` lists them and "
              f"`multitag cache prune` removes those unused for {PRUNE_AFTER_DAYS} days", file=sys.stderr, flush=True)


def _decode_into(tmp_data: Path, paths: list[str], size: int, on_bad_image: str,
                 num_workers: int, progress: bool) -> list[tuple[int, str, str]]:
    """Fill a new (N, size, size, 3) file at ``tmp_data``; return the bad rows (skip mode)."""
    n = len(paths)
    nbytes = n * size * size * 3
    with open(tmp_data, "wb") as f:  # reserve the space now: a full disk mid-build would be SIGBUS
        try:
            if n and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise _no_space(tmp_data.parent, f"the {nbytes / 1e9:.1f} GB image cache") from None
        f.truncate(nbytes)
    if n == 0:
        return []
    out = np.memmap(tmp_data, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))

    def fill(i: int) -> str | None:
        """Decode image i into row i; the reason it failed, or None."""
        try:
            out[i] = load_and_resize(paths[i], size).permute(1, 2, 0).numpy()  # (3,S,S) -> (S,S,3)
        except BadImageError as e:
            return e.reason
        return None

    bad: list[tuple[int, str, str]] = []
    with ThreadPoolExecutor(max(1, num_workers)) as pool, _progress(n, progress) as advance:
        try:
            for i, reason in enumerate(pool.map(fill, range(n))):  # in order: "first" bad is by index
                if reason is not None:
                    if on_bad_image == "error":
                        raise DatasetImageError(paths[i], reason)
                    bad.append((i, paths[i], reason))
                advance()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # stop decoding before the file goes
            raise
    out.flush()
    del out
    return bad


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """Yield an ``advance()`` callable: a rich bar on a terminal, else a line every 10 s."""
    if not enabled:
        yield lambda: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("caching images"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task("cache", total=total, rate="")
            start = last = time.perf_counter()
            done = 0

            def advance() -> None:  # redraw at most 10x a second: rich's update costs ~tens of us
                nonlocal done, last
                done += 1
                now = time.perf_counter()
                if now - last >= 0.1 or done == total:
                    last = now
                    bar.update(task, completed=done, rate=f"{done / max(now - start, 1e-9):,.0f} img/s")

            yield advance
        return
    yield _log_line_advancer(total)


def _log_line_advancer(total: int):
    """An ``advance()`` that prints a plain progress line to stderr every 10 s and at the end."""
    start = last = time.perf_counter()
    done = 0

    def advance() -> None:
        nonlocal done, last
        done += 1
        now = time.perf_counter()
        if now - last >= _LOG_EVERY_S or done == total:
            last = now
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            print(f"caching images: {done}/{total} ({100 * done / total:.0f}%), "
                  f"{rate:,.0f} img/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    return advance


def _remove_stale_temps(cache_dir: Path, stem: str) -> None:
    """Delete temporaries of this cache left by builds that were killed (their pid is gone)."""
    for tmp in cache_dir.glob(f"{stem}.*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _check_free_space(cache_dir: Path, nbytes: int) -> None:
    """Refuse early, with the fix, rather than fail after minutes of decoding."""
    free = shutil.disk_usage(cache_dir).free
    if nbytes > free:
        raise UserError(
            f"the image cache needs {nbytes / 1e9:.1f} GB in {cache_dir} but only {free / 1e9:.1f} GB "
            f"is free; set MULTITAG_CACHE to a directory on a bigger disk or lower the image size"
        )


def _no_space(cache_dir: Path, what: str) -> DiskFullError:
    return DiskFullError(f"no space left for {what} in {cache_dir}; free disk space there, set MULTITAG_CACHE to "
                         f"a directory on a bigger disk or lower the image size (nothing half-built is kept)")


def _write_bad_list(path: Path, bad: list[tuple[int, str, str]]) -> None:
    """index<TAB>path<TAB>reason per line, written atomically."""
    atomic_write_text(path, "".join(f"{i}\t{p}\t{r}\n" for i, p, r in bad))


def _report_bad(cache: ImageCache, n: int, on_bad_image: str) -> None:
    """Raise (error mode) or print one summary line (skip mode); never skip silently."""
    if not cache.bad:
        return
    if on_bad_image == "error":  # a cache built earlier in skip mode, used now in error mode
        i, path, reason = cache.bad[0]
        raise DatasetImageError(path, reason)
    if len(cache.bad) == n:
        raise UserError(f"none of the {n} images could be read (first: {cache.bad[0][1]}: {cache.bad[0][2]}); "
                        f"check the data path")
    names = ", ".join(f"{Path(p).name} ({r})" for _, p, r in cache.bad[:_SUMMARY_NAMES])
    more = f" and {len(cache.bad) - _SUMMARY_NAMES} more" if len(cache.bad) > _SUMMARY_NAMES else ""
    listing = cache.path.with_suffix(".bad_images.txt")
    if not listing.exists():  # first report for this cache, or the user deleted it
        _write_bad_list(listing, cache.bad)
    print(f"skipped {len(cache.bad)} of {n} images: {names}{more}; full list in {listing}",
          file=sys.stderr, flush=True)
