"""The one image preprocessing definition shared by the training cache and inference.

Every image, whether it is cached for training or passed to ``predict``, goes through
``decode_image`` (or ``to_uint8_array``) and then ``resize_uint8``:

    file/bytes/PIL/numpy/tensor --> (3, H, W) uint8 RGB --> (3, size, size) uint8

Decisions (change ``PREPROCESS_VERSION`` when any of them changes, so caches rebuild):
- EXIF orientation is applied, so a phone photo is upright whichever way it was stored (JPEG by
  torchvision; PNG, TIFF and a WEBP with EXIF by PIL, since torchvision reads JPEG's tag only).
- Colour: everything becomes 8-bit RGB. Grayscale is repeated to 3 channels, palette
  images are expanded, CMYK is converted, 16-bit samples are rounded to 8 bits
  (v -> round(v / 257); 16-bit colour PNGs: see "PNG" below). Alpha is DROPPED (the stored colour under a transparent pixel
  is kept), not composited: this is what torchvision's RGB mode and PIL's
  ``convert("RGB")`` both do, so the two decoders agree and so do most other tools.
- Decoder: torchvision (libjpeg-turbo/libwebp/giflib, no PIL round trip) for JPEG, WEBP
  and GIF, chosen by the file's magic bytes; PIL for PNG and everything else (BMP, TIFF,
  ...) and as a second try when torchvision refuses a file of its own formats. Both give
  the same pixels for the formats they share (GIF/WEBP exactly; JPEG within IDCT
  rounding, identical with the libjpeg-turbo builds here; tests/test_decode.py).
  Speed, JPEG decode only, one core (benchmarks/bench_cache.py, "decoder" rows, VOC2007
  images re-encoded): torchvision 241 us vs PIL 341 us per image at 320 px (1.4x faster),
  16 us vs 56 us at 32 px (3.5x: PIL's per-call overhead dominates small images).
- PNG goes through PIL, not torchvision: torchvision 0.29's decode_png crashes the whole
  process (SIGSEGV) on a PNG whose compressed pixel data is corrupt ("bad adaptive filter
  value", "IDAT: incorrect data check": libpng's longjmp crosses C++ frames), which
  tests/test_fuzz_images.py hits within a few hundred byte flips. PIL costs 690 vs 617 us
  per 224 px PNG, 47 vs 22 us at 32 px. PIL keeps the high byte of 16-bit colour PNGs
  (v -> v >> 8, at most 1 level from round(v / 257)); 16-bit grayscale is still rounded.
- PIL opens only the raster formats in ``PIL_FORMATS``: its EPS plugin runs Ghostscript,
  and no image dataset needs EPS, FITS, HDF5, WMF and the like.
- Size guard: before any pixel is decoded, the header's pixel count (every frame of a GIF)
  must be at most ``MAX_PIXELS`` (or the ``max_pixels`` given), else ``ImageTooLargeError``:
  a few KB of PNG can declare gigapixels (a decompression bomb). Bytes whose header PIL
  cannot parse are refused there too, so nothing unmeasured is ever decoded. Measured cost
  of the header parse: 14 us (PNG) to 26 us (JPEG) per image.
- Resize: squash to size x size (aspect ratio not kept; no crop, so multi-label objects
  near the borders are never cut; no padding, so no pixels are wasted) with antialiased
  bilinear interpolation on uint8, result uint8.
- An animated GIF contributes its first frame.
- A PIL image passed in memory is turned upright by its EXIF tag like a file is (so
  ``Image.open(path)`` and ``path`` give the same pixels). An image rotated by hand keeps the
  tag PIL copied onto it and is turned again: pass it with the tag removed, or as an array.
- Pixels under a GIF's transparent index have no defined colour: torchvision (a path) and PIL
  (a PIL image) may fill them differently; every other GIF pixel is the same.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import struct
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from multitag.errors import UserError

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call.
# They still work and are the fastest here (see above); PIL already covers every format, so
# when they go, _decode_torchvision is the one function to swap. Silence only that warning.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# Bump when decoding or resizing changes what comes out; part of the cache key.
# 2: PNG decoded by PIL (16-bit colour PNGs: v >> 8 instead of round(v / 257)).
# 3: WEBP with an EXIF orientation is turned upright (torchvision applies EXIF to JPEG only).
PREPROCESS_VERSION = 3

# Most pixels one image may declare (all frames of a GIF), checked from the header before
# decoding. 100 MP is 300 MB as RGB uint8, more than any camera photo; a 20000 x 20000 header
# (400 MP) is refused. Pass max_pixels= to decode_image, or set this, for bigger scans. It is the
# only limit: PIL's own guard (2 x Image.MAX_IMAGE_PIXELS = 179 MP, a process-wide setting) is not
# consulted, so raising this really admits bigger images and a refusal always names this limit.
MAX_PIXELS = 100_000_000

# What PIL may open: raster formats only (see the module docstring). JPEG covers MPO (multi-picture
# camera JPEGs), which the JPEG plugin opens.
PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO")
# Image.open(formats=...) finds only plugins already imported; importing all (Image.init) costs 0.1 s.
for _plugin in ("Bmp", "Gif", "Ico", "Jpeg", "Png", "Ppm", "Tga", "Tiff", "WebP"):   # BMP also registers DIB
    importlib.import_module(f"PIL.{_plugin}ImagePlugin")

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]
ImageLike = Union[PathOrBytes, Image.Image, np.ndarray, torch.Tensor]

# Formats torchvision decodes, by magic bytes (WEBP is checked separately: RIFF....WEBP).
# Not PNG: see the module docstring.
_TORCHVISION_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
)


class BadImageError(UserError):
    """An image file that is missing, unreadable, corrupt or truncated."""

    fix = "re-export or remove it"
    also = ""       # another way out, where there is one (a dataset's images: data.on_bad_image=skip)

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {_one_line(self.path)}: {_one_line(reason)}; {self.fix}{self.also}")

    def __reduce__(self):
        # Exceptions pickle as cls(*self.args); ours takes (path, reason), not the message.
        return (type(self), (self.path, self.reason))


class DatasetImageError(BadImageError):
    """An unreadable image of a dataset (training, eval, the image cache), which data.on_bad_image=skip can
    leave out; predict, explain and the service take single images, where that setting does not apply."""

    also = ", or set data.on_bad_image=skip to leave unreadable images out"


class NotAnImageError(BadImageError):
    """Bytes that no image format recognises (a text file named .jpg, an HTML error page, ...)."""


class ImageTooLargeError(BadImageError):
    """An image whose header declares more pixels than allowed; refused before decoding.

    ``pixels`` and ``limit`` are set when multitag's limit refused it; None when PIL's own did.
    """

    fix = "downscale it (or raise multitag.data.decode.MAX_PIXELS)"

    def __init__(self, path: str, reason: str, pixels: int | None = None, limit: int | None = None,
                 frames: int = 1) -> None:
        super().__init__(path, reason)
        self.pixels, self.limit, self.frames = pixels, limit, frames    # pixels counts every frame of a GIF

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.pixels, self.limit, self.frames))


def _one_line(text: str) -> str:
    """``text`` with control characters (line breaks in a file name or a reason) escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def decode_image(source: PathOrBytes, name: str | None = None, max_pixels: int | None = None) -> torch.Tensor:
    """Decode a file path or encoded bytes to a (3, H, W) uint8 RGB tensor, EXIF-upright.

    The tensor is a view of (H, W, 3) memory (strides (1, 3W, 3)), as the decoders write it:
    the uint8 resize works on that layout directly and its output rows are what the cache
    stores, so keeping it saves two channel-interleaving copies (~40 % of the per-image
    time at 224 px). Call ``.contiguous()`` where CHW memory is needed.

    ``name`` is used in error messages when ``source`` is bytes. ``max_pixels`` (default
    ``MAX_PIXELS``) bounds the pixel count the header may declare.
    Raises BadImageError for a missing, unreadable, corrupt or truncated file, and its
    subclass ImageTooLargeError for one over the pixel limit; never another exception.
    """
    data, name = read_checked(source, name, max_pixels)  # before the decoders allocate anything
    if _torchvision_can_decode(data):
        try:
            return _decode_torchvision(data)
        except RuntimeError:
            pass  # PIL decides below: it reads some files libjpeg refuses, else it says why
    return _decode_pil(data, name)


