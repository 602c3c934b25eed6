"""`multitag cache`: list the image caches, prune the unused and broken ones, clear them; nothing else is touched."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

import multitag.data.cache as cache_mod
from multitag.cli import main
from multitag.data import cache_admin
from multitag.data.cache import build_cache

DAY = cache_admin.DAY_S


@pytest.fixture
def two_caches(tmp_path):
    """A cache directory with two caches of one image folder (sizes 8 and 12), the 8 px one last used
    40 days ago; plus a user's file that is not a cache."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 14, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    paths = sorted(str(p) for p in folder.iterdir())
    d = tmp_path / "cache"
    old, new = build_cache(paths, 8, d, progress=False), build_cache(paths, 12, d, progress=False)
    then = time.time() - 40 * DAY
    os.utime(old.path.with_suffix(".json"), (then, then))
    (d / "notes.txt").write_text("mine")
    return d, paths, old, new


def test_sidecar_names_the_source_and_reuse_marks_the_cache_used(two_caches):
    d, paths, old, _ = two_caches
    meta = json.loads(old.path.with_suffix(".json").read_text())
    assert meta["source"] == os.path.dirname(paths[0]) and "created" in meta
    entries = {e.stem: e for e in cache_admin.list_caches(d)}
    assert time.time() - entries[old.path.stem].last_used > 39 * DAY
    build_cache(paths, 8, d, progress=False)                      # a run reuses it
    entries = {e.stem: e for e in cache_admin.list_caches(d)}
    assert time.time() - entries[old.path.stem].last_used < 60


def test_list_shows_every_cache_and_flags_an_incomplete_one(two_caches):
    d, _, old, new = two_caches
    (d / "0123456789abcdef_32.u8").write_bytes(b"\0" * 10)          # pixels without a sidecar
    rows = {e.stem: e for e in cache_admin.list_caches(d)}
    assert set(rows) == {old.path.stem, new.path.stem, "0123456789abcdef_32"}
    assert rows[new.path.stem].complete and rows[new.path.stem].images == 3 and rows[new.path.stem].size == 12
    assert rows[new.path.stem].bytes == new.path.stat().st_size + new.path.with_suffix(".json").stat().st_size
    assert not rows["0123456789abcdef_32"].complete and rows["0123456789abcdef_32"].images == 0
    assert cache_admin.list_caches(d / "absent") == []


def test_prune_removes_old_broken_and_leftover_files_only(two_caches):
    d, _, old, new = two_caches
    (d / "0123456789abcdef_32.u8").write_bytes(b"\0" * 10)
    dead = d / "fedcba9876543210_16.u8.tmp-999999999"                # a killed build's temporary
    live = d / f"fedcba9876543210_16.u8.tmp-{os.getpid()}"           # a build in progress
    dead.write_bytes(b"x"), live.write_bytes(b"x")
    dry = cache_admin.prune(d, 30, dry_run=True)
    assert {r["cache"] for r in dry["removed"]} == {old.path.stem, "0123456789abcdef_32"}
    assert old.path.exists() and dead.exists()                      # a dry run removes nothing
    done = cache_admin.prune(d, 30)
    assert done["removed"] == dry["removed"] and done["bytes"] == dry["bytes"] > 0 and done["kept"] == 1
    assert not old.path.exists() and not old.path.with_suffix(".json").exists() and not dead.exists()
    assert new.path.exists() and live.exists() and (d / "notes.txt").read_text() == "mine"


def test_clear_removes_every_cache_but_not_other_files(two_caches, capsys):
    d, paths, _, _ = two_caches
    assert main(["cache", "clear", "--dir", str(d)]) == 0
    assert "removed 2 caches" in capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    build_cache(paths, 8, d, progress=False)                        # and the next run simply rebuilds


def test_cli_list_json_and_errors(two_caches, capsys):
    d, _, old, new = two_caches
    assert main(["cache", "--dir", str(d), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["cache"] for r in rows] == [new.path.stem, old.path.stem]       # most recently used first
    assert main(["cache", "--dir", str(d)]) == 0
    assert "2 caches" in capsys.readouterr().out
    assert main(["cache", "prune", "--older-than", "-1", "--dir", str(d)]) == 2
    assert "--older-than must be 0 days or more" in capsys.readouterr().err


def test_a_build_says_how_to_prune_when_the_caches_grow_large(two_caches, monkeypatch, capsys):
    d, paths, _, _ = two_caches
    monkeypatch.setattr(cache_mod, "SIZE_HINT_BYTES", 0)
    build_cache(paths, 10, d, progress=False)
    assert "`multitag cache prune` removes those unused for 30 days" in capsys.readouterr().err
    build_cache(paths, 10, d, progress=False)                       # reused: no build, no hint
    assert "multitag cache" not in capsys.readouterr().err


def test_the_size_hint_counts_cache_files_only(two_caches, monkeypatch, capsys):
    """What `multitag cache` lists is what the hint adds up: other files in the directory are not caches."""
    d, paths, _, _ = two_caches
    (d / "someone-elses.u8").write_bytes(b"\0" * 2**20)
    caches = sum(e.bytes for e in cache_admin.list_caches(d))
    new_cache = 16 * 16 * 3 * len(paths)
    monkeypatch.setattr(cache_mod, "SIZE_HINT_BYTES", caches + new_cache + 1024)   # the new cache's sidecar < 1 KiB
    assert build_cache(paths, 16, d, progress=False).path.stat().st_size == new_cache    # built, not reused
    assert "multitag cache" not in capsys.readouterr().err
