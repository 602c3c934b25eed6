"""multitag.data.decode: every input kind becomes (3, H, W) uint8 RGB, upright, then one resize."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from multitag.data.decode import (
    BadImageError,
    decode_image,
    load_and_resize,
    load_image,
    resize_batch,
    resize_uint8,
    to_uint8_array,
)
from multitag.errors import UserError

# torchvision 0.29 warns that its codecs are deprecated (decode.py silences it; pytest resets filters).

H, W = 20, 30


def rgb(seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 noise."""
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def save(path, array: np.ndarray, mode: str | None = None, **kw) -> str:
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    im.save(path, **kw)
    return str(path)


def pil_rgb(path) -> np.ndarray:
    """Reference: PIL's own RGB conversion, (H, W, 3)."""
    return np.asarray(Image.open(path).convert("RGB"))


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("ext", ["png", "bmp", "tiff", "gif", "webp"])
def test_lossless_formats_decode_exactly(tmp_path, ext):
    # GIF is palette-based: compare against PIL's view of the saved file, not the source array.
    kw = {"lossless": True} if ext == "webp" else {}
    path = save(tmp_path / f"a.{ext}", rgb(), **kw)
    out = decode_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, H, W)
    np.testing.assert_array_equal(hwc(out), pil_rgb(path))


def test_jpeg_decoders_agree(tmp_path):
    path = save(tmp_path / "a.jpg", rgb(), quality=90)
    from multitag.data.decode import _decode_pil, _decode_torchvision

    data = open(path, "rb").read()
    tv, pil = _decode_torchvision(data), _decode_pil(data, path)
    assert tv.shape == pil.shape == (3, H, W)
    assert (tv.int() - pil.int()).abs().max() <= 2  # same libjpeg-turbo family; allow IDCT rounding
    np.testing.assert_array_equal(hwc(decode_image(path)), hwc(tv))


@pytest.mark.parametrize("mode,ext", [("L", "png"), ("L", "jpg"), ("P", "png"),
                                      ("RGBA", "png"), ("LA", "png"), ("CMYK", "jpg")])
def test_other_modes_become_rgb(tmp_path, mode, ext):
    path = save(tmp_path / f"a.{ext}", rgb(), mode=mode)
    out = decode_image(path)
    assert out.shape == (3, H, W) and out.dtype == torch.uint8
    ref = pil_rgb(path)
    assert np.abs(hwc(out).astype(int) - ref).max() <= 2  # jpeg: IDCT rounding only


def test_rgba_drops_alpha(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (H, W, 4), dtype=np.uint8)
    a[..., 3] = 0  # fully transparent: the stored colour must survive (not composited to black)
    path = tmp_path / "a.png"
    Image.fromarray(a, "RGBA").save(path)
    np.testing.assert_array_equal(hwc(decode_image(path)), a[..., :3])


def test_16bit_png_scaled_to_8bit(tmp_path):
    v = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(v).save(path)
    out = decode_image(path)
    assert out.dtype == torch.uint8
    assert out[:, 0].tolist() == [[0, 1, 255, 128]] * 3