def read_checked(source: PathOrBytes, name: str | None = None, max_pixels: int | None = None) -> tuple[bytes, str]:
    """(encoded bytes, name for messages) of a path or bytes whose header passed the checks decode_image
    makes before decoding (it exists, is not empty, is an image PIL parses, within ``max_pixels``); no
    pixel is decoded. Raises what decode_image raises for those: BadImageError, ImageTooLargeError."""
    data, name = _read_source(source, name)
    check_pixels(data, name, max_pixels)
    return data, name


def _read_source(source: PathOrBytes, name: str | None) -> tuple[bytes, str]:
    """(encoded bytes, name for messages) of a path or bytes; a missing or empty file is a BadImageError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "<bytes>"
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:  # missing, permission denied, a directory, I/O error
            raise BadImageError(name, e.strerror or str(e)) from None
    if not data:
        raise BadImageError(name, "the file is empty")
    return data, name


def header_pixels(data: bytes, name: str = "<bytes>") -> int:
    """Pixel count the image header declares (width x height x frames for a GIF), decoding no pixels."""
    width, height, frames = _header_size(data, name)
    return width * height * frames


def check_pixels(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> None:
    """Raise ImageTooLargeError when the header declares more than ``max_pixels`` (default MAX_PIXELS)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    width, height, frames = _header_size(data, name)
    if width * height * frames > limit:
        times_frames = f" x {frames} frames" if frames > 1 else ""
        pixels = width * height * frames
        raise ImageTooLargeError(name, f"its header declares {width} x {height}{times_frames} = {pixels:,} pixels, "
                                       f"over the limit of {limit:,}", pixels, limit, frames)


