"""Images from the wild: every input is decoded (RGB uint8, its shape checked) or refused with a
one-line BadImageError naming the file; never another exception, never a crashed process.

Covers ``decode_image``, ``to_uint8_array``, ``load_and_resize``, the cache builder in skip mode
and ``Model.predict_each``, with hypothesis generating byte mutations (flips, truncations,
insertions, deletions) of valid files in every format and mode, arrays of any shape and dtype,
and unicode/space file names. ``IMAGE_CASES``, ``mutate`` and ``outcome`` are also run by
benchmarks/reliability_report.py for docs/RELIABILITY.md.

Found by this file: torchvision 0.29's PNG decoder segfaulted on corrupt pixel data (PNG now
goes through PIL); a truncated animated GIF raised IndexError from PIL (a 500 in the HTTP
service); zero-sized arrays reached the resize as a RuntimeError.
"""
from __future__ import annotations

import io
import itertools
import pickle
import resource
import struct
import time
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from multitag.data.cache import build_cache
from multitag.data.decode import (
    MAX_PIXELS,
    BadImageError,
    ImageTooLargeError,
    NotAnImageError,
    decode_image,
    load_and_resize,
    to_uint8_array,
)
from multitag.errors import UserError

H, W = 24, 40          # source images: small, and not square so a swapped H/W shows
# database=None: no .hypothesis/ folder in the working tree; examples are drawn afresh each run.
FUZZ = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# --- the valid images: every format and mode a dataset may hold -------------------------------------

def _pixels(h: int = H, w: int = W) -> np.ndarray:
    """(h, w, 3) uint8 with structure (gradients) and noise, so codecs have real work to do."""
    y, x = np.mgrid[:h, :w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1)
    return (base + np.random.default_rng(0).integers(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = H, w: int = W) -> Image.Image:
    return Image.fromarray(_pixels(h, w))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_16bit_colour() -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    rows = (_pixels().astype(">u2") * 257).reshape(H, W * 3)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw)) \
        + _png_chunk(b"IEND", b"")


