"""Inference from a run directory: ``multitag.load(run_dir).predict(images)``.

The model and its preprocessing are rebuilt from model.json + model.safetensors alone (nothing
unpickled); images go through the same decode → squash-resize → normalise as in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from multitag.checkpoint import MODEL_META, MODEL_WEIGHTS, load_model_state, load_tensors, read_json
from multitag.data.decode import BadImageError, load_and_resize, resize_uint8, to_uint8_array
from multitag.data.transforms import normalize
from multitag.errors import UserError
from multitag.inference import logits_of, scores_from_logits
from multitag.models import build_model
from multitag.runtime import Runtime, choose_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Prediction:
    labels: list[str]                # predicted label set (multi-label) or [top-1] (single-label)
    scores: dict[str, float]         # every class's score (sigmoid or softmax)
    source: str = ""

    def to_dict(self) -> dict:
        return {"image": self.source, "labels": self.labels, "scores": self.scores}


class Model:
    """A trained model with its class names, thresholds and preprocessing."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / MODEL_META).exists():
            raise UserError(f"{self.run_dir} has no {MODEL_META}; point to a run directory made by `multitag train`.")
        self.meta = read_json(self.run_dir / MODEL_META)
        m = self.meta
        self.class_names: list[str] = m["class_names"]
        self.multi_label: bool = m["multi_label"]
        self.input_size: int = m["input_size"]
        self.mean, self.std = m["mean"], m["std"]
        self.network = build_model(m["model"]["name"], len(self.class_names), **m["model"]["args"])
        load_model_state(self.network, load_tensors(self.run_dir / MODEL_WEIGHTS), str(self.run_dir / MODEL_WEIGHTS))
        self.runtime = Runtime(choose_device(device), "fp32", False)
        self.network.to(self.runtime.device).eval()

    @property
    def thresholds(self) -> np.ndarray:
        """Calibrated per-class thresholds (fitted on validation data), or 0.5 where none were fitted."""
        t = self.meta.get("thresholds")
        return np.asarray(t, dtype=np.float32) if t is not None else np.full(len(self.class_names), 0.5, np.float32)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Paths, PIL images, HxWx3 arrays or (3,H,W) uint8 tensors → normalised (B, 3, S, S)."""
        batch = [load_and_resize(im, self.input_size) if isinstance(im, (str, Path))
                 else resize_uint8(to_uint8_array(im), self.input_size) for im in images]
        return normalize(torch.stack(batch), self.mean, self.std)

    def predict_scores(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """(N, C) class scores: sigmoid per class (multi-label) or softmax (single-label)."""
        images = list(images)
        batches = (self.preprocess(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
        if not images:
            return np.zeros((0, len(self.class_names)), np.float32)
        return scores_from_logits(logits_of(self.network, batches, self.runtime), self.multi_label).numpy()

    def predict(self, images: Sequence, threshold: float | str = "calibrated", top_k: int | None = None,
                batch_size: int = 64) -> list[Prediction]:
        """Label sets: scores ≥ the calibrated per-class thresholds (or a given float), or the top-k."""
        images = list(images)
        scores = self.predict_scores(images, batch_size)
        return [self._decide(s, threshold, top_k, str(im) if isinstance(im, (str, Path)) else "")
                for s, im in zip(scores, images)]

    def _decide(self, s: np.ndarray, threshold, top_k, source: str) -> Prediction:
        if top_k is not None or not self.multi_label:
            chosen = np.argsort(-s, kind="stable")[: (top_k or 1)]
        else:
            th = self.thresholds if threshold == "calibrated" else np.full_like(s, float(threshold))
            chosen = np.flatnonzero(s >= th)
            chosen = chosen[np.argsort(-s[chosen], kind="stable")]
        return Prediction([self.class_names[j] for j in chosen],
                          {c: float(v) for c, v in zip(self.class_names, s)}, source)


def load(run_dir: str | Path, device: str = "auto") -> Model:
    return Model(run_dir, device)


def expand_images(items: Iterable[str]) -> list[str]:
    """Image files named directly or found (recursively, sorted) in named folders."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            out.append(str(p))
        else:
            raise UserError(f"{item} does not exist; give image files or folders of images.")
    if not out:
        raise UserError("no images found in the given paths; give image files or folders with .jpg/.png images.")
    return out


__all__ = ["Model", "Prediction", "load", "expand_images", "BadImageError"]