def _header_size(data: bytes, name: str) -> tuple[int, int, int]:
    """(width, height, frames) from the header. PIL's ``Image.open`` parses only the header.

    Frames count for GIFs only: torchvision decodes every frame of a GIF (decode_image then
    keeps the first), so all of them cost memory; ``n_frames`` skips frame data undecoded.
    """
    with _pil_errors(name), _open_pil(data, name) as im:
        width, height = im.size
        return width, height, (im.n_frames if im.format == "GIF" else 1)


def _open_pil(data: bytes, name: str) -> Image.Image:
    """What ``Image.open(BytesIO(data), formats=PIL_FORMATS)`` returns, minus PIL's decompression-bomb
    check: the header is parsed (no pixels decoded) by the first plugin of ``PIL_FORMATS`` that
    accepts the bytes. ``check_pixels`` is the size guard here, with multitag's own limit; PIL's
    would refuse a 200 MP scan that MAX_PIXELS admits, and name its limit instead of ours."""
    for fmt in PIL_FORMATS:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(data[:16]) if accept else True
            if accepted and not isinstance(accepted, str):    # a str is a warning, which Image.open skips too
                return factory(io.BytesIO(data), name)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue                # not this format after all (what Image.open does too)
    raise Image.UnidentifiedImageError(f"cannot identify image file {name!r}")