@pytest.mark.parametrize("suffix", ["jpg", "webp", "png"])
def test_exif_orientation_applied(tmp_path, suffix):
    """Every format that carries EXIF: torchvision reads JPEG's tag only, so a WEBP goes to PIL."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:6, :6] = (255, 0, 0)  # red top-left as stored
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / f"exif6.{suffix}"
    im.save(path, exif=exif.tobytes(), quality=95)
    out = decode_image(path)
    assert out.shape == (3, 40, 20)  # H and W swapped
    top_right = out[:, 2, -3].tolist()
    assert top_right[0] > 200 and top_right[1] < 50 and top_right[2] < 50  # red moved to top-right
    assert out[:, -3, 2].tolist() == pytest.approx([0, 0, 0], abs=20)
    # A PIL image with the tag (inference input) comes out the same way.
    np.testing.assert_array_equal(to_uint8_array(Image.open(path)).numpy(), out.numpy())


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.fromarray(rgb(i)).convert("P") for i in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = decode_image(path)
    assert out.shape == (3, H, W)
    np.testing.assert_array_equal(hwc(out), np.asarray(frames[0].convert("RGB")))


def test_bytes_same_as_path(tmp_path):
    path = save(tmp_path / "a.jpg", rgb())
    assert torch.equal(decode_image(open(path, "rb").read()), decode_image(path))


def _corrupt_files(tmp_path):
    good = open(save(tmp_path / "good.jpg", rgb()), "rb").read()
    files = {
        "truncated.jpg": good[: len(good) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + b"x" * 50,
        "text.jpg": b"hello, not an image",
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / n for n in files] + [tmp_path / "missing.jpg", tmp_path]


def test_bad_files_raise_bad_image_error(tmp_path):
    for path in _corrupt_files(tmp_path):
        with pytest.raises(BadImageError) as info:
            decode_image(path)
        assert str(path) in str(info.value) and "on_bad_image" not in str(info.value)   # a dataset's hint only
        assert isinstance(info.value, UserError) and info.value.reason
        again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
        assert (again.path, again.reason) == (info.value.path, info.value.reason)


def test_to_uint8_array_accepts_all_kinds(tmp_path):
    a = rgb()
    path = save(tmp_path / "a.png", a)
    want = torch.from_numpy(a).permute(2, 0, 1)
    for x in (path, open(path, "rb").read(), Image.open(path), a, want.clone(),
              np.dstack([a, np.full((H, W), 7, np.uint8)])):
        out = to_uint8_array(x)
        assert out.dtype == torch.uint8 and out.shape == (3, H, W)
        assert torch.equal(out, want), type(x)
    gray = a[..., 0]
    assert torch.equal(to_uint8_array(gray), torch.from_numpy(gray).expand(3, H, W))
    assert torch.equal(to_uint8_array(torch.from_numpy(gray)[None]), torch.from_numpy(gray).expand(3, H, W))


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 42])
def test_to_uint8_array_rejects_with_user_error(bad):
    with pytest.raises(UserError):
        to_uint8_array(bad)


def test_resize_squashes_to_uint8_square():
    img = torch.from_numpy(rgb()).permute(2, 0, 1).contiguous()  # (3, 20, 30)
    out = resize_uint8(img, 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert resize_uint8(out, 16) is out  # already the working size: untouched
    flat = torch.full((3, 50, 10), 77, dtype=torch.uint8)
    assert torch.equal(resize_uint8(flat, 8), torch.full((3, 8, 8), 77, dtype=torch.uint8))  # no pad, no crop
    batch = resize_batch([img, flat], 12)
    assert batch.shape == (2, 3, 12, 12) and batch.dtype == torch.uint8
    with pytest.raises(ValueError):
        resize_uint8(img.float(), 8)


def test_inference_inputs_match_cache_preprocessing(tmp_path):
    path = save(tmp_path / "a.png", rgb())
    want = load_and_resize(path, 24)
    assert torch.equal(want, resize_uint8(decode_image(path), 24))
    for x in (Image.open(path), np.asarray(Image.open(path)), path):
        assert torch.equal(load_image(x, 24), want)


def test_a_closed_or_truncated_pil_image_is_one_sentence(tmp_path):
    from multitag.data.decode import BadImageError
    from multitag.errors import UserError

    Image.fromarray(rgb(0)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as never_loaded:
        pass
    loaded = Image.open(tmp_path / "a.png")
    loaded.load()
    loaded.close()
    for closed in (never_loaded, loaded):
        with pytest.raises(UserError, match="the PIL image is closed"):
            to_uint8_array(closed)
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])
    with pytest.raises(BadImageError, match="cut.png"):
        to_uint8_array(Image.open(tmp_path / "cut.png"))


def test_a_text_mode_file_is_one_clear_error(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    with open(path) as text, pytest.raises(UserError, match=r"a.png is open in text mode.*'rb'"):
        to_uint8_array(text)
    with open(path, "rb") as binary:
        assert to_uint8_array(binary).shape == (3, 8, 8)


def test_premultiplied_alpha_modes_decode_like_their_straight_alpha_forms():
    straight = Image.new("LA", (4, 4), (100, 255))
    assert torch.equal(to_uint8_array(straight.convert("La")), to_uint8_array(straight))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert torch.equal(to_uint8_array(rgba.convert("RGBa")), to_uint8_array(rgba))
