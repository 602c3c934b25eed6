"""Grad-CAM and Grad-CAM++ heat maps, aligned with the original image.

Every model family returns logits through ``forward_features`` (a (B, K, h, w) feature map) then
``forward_head``, so the class activation map is taken at the ``forward_features`` output for any
family (simple_cnn, timm ResNets, EfficientNets, ...).

Alignment. Preprocessing squashes the whole original W0×H0 image to S×S (no crop, no pad), so the
h×w feature grid covers the whole original image too: cell (i, j) is centred at
((j + 0.5)·W0/w, (i + 0.5)·H0/h) in original pixels. A bilinear resize of the h×w map straight to
H0×W0 with ``align_corners=False`` puts every cell centre exactly there, which undoes the squash
in one resampling (no offset, no stretching, nothing to un-letterbox).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multitag.data.decode import to_uint8_array
from multitag.errors import UserError, did_you_mean
from multitag.fileio import safe_name
from multitag.inference import scores_from_logits
from multitag.predict import Model, load

METHODS = ("gradcam", "gradcam++")
OVERLAY_ALPHA = 0.5      # weight of the colour map in the overlay; the image stays readable beneath


@dataclass
class CamResult:
    """One class's heat map on one image, at the original image's size."""

    class_name: str
    score: float             # the class's score (sigmoid, or softmax for single-label models)
    heatmap: np.ndarray      # (H0, W0) float32 in [0, 1], aligned with the original image
    overlay: np.ndarray      # (H0, W0, 3) uint8: the original blended with the coloured heat map
    method: str = "gradcam"


# ----------------------------------------------------------------------------- the maps

def check_method(method: str) -> str:
    """The method name, normalised; a UserError naming the valid ones otherwise."""
    m = str(method).lower().replace("_", "").replace("pp", "++")
    if m not in METHODS:
        raise UserError(f'unknown explanation method "{method}"{did_you_mean(method, METHODS)}.')
    return m


def _channel_weights(feats: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """(B, K, h, w) activations and gradients of one logit → (B, K) channel weights.

    Grad-CAM: the spatial mean of the gradient. Grad-CAM++ (Chattopadhyay et al. 2018, closed
    form with the exponential-score assumption): positive gradients weighted per position by
    alpha = g² / (2g² + ΣA·g³), which lets several instances of a class each contribute.
    """
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + feats.sum(dim=(2, 3), keepdim=True) * g3
    nonzero = denom != 0                                            # where g = 0, alpha is 0 (0/0)
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * grads.clamp(min=0)).sum(dim=(2, 3))


def cam_maps(network: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, top_k: int = 1,
             method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class activation maps for a normalised batch, at feature resolution.

    network: in eval mode, with forward_features / forward_head; x: (B, 3, S, S) on its device.
    classes: (B, k) class indices to explain, or None for each image's top_k classes by logit.
    Returns (maps (B, k, h, w) ≥ 0, unnormalised; classes (B, k); logits (B, C)), all on the CPU.

    The backbone runs once without a graph; only the head is differentiated, with respect to the
    feature map itself (the same gradient a hook on the feature output would see, at a fraction
    of the cost). Eval mode keeps the images of a batch independent, so one backward pass of the
    summed chosen logits gives every image its own gradient.
    """
    method = check_method(method)
    with torch.no_grad():
        feats = network.forward_features(x)
    if feats.ndim != 4:
        raise UserError(f"Grad-CAM needs a (B, K, h, w) feature map from forward_features; "
                        f"this model gives shape {tuple(feats.shape)}.")
    feats = feats.detach().float().requires_grad_(True)             # (B, K, h, w)
    with torch.enable_grad():
        logits = network.forward_head(feats.clone())                # clone: the head may work in place
        if classes is None:
            classes = logits.detach().topk(min(top_k, logits.shape[1]), dim=1).indices
        classes = torch.as_tensor(classes, device=logits.device).long().reshape(len(x), -1)  # (B, k)
        maps = []
        for k in range(classes.shape[1]):
            chosen = logits.gather(1, classes[:, k:k + 1]).sum()
            grads, = torch.autograd.grad(chosen, feats, retain_graph=k + 1 < classes.shape[1])
            w = _channel_weights(feats.detach(), grads, method)      # (B, K)
            maps.append(torch.relu((w[:, :, None, None] * feats.detach()).sum(1)))  # (B, h, w)
    return torch.stack(maps, 1).cpu(), classes.cpu(), logits.detach().float().cpu()


