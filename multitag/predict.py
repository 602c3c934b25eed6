"""Inference from a run directory: ``multitag.load(run_dir).predict(images)``.

One predictor for every face (CLI, app, HTTP service, Python): it rebuilds the preprocessing
and thresholds from model.json and runs the network on one backend:

  torch        the PyTorch network rebuilt from model.safetensors (nothing unpickled)
  onnx         ONNX Runtime on RUN_DIR/model.onnx, written by `multitag export RUN_DIR`
  onnx-int8    ONNX Runtime on RUN_DIR/model.int8.onnx (`multitag export RUN_DIR --int8`); only
               when asked for by name, since its accuracy cost is measured, not zero

``backend="auto"`` picks onnx when model.onnx exists and ONNX Runtime can use the chosen device
(a CPU-only onnxruntime must not turn a GPU run into a CPU one), else torch; an exported file whose
sha256 is not the one model.json recorded at export is refused on every choice. Either way the images
go through the same decode → squash-resize → normalise as in training, and the same per-class
thresholds decide the labels, so the backends differ only by float rounding.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from multitag.checkpoint import MODEL_META, MODEL_WEIGHTS, load_model_state, load_tensors, read_json
from multitag.data.decode import BadImageError, load_image
from multitag.data.transforms import normalize
from multitag.errors import UserError, did_you_mean
from multitag.inference import logits_of, scores_from_logits
from multitag.models import build_model
from multitag.models.registry import configured_args, get_spec
from multitag.progress import track
from multitag.runtime import Runtime, choose_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ONNX_MODEL = "model.onnx"
ONNX_INT8_MODEL = "model.int8.onnx"
# Images per forward pass when scoring many (predict, eval, calibrate, report). fp32 channels_last on
# 2 CPU cores, img/s at 64 vs 256: ResNet-18 layout @224 68 vs 63, @128 205 vs 182, EfficientNet-Lite0
# @224 48 vs 29, Inception-ResNet-v1 small @160 1,133 vs 669 (benchmarks/RESULTS.md, run K).
SCORING_BATCH = 64
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
_ONNX_FILES = {"onnx": ONNX_MODEL, "onnx-int8": ONNX_INT8_MODEL}
_EXPORT_KEYS = {"onnx": "onnx", "onnx-int8": "int8"}     # backend → its record in model.json "export"


@dataclass
class Prediction:
    labels: list[str]                # predicted label set (multi-label) or [top-1] (single-label)
    scores: dict[str, float]         # every class's score (sigmoid or softmax); empty when error is set
    source: str = ""
    error: str | None = None         # why this image could not be read (predict_each only)

    def to_dict(self) -> dict:
        return {"image": self.source, "labels": self.labels, "scores": self.scores, "error": self.error}


def parse_threshold(value, name: str = "threshold") -> str | float:
    """'calibrated' (the run's per-class thresholds) or one float in [0, 1] for every class."""
    if isinstance(value, str) and value.strip().lower() == "calibrated":
        return "calibrated"
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 <= t <= 1.0:  # also false for NaN
        raise UserError(f"{name}={value!r} is invalid; use 'calibrated' or a number in [0, 1]")
    return t


def check_top_k_alone(top_k, threshold, k: str = "top_k", t: str = "threshold") -> None:
    """top-k returns the k best classes whatever their scores, so a threshold beside it would be
    ignored: a UserError naming both options as the caller spells them (``threshold`` parsed)."""
    if top_k is not None and threshold != "calibrated":
        raise UserError(f"give {k} or {t}, not both: {k} returns the k best classes whatever their scores")


def check_top_k(top_k, num_classes: int, name: str = "top_k") -> None:
    """None (decide by thresholds) or a whole number of classes from 1 to ``num_classes``."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_classes:
        raise UserError(f"{name}={top_k!r} is invalid; use a whole number from 1 to {num_classes} (the classes)")


def as_image_list(images) -> list:
    """``images`` as a list, refusing one image passed alone: a path string would be read character by
    character, an (H, W, 3) array row by row."""
    from PIL import Image

    if isinstance(images, (str, Path, bytes, bytearray, Image.Image)) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3):
        raise UserError(f"predict takes a list of images, got one {type(images).__name__}; "
                        "pass [image] (the result is then a list of one Prediction)")
    return list(images)


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(run_dir: str | Path) -> str:
    """sha256 of the run's model.safetensors: ties an exported ONNX file to the weights it came from."""
    return file_digest(Path(run_dir) / MODEL_WEIGHTS)


# --- backends: a normalised float32 batch (B, 3, S, S) → logits (B, C) float32 on the CPU ----------

class TorchBackend:
    name = "torch"

    def __init__(self, network: torch.nn.Module, runtime: Runtime):
        self.network, self.runtime = network, runtime

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.network, [x], self.runtime)