def _palette_with_transparency() -> bytes:
    im = _rgb().convert("P", palette=Image.ADAPTIVE, colors=16)
    return _encode(im, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    """Stored W x H with orientation 6 ("rotate 90 clockwise to display"): decodes as H x W swapped."""
    im = _rgb()
    exif = im.getexif()
    exif[0x0112] = 6
    return _encode(im, "JPEG", exif=exif.tobytes(), quality=90)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.roll(_pixels(), 5 * i, axis=1)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


@cache
def _png_bomb(side: int = 20000) -> bytes:
    """A real side x side 1-bit PNG of zeros: ~50 KB on disk, 400 MP (1.2 GB as RGB) decoded."""
    raw_row = b"\0" * (1 + side // 8)
    squeeze = zlib.compressobj(9)
    idat = b"".join(squeeze.compress(raw_row) for _ in range(side)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg_header_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header is rewritten to claim width x height."""
    data = bytearray(_encode(_rgb(8, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


SEEDS: dict[str, Callable[[], bytes]] = {
    "rgb.jpg": lambda: _encode(_rgb(), "JPEG", quality=85),
    "progressive.jpg": lambda: _encode(_rgb(), "JPEG", progressive=True),
    "greyscale.jpg": lambda: _encode(_rgb().convert("L"), "JPEG"),
    "cmyk.jpg": lambda: _encode(_rgb().convert("CMYK"), "JPEG"),
    "exif-rotated.jpg": _exif_rotated,
    "rgb.png": lambda: _encode(_rgb(), "PNG"),
    "greyscale.png": lambda: _encode(_rgb().convert("L"), "PNG"),
    "grey-16bit.png": lambda: _encode(Image.fromarray(_pixels()[..., 0].astype(np.uint16) * 257), "PNG"),
    "colour-16bit.png": _png_16bit_colour,
    "palette-transparent.png": _palette_with_transparency,
    "rgba.png": lambda: _encode(_rgb().convert("RGBA"), "PNG"),
    "grey-alpha.png": lambda: _encode(_rgb().convert("LA"), "PNG"),
    "animated.gif": _animated_gif,
    "rgb.webp": lambda: _encode(_rgb(), "WEBP", quality=80),
    "rgba-lossless.webp": lambda: _encode(_rgb().convert("RGBA"), "WEBP", lossless=True),
    "rgb.bmp": lambda: _encode(_rgb(), "BMP"),
    "rgb.tiff": lambda: _encode(_rgb(), "TIFF"),
    "cmyk.tiff": lambda: _encode(_rgb().convert("CMYK"), "TIFF"),
}


# --- named cases and their defined outcomes ---------------------------------------------------------

class Case(NamedTuple):
    """An input and what must come of it: decoded at ``shape``, or refused with ``error`` (a BadImageError class)."""

    name: str
    data: Callable[[], bytes]
    shape: tuple[int, int, int] | None = None
    error: type[BadImageError] | None = None
    fragment: str = ""          # expected in the refusal's reason


def _decoded(name: str, data: Callable[[], bytes], shape=(3, H, W)) -> Case:
    return Case(name, data, shape=shape)


def _refused(name: str, data: Callable[[], bytes], fragment: str = "", error=BadImageError) -> Case:
    return Case(name, data, error=error, fragment=fragment)


IMAGE_CASES: list[Case] = [
    *(_decoded(name, make) for name, make in SEEDS.items() if name != "exif-rotated.jpg"),
    _decoded("exif-rotated.jpg", _exif_rotated, shape=(3, W, H)),
    _decoded("1x1.png", lambda: _encode(_rgb(1, 1), "PNG"), shape=(3, 1, 1)),
    _decoded("1x1.jpg", lambda: _encode(_rgb(1, 1), "JPEG"), shape=(3, 1, 1)),
    _decoded("1x1.gif", lambda: _encode(_rgb(1, 1), "GIF"), shape=(3, 1, 1)),
    _decoded("1x1-1bit.bmp", lambda: _encode(_rgb(1, 1).convert("1"), "BMP"), shape=(3, 1, 1)),
    _decoded("a png named .jpg", lambda: _encode(_rgb(), "PNG")),
    _refused("zero-byte file", lambda: b"", "the file is empty"),
    _refused("text named .jpg", lambda: b"hello, I am not a photo\n", "not an image file", NotAnImageError),
    _refused("html named .png", lambda: b"<!doctype html><title>404</title>", "not an image file", NotAnImageError),
    _refused("png signature only", lambda: b"\x89PNG\r\n\x1a\n", "not an image file", NotAnImageError),
    _refused("jpeg start marker only", lambda: b"\xff\xd8\xff", "not an image file", NotAnImageError),
    _refused("truncated jpeg", lambda: SEEDS["rgb.jpg"]()[:300]),
    _refused("truncated png", lambda: SEEDS["rgb.png"]()[:200]),
    _refused("png with a corrupt pixel stream (crashed torchvision)", lambda: _corrupt_idat(SEEDS["rgb.png"]())),
    _refused("eps (would run Ghostscript)", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
             "not an image file", NotAnImageError),
    _refused("animated gif cut short (PIL raised IndexError)", lambda: _animated_gif()[:len(_animated_gif()) * 3 // 8],
             "index out of range"),
    _refused("20000x20000 png (real, 50 KB)", _png_bomb, "400,000,000 pixels, over the limit", ImageTooLargeError),
    _refused("11000x11000 png (real, 15 KB)", lambda: _png_bomb(11000), "121,000,000 pixels", ImageTooLargeError),
    _refused("20000x20000 jpeg header", lambda: _jpeg_header_claiming(20000, 20000), "over the limit",
             ImageTooLargeError),
    _refused("12000x9000 jpeg header (108 MP)", lambda: _jpeg_header_claiming(12000, 9000), "108,000,000 pixels",
             ImageTooLargeError),
]


def _corrupt_idat(png: bytes) -> bytes:
    """``png`` with one byte in the middle of its compressed pixel data inverted."""
    out = bytearray(png)
    start = png.index(b"IDAT") + 4
    length = struct.unpack(">I", png[start - 8:start - 4])[0]
    out[start + length // 2] ^= 0xFF
    return bytes(out)


def outcome(data: bytes, name: str, max_pixels: int | None = None) -> tuple[str, str]:
    """Decode ``data``; ("decoded", "3x24x40") or ("refused", reason). Asserts the contract on the way:
    a uint8 (3, H, W) tensor, or a one-line BadImageError naming the file; anything else propagates."""
    try:
        img = decode_image(data, name=name, max_pixels=max_pixels)
    except BadImageError as e:
        assert_one_line_naming(e, name)
        return "refused", e.reason
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and min(img.shape) >= 1
    return "decoded", "x".join(map(str, img.shape))


def assert_one_line_naming(error: Exception, name: str) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert name in message or repr(name)[1:-1] in message, message


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.name for c in IMAGE_CASES])
def test_every_case_has_its_defined_outcome(case: Case):
    kind, detail = outcome(case.data(), case.name)
    if case.error is None:
        assert (kind, detail) == ("decoded", "x".join(map(str, case.shape)))
    else:
        assert kind == "refused" and case.fragment in detail, detail
        with pytest.raises(case.error):
            decode_image(case.data(), name=case.name)


@pytest.mark.parametrize("side,message", [
    (11000, "11000 x 11000 = 121,000,000 pixels, over the limit of 100,000,000"),   # multitag's limit
    (20000, "20000 x 20000 = 400,000,000 pixels, over the limit of 100,000,000"),   # past PIL's 179 MP too
])
def test_decompression_bomb_is_refused_before_decoding(side, message):
    """multitag's limit is the one that speaks, also above PIL's own guard (179 MP)."""
    bomb = _png_bomb(side)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=message):
        decode_image(bomb, name="bomb.png")
    assert time.perf_counter() - start < 0.5      # decoding 121-400 MP takes seconds
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 200                          # decoded as RGB it would need 363-1,200 MB
    assert len(bomb) < 100_000


def test_pixel_limit_is_configurable_and_counts_gif_frames():
    gif = _animated_gif()                          # 3 frames of 24 x 40 = 2,880 pixels
    assert outcome(gif, "a.gif", max_pixels=2880)[0] == "decoded"
    with pytest.raises(ImageTooLargeError, match="24 x 3 frames = 2,880 pixels") as info:
        decode_image(gif, name="a.gif", max_pixels=2879)
    again = pickle.loads(pickle.dumps(info.value))          # crosses process boundaries whole
    assert (again.path, again.pixels, again.limit) == ("a.gif", 2880, 2879)
    assert MAX_PIXELS == 100_000_000


# --- hypothesis: mutated bytes of every seed --------------------------------------------------------

@cache
def seed_bytes(name: str) -> bytes:
    return SEEDS[name]()


def mutate(data: bytes, ops: list[tuple[str, float, int]]) -> bytes:
    """Apply (operation, position as a fraction of the length, value) edits: flip, truncate, insert, delete."""
    out = bytearray(data)
    for op, where, value in ops:
        at = int(where * len(out))
        if op == "flip" and out:
            out[min(at, len(out) - 1)] = value
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = bytes([value]) * (1 + value % 16)
        elif op == "delete":
            del out[at:at + 1 + value % 16]
    return bytes(out)


OPS = st.lists(st.tuples(st.sampled_from(["flip", "flip", "truncate", "insert", "delete"]),
                         st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(name=st.sampled_from(sorted(SEEDS)), ops=OPS)
def test_mutated_bytes_decode_or_are_refused_in_one_line(name, ops):
    outcome(mutate(seed_bytes(name), ops), f"mutated {name}")


@settings(FUZZ, max_examples=40)
@given(data=st.binary(max_size=256), magic=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a",
                                                             b"BM", b"II*\x00", b"RIFF\0\0\0\0WEBP"]))
def test_random_bytes_behind_any_magic_number(data, magic):
    outcome(magic + data, "random.bin")


# --- arrays, tensors and PIL images handed to inference ---------------------------------------------

@settings(FUZZ, max_examples=60)
@given(arr=hnp.arrays(dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.bool_]),
                      shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)),
       as_tensor=st.booleans(), size=st.integers(1, 16))
def test_arrays_become_rgb_or_a_user_error(arr, as_tensor, size):
    image = torch.from_numpy(arr.copy()) if as_tensor else arr
    try:
        rgb = to_uint8_array(image)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert arr.dtype == np.uint8 and rgb.dtype == torch.uint8 and rgb.shape[0] == 3 and min(rgb.shape) >= 1
    from multitag.data.decode import load_image

    assert load_image(image, size).shape == (3, size, size)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_pil_images_of_every_mode_convert_like_files(name):
    data = seed_bytes(name)
    with Image.open(io.BytesIO(data)) as im:
        assert torch.equal(to_uint8_array(im).contiguous(), decode_image(data).contiguous())


# --- files on disk: names, the resize, the cache, the predictor ------------------------------------

NAME_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\")
FILE_NAMES = st.text(NAME_CHARS, min_size=1, max_size=30).map(lambda s: f"{s} .jpg").filter(
    lambda s: len(s.encode()) < 200)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz images")


_counter = itertools.count()


def fresh_dir(root: Path) -> Path:
    """A new empty folder per hypothesis example (function-scoped tmp_path does not reset between them)."""
    d = root / f"ex{next(_counter)}"
    d.mkdir()
    return d


@settings(FUZZ, max_examples=30)
@given(file_name=FILE_NAMES, good=st.booleans(), size=st.integers(1, 48))
def test_unicode_and_space_paths_load_or_name_the_file(workdir, file_name, good, size):
    path = fresh_dir(workdir) / file_name
    path.write_bytes(seed_bytes("rgb.jpg") if good else b"\xff\xd8\xff broken")
    if good:
        assert load_and_resize(path, size).shape == (3, size, size)
    else:
        with pytest.raises(BadImageError) as info:
            load_and_resize(path, size)
        assert_one_line_naming(info.value, str(path))


def write_files(folder: Path, picks: list[tuple[str, list]]) -> tuple[list[str], list[bool]]:
    """Files from (seed, mutation ops) picks, plus whether each decodes: the expected valid flags."""
    paths, ok = [], []
    for i, (name, ops) in enumerate(picks):
        path = folder / f"{i} {name}"
        path.write_bytes(mutate(seed_bytes(name), ops) if ops else seed_bytes(name))
        paths.append(str(path))
        ok.append(outcome(path.read_bytes(), path.name)[0] == "decoded")
    return paths, ok


PICKS = st.lists(st.tuples(st.sampled_from(sorted(SEEDS)), st.one_of(st.just([]), OPS)), min_size=1, max_size=8)


@settings(FUZZ, max_examples=25)
@given(picks=PICKS)
def test_cache_in_skip_mode_keeps_the_good_and_lists_the_bad(workdir, picks):
    folder = fresh_dir(workdir)
    paths, ok = write_files(folder, picks)
    if not any(ok):
        with pytest.raises(UserError, match="none of the"):
            build_cache(paths, 16, folder / "cache", on_bad_image="skip", progress=False)
        return
    cache = build_cache(paths, 16, folder / "cache", on_bad_image="skip", progress=False)
    assert cache.valid.tolist() == ok
    assert [i for i, _, _ in cache.bad] == [i for i, good in enumerate(ok) if not good]
    assert not cache.array[~cache.valid].any()              # skipped rows stay zero
    if not all(ok):
        with pytest.raises(BadImageError) as info:          # error mode names the first bad file
            build_cache(paths, 16, folder / "cache2", on_bad_image="error", progress=False)
        assert info.value.path == paths[ok.index(False)]


@settings(FUZZ, max_examples=15)
@given(picks=PICKS)
def test_predict_each_answers_every_file_in_order(workdir, tiny_model, picks):
    paths, ok = write_files(fresh_dir(workdir), picks)
    preds = list(tiny_model.predict_each(paths + [str(workdir / "missing file.png")], batch_size=3))
    assert [p.source for p in preds] == paths + [str(workdir / "missing file.png")]
    for p, good in zip(preds, ok + [False]):
        if good:
            assert p.error is None and set(p.scores) == set(tiny_model.class_names)
            assert all(0.0 <= s <= 1.0 for s in p.scores.values())
        else:
            assert p.error and "\n" not in p.error and not p.scores


def test_max_pixels_above_pils_guard_is_the_limit_that_counts():
    """A 200 MP header is over PIL's process-wide guard (179 MP) but under max_pixels=250 MP: the
    header check passes it (PIL's guard is not consulted), so raising the limit really admits it."""
    from multitag.data.decode import check_pixels, header_pixels
    bomb = _png_bomb(14143)             # 14143^2 = 200,024,449 pixels
    assert header_pixels(bomb) == 14143 ** 2
    check_pixels(bomb, "scan.png", max_pixels=250_000_000)
    with pytest.raises(ImageTooLargeError, match="over the limit of 150,000,000"):
        check_pixels(bomb, "scan.png", max_pixels=150_000_000)