def to_original(cam: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(h, w) map → (height, width) float32 in [0, 1], aligned with the original (see module doc)."""
    up = F.interpolate(cam[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    peak = up.max()
    if peak > 0:
        up.div_(peak)                    # in place: at full size every copy is 4 bytes per pixel
    return up.clamp_(0, 1).numpy()


# ----------------------------------------------------------------------------- pictures

OVERLAY_CHUNK_PIXELS = 1 << 18     # blend this many pixels at a time: float temporaries stay ~15 MB


def jet(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] → (H, W, 3) float32 in [0, 1]: the classic blue→red 'jet' colours."""
    x = heat[..., None].astype(np.float32) * np.float32(4.0)
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)           # where red, green, blue peak
    return np.clip(np.float32(1.5) - np.abs(x - centres), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) heat map in [0, 1] → (H, W, 3) uint8 blend.

    Blended in row bands of about OVERLAY_CHUNK_PIXELS: at full size the float temporaries cost
    ~60 bytes per pixel (74 B/px measured before, 0.9 GB for a 12 MP photo), per band ~15 MB."""
    out = np.empty_like(image)
    rows = max(1, OVERLAY_CHUNK_PIXELS // max(1, image.shape[1]))
    for top in range(0, image.shape[0], rows):
        band = slice(top, top + rows)
        blend = np.float32(1 - alpha) * image[band].astype(np.float32) + np.float32(alpha * 255.0) * jet(heat[band])
        out[band] = np.clip(blend + np.float32(0.5), 0, 255)       # the uint8 cast truncates: +0.5 rounds
    return out


# ----------------------------------------------------------------------------- on a loaded model

def class_index(model: Model, class_name: str) -> int:
    """Index of a class name of the model; UserError with the closest name otherwise."""
    if class_name in model.class_names:
        return model.class_names.index(class_name)
    raise UserError(f'unknown class "{class_name}"{did_you_mean(class_name, model.class_names)}; '
                    f"the model's classes are in model.json.")


def explain_images(model: Model, images: Sequence, classes: Sequence[Sequence[int]] | None = None, top_k: int = 1,
                   method: str = "gradcam") -> list[list[CamResult]]:
    """Heat maps for several images: the given class indices per image, or each image's top_k classes.

    model: a ``multitag.predict.Model``; images: paths, PIL images, numpy (H, W, 3) uint8 arrays or
    (3, H, W) uint8 tensors, of any sizes. Returns, per image, one CamResult per explained class.
    """
    method = check_method(method)
    originals = [to_uint8_array(im) for im in images]                # each (3, H0, W0) uint8, EXIF-upright
    x = model.runtime.prepare_input(model.preprocess(originals))     # (B, 3, S, S), the exact eval input
    # The scores and the default class come from the model's own forward, as predict's do: a model
    # with test-time views (airbench's tta_flip) averages them there, not in forward_head.
    with torch.no_grad():
        logits = model.network(x).float().cpu()                      # (B, C)
    if classes is None:
        classes = logits.topk(min(top_k, logits.shape[1]), dim=1).indices
    maps, chosen, _ = cam_maps(model.network, x, torch.as_tensor(classes).long(), top_k, method)
    if maps.shape[-2:] == (1, 1):
        warnings.warn(f"the feature map is 1×1 at {x.shape[-1]} px, so the heat map is flat and cannot "
                      "localise; train at a larger data.image_size to explain this model.", stacklevel=2)
    scores = scores_from_logits(logits, model.multi_label).numpy()  # (B, C)
    results = []
    for b, original in enumerate(originals):
        hwc = original.permute(1, 2, 0).numpy()                      # (H0, W0, 3)
        row = []
        for k, c in enumerate(chosen[b].tolist()):
            heat = to_original(maps[b, k], *hwc.shape[:2])
            row.append(CamResult(model.class_names[c], float(scores[b, c]), heat, overlay(hwc, heat), method))
        results.append(row)
    return results


def gradcam(model: Model, image, class_name: str | None = None, method: str = "gradcam") -> CamResult:
    """Grad-CAM (or Grad-CAM++) of one class on one image; the top-scoring class when none is named."""
    classes = None if class_name is None else [[class_index(model, class_name)]]
    return explain_images(model, [image], classes, top_k=1, method=method)[0][0]


def _default_png(image, class_name: str, folder: Path | None = None) -> Path:
    """<image name>.<class>.cam.png in ``folder`` (default: the current one), the class made file-name safe."""
    stem = Path(image).stem if isinstance(image, (str, Path)) else "image"
    return (folder or Path.cwd()) / f"{stem}.{safe_name(class_name)}.cam.png"


def _out_folder(out) -> Path | None:
    """The folder ``out`` names (an existing directory, or a path ending in /), else None for a file.
    A file must be .png (or have no suffix, which becomes .png): the overlay is written as PNG."""
    if out is None:
        return None
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        return Path(out)
    suffix = Path(out).suffix.lower()
    if suffix not in ("", ".png"):
        raise UserError(f"--out {out}: the overlay is written as PNG; name a .png file or a folder.")
    return None


def explain_to_png(run_dir, image, class_name: str | None = None, method: str = "gradcam", out=None) -> Path:
    """Write the heat-map overlay of a class on an image as a PNG of the original size; returns its path.
    ``out``: a .png file (no suffix: .png is added), or a folder for the default file name."""
    folder = _out_folder(out)                  # checked before the model runs
    result = gradcam(load(run_dir), image, class_name, method)
    if out is None or folder is not None:
        path = _default_png(image, result.class_name, folder)
    else:
        path = Path(out) if Path(out).suffix else Path(f"{out}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.overlay).save(path, format="PNG")
    return path