def _torchvision_can_decode(data: bytes) -> bool:
    """True for JPEG, PNG, GIF and WEBP, judged by magic bytes, not the file extension; False for a
    WEBP with EXIF, whose orientation torchvision ignores (its apply_exif_orientation reads JPEG's
    only): PIL decodes that one and turns it upright."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        # extended WEBP: a VP8X chunk first, whose flags byte has 0x08 set when an EXIF chunk follows
        return not (data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x08)
    return data.startswith(_TORCHVISION_MAGIC)


def _decode_torchvision(data: bytes) -> torch.Tensor:
    """torchvision's native decoders -> (3, H, W) uint8. Raises RuntimeError on bad data."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # bytearray: writable
    img = _tv_decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if img.ndim == 4:  # animated GIF: (frames, 3, H, W) -> first frame
        img = img[0]
    if img.dtype == torch.uint16:  # 16-bit PNG
        img = _u16_to_u8(img)
    return img  # HWC memory as decoded, seen as (3, H, W); no copy (see decode_image)


def _decode_pil(data: bytes, name: str) -> torch.Tensor:
    """PIL for PNG and the formats torchvision does not decode (BMP, TIFF, ...)."""
    with _pil_errors(name), _open_pil(data, name) as im:
        im.load()  # decode now, so truncation raises here and not later
        return _pil_to_tensor(im)


# What PIL raises on broken bytes: OSError (UnidentifiedImageError, truncation), ValueError,
# EOFError, and the set Image.open itself treats as "not this format" (SyntaxError, IndexError,
# TypeError, struct.error); a GIF cut short raises IndexError while counting its frames.
_PIL_BROKEN = (OSError, ValueError, EOFError, SyntaxError, IndexError, TypeError, struct.error)


@contextlib.contextmanager
def _pil_errors(name: str):
    """Turn what PIL raises on bad bytes into BadImageError (ImageTooLargeError for PIL's bomb
    check, NotAnImageError when no format recognises the bytes)."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(name, str(e)) from None
    except Image.UnidentifiedImageError:
        raise NotAnImageError(name, "not an image file PIL or torchvision can read") from None
    except _PIL_BROKEN as e:
        raise BadImageError(name, str(e) or type(e).__name__) from None


def _load_pil(image: Image.Image) -> None:
    """Load a PIL image handed in by a user (a no-op once loaded): a closed one (PIL: a bare
    AssertionError or "Operation on closed image") is a UserError, a truncated file a BadImageError."""
    name = getattr(image, "filename", "") or "<PIL image>"
    try:
        image.load()
    except (AssertionError, ValueError) as e:
        if isinstance(e, ValueError) and "closed" not in str(e):
            raise BadImageError(name, str(e)) from None
        raise UserError("the PIL image is closed (its `with Image.open(...)` block ended, or .close() was "
                        "called, before it was used); use it inside the block, or pass .copy() of it") from None
    except _PIL_BROKEN as e:
        raise BadImageError(name, str(e) or type(e).__name__) from None


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> (3, H, W) uint8 RGB, EXIF orientation applied, alpha dropped."""
    im = ImageOps.exif_transpose(im)  # no-op copy when there is no orientation tag
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (PIL's convert would clip at 255 instead of scaling).
        gray = _u16_to_u8(torch.from_numpy(np.asarray(im).astype(np.int32)))  # (H, W)
        return gray[..., None].expand(-1, -1, 3).contiguous().permute(2, 0, 1)
    if im.mode == "La":
        im = im.convert("LA")   # premultiplied alpha: PIL converts it to LA only
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, PA, LA, RGBA, RGBa, CMYK, YCbCr, F ...
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) memory


