"""multitag.data.cache: decode once, reuse while nothing changed, rebuild when anything did, never half-written."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import multitag.data.cache as cache_mod
from multitag.data.cache import ImageCache, build_cache, cache_key, default_cache_dir
from multitag.data.decode import BadImageError, load_and_resize
from multitag.errors import UserError
from multitag.fileio import DiskFullError


S = 16  # working size for the tests


def _img(seed: int, h: int = 24, w: int = 36) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def images(tmp_path) -> list[str]:
    """Seven small images in the formats and modes the cache must handle."""
    d = tmp_path / "imgs"
    d.mkdir()
    _img(0).save(d / "rgb.jpg", quality=90)
    _img(1).save(d / "rgb.png")
    _img(2).convert("L").save(d / "gray.png")
    _img(3).convert("RGBA").save(d / "rgba.png")
    _img(4).convert("P").save(d / "palette.png")
    _img(5).save(d / "plain.bmp")
    exif_im = _img(6, 20, 40)
    exif = exif_im.getexif()
    exif[0x0112] = 6
    exif_im.save(d / "exif6.jpg", exif=exif.tobytes())
    return [str(p) for p in sorted(d.iterdir())]


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


class DecodeCounter:
    """Stands in for load_and_resize inside cache.py; counts calls, optionally fails at call `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, path, size):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("decoder crashed")
        return load_and_resize(path, size)


def _files(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_build_matches_load_and_resize(images, cache_dir):
    c = build_cache(images, S, cache_dir, progress=False)
    assert isinstance(c, ImageCache) and len(c) == len(images) and c.size == S
    assert c.array.shape == (len(images), S, S, 3) and c.array.dtype == np.uint8
    assert not c.array.flags.writeable and c.valid.all() and c.bad == []
    for i, p in enumerate(images):
        np.testing.assert_array_equal(c.array[i], load_and_resize(p, S).permute(1, 2, 0).numpy())
    batch = c.get_batch([3, 0, 3])
    assert batch.shape == (3, 3, S, S) and batch.dtype == torch.uint8 and batch.is_contiguous()
    assert torch.equal(batch[1], load_and_resize(images[0], S))
    cl = c.get_batch(torch.tensor([3, 0, 3]), channels_last=True)
    assert torch.equal(cl, batch) and cl.is_contiguous(memory_format=torch.channels_last)
    assert _files(cache_dir) == sorted([c.path.name, c.path.with_suffix(".json").name])
    assert c.path.name == f"{c.key[:16]}_{S}.u8"


def test_worker_counts_agree(images, cache_dir, tmp_path):
    one = build_cache(images, S, tmp_path / "c1", num_workers=1, progress=False)
    two = build_cache(images, S, tmp_path / "c2", num_workers=2, progress=False)
    np.testing.assert_array_equal(one.array, two.array)


def test_a_build_decodes_on_every_usable_core_up_to_the_cap(images, cache_dir, monkeypatch):
    """The decode threads follow the cores this process may use (they were a fixed 2, so a 16-core host
    built its cache at this 2-core machine's speed), capped where more threads would queue for the GIL."""
    pools = []

    class Spy(cache_mod.ThreadPoolExecutor):
        def __init__(self, max_workers):
            pools.append(max_workers)
            super().__init__(max_workers)

    monkeypatch.setattr(cache_mod, "ThreadPoolExecutor", Spy)
    for cores, size in ((64, S), (3, S + 1), (1, S + 2)):
        monkeypatch.setattr(cache_mod, "usable_cores", lambda cores=cores: cores)
        build_cache(images, size, cache_dir, progress=False)
    assert pools == [cache_mod.MAX_DECODE_WORKERS, 3, 1]


def test_second_build_reuses_without_decoding(images, cache_dir, monkeypatch):
    first = build_cache(images, S, cache_dir, progress=False)
    mtime = first.path.stat().st_mtime_ns
    counter = DecodeCounter(fail_at=1)  # any decode would raise
    monkeypatch.setattr(cache_mod, "load_and_resize", counter)
    second = build_cache(images, S, cache_dir, progress=False)
    assert counter.calls == 0 and second.path == first.path and second.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.array, first.array)


def _rebuilds(images, cache_dir, monkeypatch, size=S) -> tuple[ImageCache, int]:
    counter = DecodeCounter()
    monkeypatch.setattr(cache_mod, "load_and_resize", counter)
    return build_cache(images, size, cache_dir, progress=False), counter.calls


def test_invalidation(images, cache_dir, monkeypatch):
    base = build_cache(images, S, cache_dir, progress=False)

    st = os.stat(images[0])  # touched: same bytes, newer mtime
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched, calls = _rebuilds(images, cache_dir, monkeypatch)
    assert calls == len(images) and touched.key != base.key

    _img(99).save(images[1])  # rewritten: new content under the same name
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # be sure mtime moves
    rewritten, calls = _rebuilds(images, cache_dir, monkeypatch)
    assert calls == len(images) and rewritten.key != touched.key
    np.testing.assert_array_equal(rewritten.array[1], load_and_resize(images[1], S).permute(1, 2, 0).numpy())

    reordered, calls = _rebuilds(images[::-1], cache_dir, monkeypatch)
    assert calls == len(images) and reordered.key != rewritten.key
    np.testing.assert_array_equal(reordered.array[::-1], rewritten.array)

    fewer, calls = _rebuilds(images[:-1], cache_dir, monkeypatch)
    assert calls == len(images) - 1 and len(fewer) == len(images) - 1

    resized, calls = _rebuilds(images, cache_dir, monkeypatch, size=S + 8)
    assert calls == len(images) and resized.array.shape[1:] == (S + 8, S + 8, 3)
    assert resized.path != rewritten.path

    again, calls = _rebuilds(images, cache_dir, monkeypatch)
    assert calls == 0 and again.path == rewritten.path  # the older cache is still there and valid


def test_cache_key_depends_on_order_size_and_stats(images):
    k = cache_key(images, S)
    assert k == cache_key(images, S) and len(k) == 64
    assert k != cache_key(images[::-1], S) and k != cache_key(images, S + 1)
    assert k != cache_key(images, S, [(1, 2)] * len(images))


def _corrupt(images, tmp_path) -> tuple[list[str], str, str]:
    truncated = tmp_path / "imgs" / "truncated.jpg"
    data = open(images[-1], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    missing = str(tmp_path / "imgs" / "missing.png")
    return images[:2] + [str(truncated)] + images[2:4] + [missing] + images[4:], str(truncated), missing


def test_corrupt_file_raises_naming_it(images, cache_dir, tmp_path):
    paths, truncated, _ = _corrupt(images, tmp_path)
    paths = [p for p in paths if "missing" not in p]
    with pytest.raises(BadImageError, match="truncated.jpg") as info:
        build_cache(paths, S, cache_dir, progress=False)
    assert info.value.path == truncated and "on_bad_image=skip" in str(info.value)
    assert _files(cache_dir) == []  # nothing half-built left behind


def test_missing_file_raises_before_decoding(images, cache_dir, tmp_path, monkeypatch):
    paths, _, missing = _corrupt(images, tmp_path)
    counter = DecodeCounter()
    monkeypatch.setattr(cache_mod, "load_and_resize", counter)
    with pytest.raises(BadImageError, match="missing.png"):
        build_cache(paths, S, cache_dir, progress=False)
    assert counter.calls == 0


def test_skip_mode_records_every_bad_image(images, cache_dir, tmp_path, capsys):
    paths, truncated, missing = _corrupt(images, tmp_path)
    c = build_cache(paths, S, cache_dir, on_bad_image="skip", progress=False)
    assert [(i, p) for i, p, _ in c.bad] == [(2, truncated), (5, missing)]
    assert all(reason for _, _, reason in c.bad)
    assert c.valid.tolist() == [i not in (2, 5) for i in range(len(paths))]
    assert not c.array[2].any() and not c.array[5].any()  # bad rows are zeros
    listing = c.path.with_suffix(".bad_images.txt")
    lines = listing.read_text().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["2", truncated], ["5", missing]]
    err = capsys.readouterr().err
    assert f"skipped 2 of {len(paths)} images" in err and "truncated.jpg" in err and str(listing) in err

    # Reused: the summary is printed again (and the list rewritten if deleted);
    # in error mode the recorded bad image raises.
    listing.unlink()
    c2 = build_cache(paths, S, cache_dir, on_bad_image="skip", progress=False)
    assert c2.bad == c.bad and "skipped 2 of" in capsys.readouterr().err and listing.exists()
    with pytest.raises(BadImageError, match="missing.png"):  # missing files are found first, by stat
        build_cache(paths, S, cache_dir, on_bad_image="error", progress=False)
    present = [p for p in paths if p != missing]
    build_cache(present, S, cache_dir, on_bad_image="skip", progress=False)
    with pytest.raises(BadImageError, match="truncated.jpg"):  # a cache built in skip mode
        build_cache(present, S, cache_dir, on_bad_image="error", progress=False)


def test_all_bad_is_an_error(tmp_path, cache_dir):
    with pytest.raises(UserError, match="none of the 2 images"):
        build_cache([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], S, cache_dir,
                    on_bad_image="skip", progress=False)


def test_invalid_on_bad_image(images, cache_dir):
    with pytest.raises(UserError, match='did you mean "skip"'):
        build_cache(images, S, cache_dir, on_bad_image="skipp")


def test_atomic_when_decoding_dies_midway(images, cache_dir, monkeypatch):
    monkeypatch.setattr(cache_mod, "load_and_resize", DecodeCounter(fail_at=3))
    with pytest.raises(RuntimeError, match="decoder crashed"):
        build_cache(images, S, cache_dir, progress=False)
    assert _files(cache_dir) == []  # no data file, no sidecar, no temporaries
    monkeypatch.setattr(cache_mod, "load_and_resize", load_and_resize)
    assert build_cache(images, S, cache_dir, progress=False).valid.all()


@pytest.mark.parametrize("failing", ["sidecar", "reserve"])
def test_full_disk_while_building_is_one_line_and_keeps_nothing(images, cache_dir, monkeypatch, failing):
    """The disk fills when the index sidecar is written (after all the pixels), or when the data
    file's space is reserved: a one-line DiskFullError naming the directory, no partial cache
    counted or left behind, and the next build (with space again) works."""
    import errno
    import pathlib

    real_write_text, real_fallocate = pathlib.Path.write_text, getattr(os, "posix_fallocate", None)

    def write_text(self, *args, **kwargs):
        if ".json.tmp-" in self.name:
            real_write_text(self, '{"key": "half')       # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "sidecar":
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    elif real_fallocate is None:
        pytest.skip("os.posix_fallocate is not available on this platform")
    else:
        monkeypatch.setattr(cache_mod.os, "posix_fallocate", fallocate)
    with pytest.raises(DiskFullError) as info:
        build_cache(images, S, cache_dir, progress=False)
    message = str(info.value)
    assert str(cache_dir) in message and "MULTITAG_CACHE" in message and "\n" not in message
    assert _files(cache_dir) == []
    monkeypatch.undo()
    assert build_cache(images, S, cache_dir, progress=False).valid.all()


def test_incomplete_cache_is_not_trusted(images, cache_dir, monkeypatch):
    c = build_cache(images, S, cache_dir, progress=False)
    c.path.with_suffix(".json").unlink()  # as if killed between the two renames
    _, calls = _rebuilds(images, cache_dir, monkeypatch)
    assert calls == len(images)
    stale = cache_dir / f"{c.path.stem}.u8.tmp-999999999"  # left by a killed build (pid gone)
    stale.write_bytes(b"partial")
    with open(c.path, "r+b") as f:  # truncated data file: rebuilt too
        f.truncate(10)
    _, calls = _rebuilds(images, cache_dir, monkeypatch)
    assert calls == len(images) and not stale.exists()


def test_progress_line_when_not_a_terminal(images, cache_dir, capsys):
    build_cache(images, S, cache_dir, progress=True)
    assert f"caching images: {len(images)}/{len(images)} (100%)" in capsys.readouterr().err


def test_empty_list_and_pickle(images, cache_dir):
    empty = build_cache([], S, cache_dir, progress=False)
    assert len(empty) == 0 and empty.get_batch([]).shape == (0, 3, S, S)
    c = build_cache(images, S, cache_dir, progress=False)
    blob = pickle.dumps(c)
    assert len(blob) < 10_000  # pickled by path, not by pixels
    back = pickle.loads(blob)
    assert isinstance(back.array, np.memmap) and np.array_equal(back.array, c.array) and back.bad == c.bad


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "images"
    monkeypatch.delenv("MULTITAG_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "multitag" / "images"