class OnnxBackend:
    """An ONNX Runtime session on one exported file, using torch's thread count (one knob for both)."""

    def __init__(self, path: Path, device: torch.device, name: str = "onnx"):
        import onnxruntime as ort

        self.name, self.path = name, path
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3          # ORT's per-node placement notes are noise for users
        # Idle ORT threads busy-wait by default: on a few shared cores that steals the CPU from
        # everything else in the process (torch, a second session, the web server).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers + ["CPUExecutionProvider"])
        except Exception as e:
            # ORT's errors (InvalidProtobuf, Fail, ...) derive from Exception only; anything else is a bug.
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise UserError(f"{path} cannot be loaded by ONNX Runtime ({' '.join(str(e).split())[:300]}); "
                            f"run `multitag export {path.parent}` again, or use the torch backend.") from None
        self.input = self.session.get_inputs()[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input.name: x})[0])


def onnx_can_use(device: torch.device) -> bool:
    """Whether the installed onnxruntime runs on ``device`` (the CPU always; CUDA with onnxruntime-gpu)."""
    if device.type != "cuda":
        return True
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# --- checks on a run directory's files: they may have been edited, damaged or planted --------------

_RESTORE = "the run directory was edited or damaged: restore it from a copy of the run or train again."

# Largest input_size accepted from model.json: a tampered 10**9 would make every image a
# 10**9-pixel-square resize. Recipes use 32 to 320 px.
MAX_INPUT_SIZE = 4096

# Model keyword arguments with which timm's create_model reads a file (a torch pickle, even);
# a run directory is rebuilt from its own files only.
_FILE_ARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"})


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_is_number(x) for x in v)


# (field, check(value, meta), what it must be); in order: later checks may rely on earlier fields.
_META_FIELDS = (
    ("class_names", lambda v, m: isinstance(v, list) and len(v) > 0 and all(isinstance(c, str) for c in v)
     and len(set(v)) == len(v), "a list of distinct class names"),
    ("multi_label", lambda v, m: isinstance(v, bool), "true or false"),
    ("input_size", lambda v, m: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIZE,
     f"a size in pixels from 1 to {MAX_INPUT_SIZE}"),
    ("mean", lambda v, m: _numbers(v, 3), "a list of 3 numbers"),
    ("std", lambda v, m: _numbers(v, 3) and all(x > 0 for x in v), "a list of 3 positive numbers"),
    ("model", lambda v, m: isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("args"), dict),
     'an object {"name": ..., "args": {...}}'),
    ("thresholds", lambda v, m: v is None or _numbers(v, len(m["class_names"])), "null or one number per class"),
    ("export", lambda v, m: v is None or isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()),
     "an object of export records"),
)


def check_meta(meta, path: Path) -> None:
    """Refuse a model.json that `multitag train` cannot have written, naming the field."""
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a JSON {type(meta).__name__}, not an object; {_RESTORE}")
    for field, ok, expected in _META_FIELDS:
        value = meta.get(field)
        if not ok(value, meta):
            raise UserError(f'{path}: "{field}" is {json.dumps(value)[:60]}, not {expected}; {_RESTORE}')
    named = _file_args(meta["model"]["args"])
    if named:
        raise UserError(f"{path}: model args name a file to load ({', '.join(named)}); a run is rebuilt from its "
                        f"own files only; {_RESTORE}")


def _file_args(args) -> list[str]:
    """Keys of ``args``, nested too (a CNN-RNN's backbone_args), that make a model builder read a file."""
    if isinstance(args, dict):
        return [k for k in args if k in _FILE_ARGS] + [k for v in args.values() for k in _file_args(v)]
    if isinstance(args, list):
        return [k for v in args for k in _file_args(v)]
    return []


def check_shapes(net: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, num_classes: int) -> None:
    """Refuse weights whose tensor shapes differ from the network model.json describes (e.g. another
    class count); torch would raise a multi-line RuntimeError."""
    expected = net.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{source} does not fit model.json: tensor {key} has shape {tuple(tensor.shape)}, but "
                            f"the network model.json describes ({num_classes} classes) needs "
                            f"{tuple(expected[key].shape)}; {_RESTORE}")