def _u16_to_u8(img: torch.Tensor) -> torch.Tensor:
    """16-bit samples (0..65535, any int dtype) -> uint8 by round(v / 257), so 65535 -> 255."""
    v = img.to(torch.int32).clamp_(0, 65535)
    return ((v + 128) // 257).to(torch.uint8)


def to_uint8_array(image: ImageLike) -> torch.Tensor:
    """Whatever a user hands to inference -> (3, H, W) uint8 RGB tensor.

    Accepts a path, encoded bytes or a binary file object (decoded by ``decode_image``), a PIL image (EXIF
    orientation applied, like files), a numpy uint8 array (H, W), (H, W, 3) or (H, W, 4),
    or a torch uint8 tensor (3, H, W), (1, H, W), (4, H, W) or (H, W). Alpha is dropped.
    The result may share memory with the input and need not be CHW-contiguous.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return decode_image(image)
    if callable(getattr(image, "read", None)):     # an open binary file or BytesIO (an upload), read once
        if isinstance(image, io.TextIOBase):
            raise UserError(f"{getattr(image, 'name', 'the file')} is open in text mode; "
                            "open the file in binary mode ('rb').")
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise UserError(f"the {type(image).__name__} gave {type(data).__name__}, not bytes; "
                            "open the file in binary mode ('rb').")
        name = getattr(image, "name", None)
        return decode_image(data, name=name if isinstance(name, str) else None)
    if isinstance(image, Image.Image):
        _load_pil(image)
        return _pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        return _numpy_to_tensor(_check_uint8(image, "numpy array"))
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(_check_uint8(image.detach().cpu(), "tensor"))
    raise UserError(
        f"cannot use a {type(image).__name__} as an image; pass a file path, bytes, a binary file, "
        f"a PIL image, a numpy uint8 array (H, W, 3) or a torch uint8 tensor (3, H, W)"
    )


def _check_uint8(x, what: str):
    """Reject non-uint8 pixels: float images have no agreed range (0..1? 0..255?)."""
    if x.dtype not in (np.uint8, torch.uint8):
        raise UserError(
            f"image {what} has dtype {x.dtype}; pass uint8 pixels 0..255 "
            f"(e.g. (x * 255).round().astype('uint8') for a 0..1 float image)"
        )
    return x


def _numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (3, H, W) view of (H, W, 3) memory."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape[:2]:
        raise _shape_error(arr.shape)
    hwc = np.ascontiguousarray(np.broadcast_to(arr[..., :3], (*arr.shape[:2], 3)))  # gray x3, alpha dropped
    if not hwc.flags.writeable:  # e.g. np.asarray(pil_image); torch warns on read-only memory
        hwc = hwc.copy()
    return torch.from_numpy(hwc).permute(2, 0, 1)


def _tensor_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """(H, W) or (C, H, W) with C in 1, 3, 4 -> (3, H, W); alpha dropped, gray repeated."""
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3 or img.shape[0] not in (1, 3, 4) or 0 in img.shape[1:]:
        raise _shape_error(tuple(img.shape))
    return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img[:3]


def _shape_error(shape: tuple) -> UserError:
    """A wrong number of dimensions or channels, or no pixels at all (H or W of 0, which no resize takes)."""
    return UserError(f"image array of shape {tuple(shape)} is not an image; expected numpy (H, W), "
                     f"(H, W, 3) or (H, W, 4), or torch (3, H, W), with H and W at least 1")


def resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: squash (no crop, no pad), antialiased bilinear."""
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"resize_uint8 expects a (3, H, W) uint8 tensor, got {tuple(img.shape)} {img.dtype}")
    if img.shape[1] == size and img.shape[2] == size:
        return img
    return TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def resize_batch(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """A list of (3, H_i, W_i) uint8 images of any sizes -> (B, 3, size, size) uint8."""
    return torch.stack([resize_uint8(img, size) for img in images])


def load_and_resize(path: PathOrBytes, size: int) -> torch.Tensor:
    """Decode a file and resize it to the working size: (3, size, size) uint8.

    The single entry point used by both the training cache and ``predict``.
    """
    return resize_uint8(decode_image(path), size)


def load_image(image: ImageLike, size: int) -> torch.Tensor:
    """Anything ``to_uint8_array`` accepts -> (3, size, size) uint8, exactly as the cache does."""
    return resize_uint8(to_uint8_array(image), size)
