"""Listing and pruning the decode-once image caches (`multitag cache`), as `pip cache` does for wheels.

A cache is the files of one stem ``<key16>_<size>`` in the cache directory (data/cache.py: the .u8
pixels, the .json sidecar, and the .bad_images.txt list when images were skipped). Caches are never
deleted behind the user's back: every dataset and image size adds one, and this module is how they go.

- Last used = the sidecar's mtime: data/cache.py touches it whenever a run reuses the cache.
- Incomplete = pixels without a sidecar that vouches for them (a build killed between its two
  renames, or a sidecar that does not match); such files can never be used and are always pruned,
  as are the temporaries of builds whose process is gone.
- Only files named like cache files are touched, so a ``data.cache_dir`` that holds other files is safe.
- Deleting a cache that a running job has mapped is safe on POSIX (the job keeps its mapping); the
  next run that needs it rebuilds it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitag.data.cache import CACHE_FILE, CACHE_TEMP, pid_alive

DAY_S = 86_400.0


@dataclass
class CacheEntry:
    stem: str
    images: int               # 0 when incomplete
    size: int                 # px
    bytes: int                # all of the stem's files
    last_used: float          # epoch seconds (sidecar mtime; the pixels' mtime when there is no sidecar)
    source: str               # the images' common folder, "" for caches built before it was recorded
    bad: int                  # images skipped when it was built
    complete: bool
    files: list[Path]

    def as_row(self) -> dict:
        return {"cache": self.stem, "images": self.images, "image_size": self.size, "bytes": self.bytes,
                "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used)),
                "source": self.source, "bad_images": self.bad, "complete": self.complete}


def list_caches(cache_dir: Path) -> list[CacheEntry]:
    """Every cache in ``cache_dir``, most recently used first (an absent directory has none)."""
    groups: dict[str, list[Path]] = {}
    for path in cache_dir.iterdir() if cache_dir.is_dir() else ():
        m = CACHE_FILE.match(path.name)
        if m and path.is_file():
            groups.setdefault(m["stem"], []).append(path)
    return sorted((_entry(cache_dir, stem, files) for stem, files in groups.items()), key=lambda e: -e.last_used)


def _entry(cache_dir: Path, stem: str, files: list[Path]) -> CacheEntry:
    data, meta_path = cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"
    size = int(stem.rsplit("_", 1)[1])
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(meta["shape"])
        complete = data.is_file() and data.stat().st_size == int(np.prod(shape)) and shape[1:] == (size, size, 3)
        images, bad, source = (shape[0] if complete else 0), len(meta.get("bad", [])), str(meta.get("source", ""))
        last_used = meta_path.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        complete, images, bad, source = False, 0, 0, ""
        last_used = max(f.stat().st_mtime for f in files)
    return CacheEntry(stem, images, size, sum(f.stat().st_size for f in files), last_used, source, bad,
                      complete, sorted(files))


def stale_temporaries(cache_dir: Path) -> list[Path]:
    """Temporary files of cache builds whose process has exited (killed builds)."""
    if not cache_dir.is_dir():
        return []
    return sorted(p for p in cache_dir.iterdir()
                  if (m := CACHE_TEMP.match(p.name)) and not pid_alive(int(m["pid"])))


def select_for_removal(entries: list[CacheEntry], older_than_days: float | None) -> list[CacheEntry]:
    """What ``prune`` removes: incomplete caches, and complete ones unused for ``older_than_days``
    (None: every cache, as ``clear`` does)."""
    if older_than_days is None:
        return list(entries)
    now = time.time()
    return [e for e in entries if not e.complete or now - e.last_used > older_than_days * DAY_S]


def remove(entries: list[CacheEntry], temporaries: list[Path]) -> int:
    """Delete the entries' files and the temporaries; returns the bytes freed."""
    freed = 0
    for path in [f for e in entries for f in e.files] + temporaries:
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:       # another prune got there first
            pass
    return freed


def prune(cache_dir: Path, older_than_days: float | None, dry_run: bool = False) -> dict:
    """Remove (or with ``dry_run`` only name) what select_for_removal picks, and stale temporaries.
    Returns {"dir", "dry_run", "removed": rows, "temporaries": paths, "bytes": freed, "kept": count}."""
    entries = list_caches(cache_dir)
    doomed, temps = select_for_removal(entries, older_than_days), stale_temporaries(cache_dir)
    freed = (sum(e.bytes for e in doomed) + sum(t.stat().st_size for t in temps)) if dry_run else remove(doomed, temps)
    return {"dir": str(cache_dir), "dry_run": dry_run, "removed": [e.as_row() for e in doomed],
            "temporaries": [str(t) for t in temps], "bytes": freed, "kept": len(entries) - len(doomed)}