def files_outside(onnx_path: Path, run_dir: Path) -> list[str]:
    """Files that loading ``onnx_path`` would read outside ``run_dir``: the file itself when it is a
    link out, and external tensor data it names (ONNX Runtime before ~1.24 follows "../" there)."""
    from google.protobuf.message import DecodeError
    from onnx import load
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    run = run_dir.resolve()
    if not onnx_path.resolve().is_relative_to(run):
        return [str(onnx_path.resolve())]
    try:
        model = load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError):       # not a model at all: ONNX Runtime says why when it is opened
        return []
    locations = (ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t))
    return [str(target) for loc in locations
            if not (target := (onnx_path.parent / loc).resolve()).is_relative_to(run)]


# --- the predictor --------------------------------------------------------------------------------

class Model:
    """A trained model with its class names, thresholds and preprocessing, on a torch or ONNX backend."""

    def __init__(self, run_dir: str | Path, device: str = "auto", backend: str = "auto"):
        self.run_dir = Path(run_dir)
        if self.run_dir.is_file() and (self.run_dir.parent / MODEL_META).exists():
            raise UserError(f"{self.run_dir} is a file of a run; pass the run directory, {self.run_dir.parent}.")
        if not (self.run_dir / MODEL_META).exists():
            raise UserError(f"{self.run_dir} has no {MODEL_META}; point to a run directory made by `multitag train`.")
        self.meta = read_json(self.run_dir / MODEL_META)
        check_meta(self.meta, self.run_dir / MODEL_META)
        m = self.meta
        self.class_names: list[str] = m["class_names"]
        self.multi_label: bool = m["multi_label"]
        self.input_size: int = m["input_size"]
        self.mean, self.std = m["mean"], m["std"]
        # fp32 (bf16 would move scores past the calibrated thresholds) in channels_last: never slower
        # here, 1.0-2x faster (benchmarks/RESULTS.md, "Performance (issue 9)"); the input follows it.
        self.runtime = Runtime(choose_device(device, "device"), "fp32", True)
        self._network: torch.nn.Module | None = None
        self.backend = self._resolve_backend(backend)
        if self.backend == "torch":
            self._engine = TorchBackend(self.network, self.runtime)
        else:
            self._engine = self._open_onnx(self.backend)

    # -- backend choice ---------------------------------------------------------------------------

    def _resolve_backend(self, backend: str) -> str:
        if backend not in BACKENDS:
            raise UserError(f'unknown backend "{backend}"{did_you_mean(backend, BACKENDS)}.')
        if backend != "auto":
            problem = self._onnx_problem(backend) if backend != "torch" else None
            if problem:
                raise UserError(problem)
            if backend != "torch":
                self._check_unchanged(backend)
            return backend
        if not (self.run_dir / ONNX_MODEL).exists() or not onnx_can_use(self.runtime.device):
            return "torch"
        problem = self._onnx_problem("onnx")
        if problem:
            # eval, report and explain load runs this way too; they must keep working after a resume
            warnings.warn(f"{problem} Using the torch backend.", stacklevel=3)
            return "torch"
        self._check_unchanged("onnx")
        return "onnx"

    def _export_record(self, backend: str) -> dict:
        return (self.meta.get("export") or {}).get(_EXPORT_KEYS[backend], {})

    def _onnx_problem(self, backend: str) -> str | None:
        """Why model.onnx / model.int8.onnx cannot be used (missing, or exported from other weights
        than model.safetensors, e.g. before a resumed run improved them), or None."""
        name = (self.meta.get("model") or {}).get("name", "")
        if name and not get_spec(name).exportable:
            return f"the {name} model cannot be exported to ONNX, so it runs on the torch backend only."
        path = self.run_dir / _ONNX_FILES[backend]
        redo = f"`{self._export_command(backend)}`"
        if not path.exists():
            return f"{path} does not exist; run {redo} first, or use the torch backend."
        record = self._export_record(backend)
        if not (self.run_dir / MODEL_WEIGHTS).is_file():   # nothing to tie the export to
            return f"{self.run_dir / MODEL_WEIGHTS} is missing, so {path} cannot be checked; restore the run."
        if record.get("weights_sha256") != weights_digest(self.run_dir):
            return f"{path} was not exported from the current {MODEL_WEIGHTS}; run {redo} again, or delete it."
        if "sha256" not in record:       # exported before multitag recorded the file's own digest
            return f"{MODEL_META} records no sha256 of {path}, so it cannot be checked; run {redo} again."
        outside = files_outside(path, self.run_dir)
        if outside:
            return (f"{path} reads {outside[0]}, outside {self.run_dir}; ONNX files are loaded only from the run "
                    f"directory: run {redo} again, or use the torch backend.")
        return None

    def current_exports(self) -> dict[str, Path]:
        """The exported files that are there, come from model.safetensors and are unchanged since:
        {their record's key in model.json "export" ("onnx", "int8"): path}."""
        return {_EXPORT_KEYS[b]: self.run_dir / name for b, name in _ONNX_FILES.items()
                if (self.run_dir / name).exists() and not self._onnx_problem(b)
                and self._export_record(b).get("sha256") == file_digest(self.run_dir / name)}

    def _check_unchanged(self, backend: str) -> None:
        """Refuse an exported file whose bytes are not those `multitag export` recorded (edited, damaged or
        replaced since). Unlike a stale export (a resumed run), no multitag step does that, so ``auto``
        refuses it too rather than quietly running the torch backend beside a file that is not the run's."""
        path, recorded = self.run_dir / _ONNX_FILES[backend], str(self._export_record(backend).get("sha256"))
        actual = file_digest(path)
        if actual != recorded:
            raise UserError(f"{path} does not match the run's {MODEL_META} (sha256 {actual[:12]}…, recorded "
                            f"{recorded[:12]}…); export again with {self._export_command(backend)}.")

    def _export_command(self, backend: str) -> str:
        """The command that writes ``backend``'s file again."""
        return f"multitag export {self.run_dir}{' --int8' if backend == 'onnx-int8' else ''}"

    def _open_onnx(self, backend: str) -> OnnxBackend:
        path = self.run_dir / _ONNX_FILES[backend]
        engine = OnnxBackend(path, self.runtime.device, backend)
        shape = engine.input.shape        # ['batch', 3, S, S]
        if list(shape[1:]) != [3, self.input_size, self.input_size]:
            raise UserError(f"{path} takes input {shape}, but model.json says {self.input_size} px; "
                            f"re-run `multitag export {self.run_dir}`.")
        return engine

    @property
    def network(self) -> torch.nn.Module:
        """The PyTorch network (eval mode, on the runtime's device); built on first use for ONNX
        backends, since only Grad-CAM and training-side tools need it there."""
        if self._network is None:
            self._network = self._build_network().to(self.runtime.device, memory_format=torch.channels_last).eval()
        return self._network

    def _build_network(self) -> torch.nn.Module:
        """model.json's architecture with model.safetensors' weights; a mismatch is a UserError."""
        spec, weights = self.meta["model"], self.run_dir / MODEL_WEIGHTS
        try:
            net = build_model(spec["name"], len(self.class_names), **configured_args(spec["name"], spec["args"], False))
        except (UserError, ValueError) as e:   # unknown name or args; ValueError: a constructor refusing a value
            raise UserError(f"{self.run_dir / MODEL_META} describes a model that cannot be built: {e}") from None
        state = load_tensors(weights)
        check_shapes(net, state, weights, len(self.class_names))
        load_model_state(net, state, str(weights))
        return net

    @property
    def thresholds(self) -> np.ndarray:
        """Calibrated per-class thresholds (fitted on validation data), or 0.5 where none were fitted."""
        t = self.meta.get("thresholds")
        return np.asarray(t, dtype=np.float32) if t is not None else np.full(len(self.class_names), 0.5, np.float32)

    # -- preprocessing and scoring ----------------------------------------------------------------

    def pixels(self, image) -> torch.Tensor:
        """One path, bytes, PIL image, HxWx3 array or (3,H,W) uint8 tensor → (3, S, S) uint8.
        Raises BadImageError for a file that cannot be read."""
        return load_image(image, self.input_size)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Images (anything ``pixels`` takes) → normalised float32 (B, 3, S, S)."""
        return normalize(torch.stack([self.pixels(im) for im in images]), self.mean, self.std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, S, S) → logits (B, C) float32 on the CPU, on this model's backend."""
        self._check_batch(x)
        return self._engine(x)

    def _check_batch(self, x) -> None:
        """The same one sentence on every backend for what is not a batch ``preprocess`` made (raw uint8
        pixels would be scored without normalisation; a wrong size fails deep in torch or ONNX Runtime)."""
        size = self.input_size
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4
                and tuple(x.shape[1:]) == (3, size, size)):
            got = (f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                   else f"a {type(x).__name__}")
            raise UserError(f"scores/logits take a normalised float (B, 3, {size}, {size}) batch as preprocess() "
                            f"makes it, got {got}; pass images to predict() or predict_scores() instead.")

    def scores(self, x: torch.Tensor) -> np.ndarray:
        """Normalised (B, 3, S, S) → (B, C) scores: sigmoid per class (multi-label) or softmax."""
        return scores_from_logits(self.logits(x), self.multi_label).numpy()

    def predict_scores(self, images: Sequence, batch_size: int = SCORING_BATCH) -> np.ndarray:
        """(N, C) class scores of the images. Raises BadImageError on the first unreadable one."""
        images = as_image_list(images)
        if not images:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate([self.scores(self.preprocess(images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def predict(self, images: Sequence, threshold: float | str = "calibrated", top_k: int | None = None,
                batch_size: int = SCORING_BATCH) -> list[Prediction]:
        """Label sets: scores ≥ the calibrated per-class thresholds (or a given float), or the top-k."""
        images = as_image_list(images)
        threshold = self.check_choice(threshold, top_k, warn=True)       # before any image is scored
        scores = self.predict_scores(images, batch_size)
        return [self.decide(s, threshold, top_k, _name_of(im)) for s, im in zip(scores, images)]

    def predict_each(self, images: Iterable, threshold: float | str = "calibrated", top_k: int | None = None,
                     batch_size: int = 32, progress: bool = False) -> Iterator[Prediction]:
        """Like ``predict``, lazily and batch by batch, in input order; an image that cannot be read
        yields a Prediction with ``error`` set (and no scores) instead of failing its batch."""
        images = as_image_list(images)
        threshold = self.check_choice(threshold, top_k, warn=True)
        chunks = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        if progress:
            chunks = track(chunks, -(-len(images) // batch_size), "predicting")
        for chunk in chunks:
            yield from self._predict_chunk(chunk, threshold, top_k)

    def _predict_chunk(self, chunk: list, threshold, top_k) -> list[Prediction]:
        pixels, errors = [], {}
        for i, image in enumerate(chunk):          # decode one by one so a bad file fails alone
            try:
                pixels.append(self.pixels(image))
            except BadImageError as e:
                errors[i] = e.reason
            except UserError as e:                 # not an image at all (a float array, None, ...)
                errors[i] = str(e)
        scores = iter(self.scores(normalize(torch.stack(pixels), self.mean, self.std)) if pixels else [])
        return [Prediction([], {}, _name_of(im), errors[i]) if i in errors
                else self.decide(next(scores), threshold, top_k, _name_of(im)) for i, im in enumerate(chunk)]

    def check_choice(self, threshold, top_k, warn: bool = False) -> str | float:
        """The threshold, parsed ('calibrated' or a float in [0, 1]), once top_k is checked too: a UserError
        for a value that would silently pick no class or every class. ``warn``: say (once per call of
        predict) that a threshold does nothing for a single-label model."""
        check_top_k(top_k, len(self.class_names))
        parsed = parse_threshold(threshold)
        check_top_k_alone(top_k, parsed)
        if warn and not self.multi_label and parsed != "calibrated" and top_k is None:
            warnings.warn("the threshold applies to multi-label models; this single-label one predicts its top "
                          "class (use top-k for more)", UserWarning, stacklevel=3)
        return parsed

    def decide(self, s: np.ndarray, threshold: float | str = "calibrated", top_k: int | None = None,
               source: str = "") -> Prediction:
        """One image's scores (C,) → its Prediction (labels sorted by score)."""
        threshold = self.check_choice(threshold, top_k)
        if top_k is not None or not self.multi_label:
            chosen = np.argsort(-s, kind="stable")[: (top_k or 1)]
        else:
            th = self.thresholds if threshold == "calibrated" else np.full_like(s, float(threshold))
            chosen = np.flatnonzero(s >= th)
            chosen = chosen[np.argsort(-s[chosen], kind="stable")]
        return Prediction([self.class_names[j] for j in chosen],
                          {c: float(v) for c, v in zip(self.class_names, s)}, source)


Predictor = Model   # the name the issue uses; Model stays the public one


def score_vs_threshold(score: float, threshold: float, decimals: int = 2) -> str:
    """"0.74 ≥ 0.33" or "0.0496 < 0.0504": the decision of ``decide`` (a score at or above the threshold is
    a label), with more decimals where fewer would round both to one number and print "0.05 < 0.05"."""
    score, threshold = float(score), float(threshold)
    if score >= threshold:       # rounding keeps the order: ≥ stays true at any number of decimals
        return f"{score:.{decimals}f} ≥ {threshold:.{decimals}f}"
    for n in range(decimals, 13):
        s, t = f"{score:.{n}f}", f"{threshold:.{n}f}"
        if float(s) < float(t):
            return f"{s} < {t}"
    return f"{score!r} < {threshold!r}"        # the shortest repr tells any two floats apart


def _name_of(image) -> str:
    return str(image) if isinstance(image, (str, Path)) else ""


def load(run_dir: str | Path, device: str = "auto", backend: str = "auto") -> Model:
    """The predictor of a run directory; see the module docstring for ``backend``."""
    return Model(run_dir, device, backend)


# --- writing predictions -------------------------------------------------------------------------

OUTPUT_FORMATS = ("text", "csv", "json")


def write_predictions(predictions: Sequence[Prediction], class_names: Sequence[str], fmt: str, stream) -> None:
    """Predictions to a text stream.

    csv:  image, labels ("|"-separated, so class names may hold spaces or commas), one score
          column per class, error (empty when the image was read)
    json: a list of {"image", "labels", "scores", "error"}
    text: one line per image for people: labels, then the three best scores
    """
    if fmt == "csv":
        import csv

        writer = csv.writer(stream)
        writer.writerow(["image", "labels", *class_names, "error"])
        for p in predictions:
            scores = [f"{p.scores[c]:.6f}" for c in class_names] if p.error is None else [""] * len(class_names)
            writer.writerow([p.source, "|".join(p.labels), *scores, p.error or ""])
    elif fmt == "json":
        json.dump([p.to_dict() for p in predictions], stream, indent=2)
        stream.write("\n")
    elif fmt == "text":
        for p in predictions:
            stream.write(f"{p.source}: {_describe(p)}\n")
    else:
        raise UserError(f'unknown output format "{fmt}"{did_you_mean(fmt, OUTPUT_FORMATS)}.')


def _describe(p: Prediction) -> str:
    if p.error is not None:
        return f"ERROR {p.error}"
    top = sorted(p.scores.items(), key=lambda kv: -kv[1])[:3]
    return f"{' '.join(p.labels) or '(none)'}   [" + ", ".join(f"{k} {v:.2f}" for k, v in top) + "]"


# --- finding the files to predict -----------------------------------------------------------------

def expand_images(items: Iterable[str]) -> list[str]:
    """Files named directly, every file (recursively, sorted) in named folders, and glob matches
    (``"photos/**/*.jpg"`` quoted, so it reaches us unexpanded), in order, without duplicates.

    Nothing is filtered by name: folders may hold non-images and a name may be missing; they are
    kept so that ``predict_each`` reports each one with its reason instead of dropping it silently.
    Hidden files and folders (".DS_Store", ".git/") are skipped. Raises UserError only when the
    arguments name nothing at all.
    """
    out: dict[str, str] = {}         # one file under any spelling (a/x.png, ./a/x.png) -> as first given
    for item in items:
        for path in _expand_one(item):
            out.setdefault(os.path.realpath(path), path)
    if not out:
        raise UserError("no files found in the given paths; give image files, folders or quoted globs.")
    return list(out.values())


def _expand_one(item: str) -> list[str]:
    p = Path(item)
    if p.is_dir():
        return _files_under(p)
    if p.exists() or not any(c in item for c in "*?["):
        return [item]                 # a missing file is reported by the decoder ("No such file")
    matches = sorted(glob.glob(item, recursive=True))
    if not matches:
        return [item]                 # reported as missing, so a typo in a pattern is visible
    return [f for m in matches for f in (_files_under(Path(m)) if Path(m).is_dir() else [m])]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(f) for f in folder.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


__all__ = ["Model", "Predictor", "Prediction", "load", "expand_images", "write_predictions", "BadImageError", "BACKENDS",
           "ONNX_MODEL", "ONNX_INT8_MODEL", "weights_digest", "file_digest"]
