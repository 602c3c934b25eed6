"""The one image preprocessing definition shared by the training cache and inference.

Every image, whether it is cached for training or passed to ``predict``, goes through
``decode_image`` (or ``to_uint8_array``) and then ``resize_uint8``:

    file/bytes/PIL/numpy/tensor --> (3, H, W) uint8 RGB --> (3, size, size) uint8

Decisions (change ``PREPROCESS_VERSION`` when any of them changes, so caches rebuild):
- EXIF orientation is applied, so a phone photo is upright whichever way it was stored.
- Colour: everything becomes 8-bit RGB. Grayscale is repeated to 3 channels, palette
  images are expanded, CMYK is converted, 16-bit samples are rounded to 8 bits
  (v -> round(v / 257)). Alpha is DROPPED (the stored colour under a transparent pixel
  is kept), not composited: this is what torchvision's RGB mode and PIL's
  ``convert("RGB")`` both do, so the two decoders agree and so do most other tools.
- Decoder: torchvision (libjpeg-turbo/libpng/libwebp/giflib, no PIL round trip) for JPEG,
  PNG, WEBP and GIF, chosen by the file's magic bytes; PIL for everything else (BMP, TIFF,
  ...) and as a second try when torchvision refuses a file of its own formats. Both give
  the same pixels for the formats they share (PNG/GIF/WEBP exactly; JPEG within IDCT
  rounding, identical with the libjpeg-turbo builds here; tests/test_decode.py).
  Speed, JPEG decode only, one core (benchmarks/bench_cache.py, "decoder" rows, VOC2007
  images re-encoded): torchvision 241 us vs PIL 341 us per image at 320 px (1.4x faster),
  16 us vs 56 us at 32 px (3.5x: PIL's per-call overhead dominates small images).
- Resize: squash to size x size (aspect ratio not kept; no crop, so multi-label objects
  near the borders are never cut; no padding, so no pixels are wasted) with antialiased
  bilinear interpolation on uint8, result uint8.
- An animated GIF contributes its first frame.
"""
from __future__ import annotations

import io
import os
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
PREPROCESS_VERSION = 1

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]
ImageLike = Union[PathOrBytes, Image.Image, np.ndarray, torch.Tensor]

# Formats torchvision decodes natively, by magic bytes (WEBP is checked separately: RIFF....WEBP).
_TORCHVISION_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
)


class BadImageError(UserError):
    """An image file that is missing, unreadable, corrupt or truncated."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}; re-export or remove it, "
            f"or set data.on_bad_image=skip to leave unreadable images out"
        )

    def __reduce__(self):
        # Exceptions pickle as cls(*self.args); ours takes (path, reason), not the message.
        return (type(self), (self.path, self.reason))


def decode_image(source: PathOrBytes, name: str | None = None) -> torch.Tensor:
    """Decode a file path or encoded bytes to a (3, H, W) uint8 RGB tensor, EXIF-upright.

    The tensor is a view of (H, W, 3) memory (strides (1, 3W, 3)), as the decoders write it:
    the uint8 resize works on that layout directly and its output rows are what the cache
    stores, so keeping it saves two channel-interleaving copies (~40 % of the per-image
    time at 224 px). Call ``.contiguous()`` where CHW memory is needed.

    ``name`` is used in error messages when ``source`` is bytes.
    Raises BadImageError for a missing, unreadable, corrupt or truncated file.
    """
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
    if _torchvision_can_decode(data):
        try:
            return _decode_torchvision(data)
        except RuntimeError:
            pass  # PIL decides below: it reads some files libjpeg/libpng refuse, else it says why
    return _decode_pil(data, name)


def _torchvision_can_decode(data: bytes) -> bool:
    """True for JPEG, PNG, GIF and WEBP, judged by magic bytes, not the file extension."""
    return data.startswith(_TORCHVISION_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


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
    """PIL fallback for the formats torchvision does not decode (BMP, TIFF, ...)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now, so truncation raises here and not later
            return _pil_to_tensor(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError; SyntaxError/ValueError come from broken headers.
        reason = "not an image file PIL or torchvision can read" if isinstance(
            e, Image.UnidentifiedImageError) else str(e) or type(e).__name__
        raise BadImageError(name, reason) from None


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> (3, H, W) uint8 RGB, EXIF orientation applied, alpha dropped."""
    im = ImageOps.exif_transpose(im)  # no-op copy when there is no orientation tag
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale (PIL's convert would clip at 255 instead of scaling).
        gray = _u16_to_u8(torch.from_numpy(np.asarray(im).astype(np.int32)))  # (H, W)
        return gray[..., None].expand(-1, -1, 3).contiguous().permute(2, 0, 1)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, PA, LA, RGBA, CMYK, YCbCr, F ...
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) memory


def _u16_to_u8(img: torch.Tensor) -> torch.Tensor:
    """16-bit samples (0..65535, any int dtype) -> uint8 by round(v / 257), so 65535 -> 255."""
    v = img.to(torch.int32).clamp_(0, 65535)
    return ((v + 128) // 257).to(torch.uint8)


def to_uint8_array(image: ImageLike) -> torch.Tensor:
    """Whatever a user hands to inference -> (3, H, W) uint8 RGB tensor.

    Accepts a path or encoded bytes (decoded by ``decode_image``), a PIL image (EXIF
    orientation applied, like files), a numpy uint8 array (H, W), (H, W, 3) or (H, W, 4),
    or a torch uint8 tensor (3, H, W), (1, H, W), (4, H, W) or (H, W). Alpha is dropped.
    The result may share memory with the input and need not be CHW-contiguous.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return decode_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        return _numpy_to_tensor(_check_uint8(image, "numpy array"))
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(_check_uint8(image.detach().cpu(), "tensor"))
    raise UserError(
        f"cannot use a {type(image).__name__} as an image; pass a file path, bytes, "
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
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise _shape_error(arr.shape)
    hwc = np.ascontiguousarray(np.broadcast_to(arr[..., :3], (*arr.shape[:2], 3)))  # gray x3, alpha dropped
    if not hwc.flags.writeable:  # e.g. np.asarray(pil_image); torch warns on read-only memory
        hwc = hwc.copy()
    return torch.from_numpy(hwc).permute(2, 0, 1)


def _tensor_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """(H, W) or (C, H, W) with C in 1, 3, 4 -> (3, H, W); alpha dropped, gray repeated."""
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3 or img.shape[0] not in (1, 3, 4):
        raise _shape_error(tuple(img.shape))
    return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img[:3]


def _shape_error(shape: tuple) -> UserError:
    return UserError(f"image array of shape {tuple(shape)} is not an image; "
                     f"expected numpy (H, W), (H, W, 3) or (H, W, 4), or torch (3, H, W)")


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
