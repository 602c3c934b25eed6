"""`multitag export RUN_DIR`: ONNX export with a parity check on real images, and an optional int8 model.

    model.onnx        input "images" float32 (B, 3, S, S), normalised as in model.json;
                      output "logits" (B, C); the batch axis is dynamic. Opset 17.
    model.int8.onnx   (--int8) the same network quantised to int8, with its accuracy cost
                      measured on the run's validation split.

Each file describes itself in its metadata_props (``onnx_metadata``: class names, thresholds,
sigmoid or softmax, input size, mean/std and the preprocessing, multitag version, run name), so it
can be used without multitag (README, "Using model.onnx without multitag").

What was checked goes into model.json under "export", together with the sha256 of the weights
it was exported from and of the file itself, so that the predictor refuses an ONNX file that no
longer matches model.safetensors (a run resumed or retrained after export) or that was changed
after it was written. ``calibrate`` rewrites the metadata (and the sha256) when the thresholds move.

Decisions
- Exporter: torch's TorchScript-based exporter (``dynamo=False``). It handles every model here,
  needs no extra package (the dynamo exporter needs onnxscript), and torch still ships it
  (it warns that it is deprecated; that warning is silenced here and nowhere else).
- Parity: PyTorch and ONNX Runtime logits on up to 64 validation images of the run (decoded by
  the same cache as training), as one batch and once more at batch 1 (so the dynamic axis is
  exercised too); above 1e-3 max abs difference the export fails and no file is left behind.
  When the run's data is gone (moved, deleted, another machine) and no --data is given, the fp32
  check runs on 64 seeded random images instead and says so; parity is a property of the graph,
  not of the data. --int8 needs real images (calibration and its measured cost), so it is refused
  then, naming the missing path and --data.
- int8 is *static* QDQ quantisation by default (per-channel int8 weights, uint8 activations,
  ranges calibrated on 64 training images). ORT's dynamic quantisation, which the issue named,
  does quantise the convolutions (as ConvInteger) but recomputes activation ranges per call and
  was far slower than fp32 here (ResNet-18 @128, batch 32, 2 threads, AVX-512-VNNI CPU:
  fp32 65 img/s, dynamic int8 weights 10 img/s, dynamic uint8 weights 77 img/s, static QDQ
  198 img/s). ``int8_method="dynamic"`` (uint8 weights, the faster of the two) stays available
  and is measured the same way. The accuracy cost is measured on the exporting machine; CPUs
  without VNNI use other int8 kernels, so re-measure there (benchmarks/bench_inference.py).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from multitag import __version__
from multitag.checkpoint import MODEL_META, write_json
from multitag.fileio import atomic_write
from multitag.errors import UserError, did_you_mean
from multitag.models.registry import get_spec
from multitag.predict import (ONNX_INT8_MODEL, ONNX_MODEL, Model, OnnxBackend, file_digest, load,
                              weights_digest)

OPSET = 17
PARITY_TOLERANCE = 1e-3        # max abs logit difference, PyTorch vs ONNX Runtime (fp32)
PARITY_IMAGES = 64
CALIBRATION_IMAGES = 64
INT8_METHODS = ("static", "dynamic")
_QUANTISED_CONVS = ("QLinearConv", "ConvInteger")   # what a quantised Conv becomes in ORT's graph
# ORT's QDQ quantiser asks for a BatchNormalization's scale per channel on axis 1, the channel axis of
# the activation, but the scale is 1-D (C,): it logged "Axis 1 is out-of-range for weight ..." through
# the root logger (configuring it as a side effect) and fell back to one scale for the whole tensor. A BN
# stays unfolded where it follows a pool (airbench's conv → pool → BN). Axis 0 is the scale's channels.
PER_CHANNEL_AXES = {"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}}


def export_onnx(run_dir: str | Path, int8: bool = False, log=print, data: str | None = None,
                int8_method: str = "static") -> dict:
    """Write RUN_DIR/model.onnx (and model.int8.onnx when ``int8``); returns what was checked.

    ``data`` is the dataset whose images are used for the checks (default: the run's own).
    Raises UserError when ONNX Runtime disagrees with PyTorch by more than PARITY_TOLERANCE.
    """
    if int8_method not in INT8_METHODS:
        raise UserError(f'unknown int8 method "{int8_method}"{did_you_mean(int8_method, INT8_METHODS)}.')
    from multitag.evaluation import prepare_for

    model = load(run_dir, device="cpu", backend="torch")
    name = model.meta["model"]["name"]
    if not get_spec(name).exportable:       # said before any image is read
        raise UserError(f"the {name} model cannot be exported to ONNX (its beam search is a loop of "
                        "data-dependent length); use it with the torch backend.")
    missing = None if data else missing_run_data(model)
    if missing and int8:
        raise UserError(f"the run's data {missing} is not there (moved or deleted?), and --int8 calibrates on its "
                        "training images and measures its cost on the val images; pass --data PATH where the "
                        "data is now, or export without --int8.")
    prepared = None if missing else prepare_for(model, data, log)
    if int8:
        int8_check_rows(prepared)       # refused now, not after model.onnx was written without its record
    digest = weights_digest(model.run_dir)
    onnx_path = model.run_dir / ONNX_MODEL
    if missing:
        log(f"the run's data {missing} is not there (moved or deleted?): checking ONNX Runtime against PyTorch "
            f"on {PARITY_IMAGES} synthetic images (seeded random pixels) instead; pass --data PATH to check on "
            "real images")
        checked, source = synthetic_images(model, PARITY_IMAGES), "synthetic"
    else:       # "data": the images of --data, which need not be the run's
        checked, source = check_images(model, prepared, "val", PARITY_IMAGES), "data" if data else "run"
    record = {**write_onnx(model, onnx_path, checked), "check_images": source, "weights_sha256": digest}
    of = {"synthetic": "synthetic images", "run": "images of the run", "data": f"images of {data}"}[source]
    log(f"wrote {onnx_path}: max |logit difference| vs PyTorch {record['max_abs_diff']:.2e} on {record['images']} {of}")
    # An earlier int8 export of these same weights stays valid; records of other weights are dropped.
    export = {k: v for k, v in model.meta.get("export", {}).items() if v.get("weights_sha256") == digest}
    export["onnx"] = record
    write_json(model.run_dir / MODEL_META, {**model.meta, "export": export})   # model.onnx is usable even if int8 fails
    if int8:
        int8_record = write_int8(model, onnx_path, model.run_dir / ONNX_INT8_MODEL, prepared, int8_method, log)
        export["int8"] = {**int8_record, "weights_sha256": digest}
        write_json(model.run_dir / MODEL_META, {**model.meta, "export": export})
    return {"onnx": str(onnx_path), **{k: v for k, v in record.items() if k != "file"},
            **({"int8": export["int8"]} if int8 else {})}


# --- fp32 export and parity -----------------------------------------------------------------------

def check_images(model: Model, prepared, split: str, limit: int, seed: int | None = None) -> torch.Tensor:
    """Up to ``limit`` normalised images (N, 3, S, S) of a split of the run's data (any split when it
    has none); the first ones, or a seeded random sample when ``seed`` is given."""
    rows = prepared.rows(split)
    if len(rows) == 0:
        rows = prepared.rows("all")
    if len(rows) == 0:
        raise UserError("the run's data has no readable images to check the export on; pass --data PATH.")
    if seed is not None and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    return _normalised(model, prepared, rows[:limit])


def _normalised(model: Model, prepared, rows) -> torch.Tensor:
    from multitag.data.transforms import normalize

    return normalize(prepared.cache.get_batch(rows), model.mean, model.std)


def missing_run_data(model: Model) -> str | None:
    """The run's own data path (or image root) when it no longer exists, else None."""
    from multitag.evaluation import data_config_for

    cfg = data_config_for(model, None)
    for path in (cfg.path, cfg.image_root):
        if path and not Path(path).expanduser().exists():
            return os.path.abspath(Path(path).expanduser())
    return None


def synthetic_images(model: Model, n: int) -> torch.Tensor:
    """``n`` normalised (n, 3, S, S) images of seeded uniform random pixels: a parity check needs no real data."""
    from multitag.data.transforms import normalize

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, model.input_size, model.input_size), generator=g, dtype=torch.uint8)
    return normalize(pixels, model.mean, model.std)


def write_onnx(model: Model, path: Path, images: torch.Tensor) -> dict:
    """Export ``model.network`` to ``path`` with its metadata and check it on ``images``; the file appears
    only if it passes."""
    result = {}

    def export_and_check(tmp: str) -> None:
        _torch_export(model.network, tmp, model.input_size)
        stamp_metadata(tmp, onnx_metadata(model))
        result.update(parity(model, tmp, images))

    atomic_write(path, export_and_check)
    return {"file": path.name, "sha256": file_digest(path), "opset": OPSET,
            "exporter": f"torch {torch.__version__} (TorchScript)", "onnxruntime": _ort_version(), **result}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _torch_export(network: torch.nn.Module, path: str, size: int) -> None:
    example = torch.zeros(2, 3, size, size)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo (see the module docstring).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(network.cpu().eval(), (example,), path, input_names=["images"],
                              output_names=["logits"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:     # an architecture the exporter cannot express: say so in one line
        raise UserError(f"this model could not be exported to ONNX ({type(e).__name__}: {e}); "
                        "use the torch backend.") from e


def parity(model: Model, onnx_path: str | Path, images: torch.Tensor) -> dict:
    """Max abs logit difference, PyTorch vs ONNX Runtime, on ``images`` as one batch and at batch 1.
    Raises UserError above PARITY_TOLERANCE."""
    reference = model.logits(images)
    session = OnnxBackend(Path(onnx_path), torch.device("cpu"))
    diff = max(_max_diff(session(images), reference), _max_diff(session(images[:1]), reference[:1]))
    if not diff <= PARITY_TOLERANCE:           # also catches NaN
        raise UserError(f"ONNX Runtime disagrees with PyTorch by {diff:.3g} (max abs logit, tolerance "
                        f"{PARITY_TOLERANCE:g}) on {len(images)} images; model.onnx was not written. "
                        "Use the torch backend and report the model name.")
    return {"max_abs_diff": diff, "images": len(images), "batch_sizes": [len(images), 1]}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --- self-description: what a user needs to run an exported file without multitag -----------------

def onnx_metadata(model: Model) -> dict[str, str]:
    """The metadata_props of an exported file, each value a string (JSON for lists and booleans).
    The graph takes normalised input: normalisation is not in it, so mean/std and the resize are stated."""
    s, activation = model.input_size, "sigmoid" if model.multi_label else "softmax"
    if model.multi_label:
        decision = "sigmoid(logits) per class; a class is a label where its score >= its threshold"
    else:
        decision = "softmax(logits); the label is the top class (thresholds unused)"
    return {
        "class_names": json.dumps(model.class_names),
        "thresholds": json.dumps([float(t) for t in model.thresholds]),     # float32: what predict compares with
        "multi_label": json.dumps(model.multi_label),
        "activation": activation,
        "decision": decision,
        "input_size": str(s),
        "input": f'"images": float32 (batch, 3, {s}, {s}), NCHW, RGB, normalised (normalisation is not in the graph)',
        "output": f'"logits": float32 (batch, {len(model.class_names)}), before the {activation}',
        "preprocessing": (f"decode, apply the EXIF orientation, convert to RGB (alpha dropped), resize to {s}x{s} "
                          "ignoring the aspect ratio (no crop, no padding) with antialiased bilinear interpolation, "
                          "divide by 255, then (x - mean) / std per channel"),
        "mean": json.dumps(model.mean),
        "std": json.dumps(model.std),
        "multitag_version": __version__,
        "run_name": model.run_dir.resolve().name,
    }


def stamp_metadata(path: str | Path, metadata: dict[str, str], out: str | Path | None = None) -> None:
    """Replace the metadata_props of the ONNX file at ``path``, in place or into ``out``."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(out or path))


def refresh_metadata(model: Model, log=print) -> list[str]:
    """Rewrite the metadata of the run's exported files after model.json's thresholds changed (calibrate, or
    a resumed run's finish that kept the exported weights), with their new sha256 in model.json. Only files
    that still belong to the run: a stale or changed one is left for the predictor to refuse. Returns the
    file names rewritten."""
    rewritten = []
    for key, path in model.current_exports().items():
        atomic_write(path, lambda tmp: stamp_metadata(path, onnx_metadata(model), out=tmp))
        model.meta["export"][key]["sha256"] = file_digest(path)
        rewritten.append(path.name)
        log(f"rewrote the thresholds in {path}'s metadata")
    if rewritten:
        write_json(model.run_dir / MODEL_META, model.meta)
    return rewritten


# --- int8 -----------------------------------------------------------------------------------------

def write_int8(model: Model, onnx_path: Path, int8_path: Path, prepared, method: str, log=print) -> dict:
    """Quantise model.onnx to ``int8_path`` and measure what it costs on the validation split."""
    calibration = check_images(model, prepared, "train", CALIBRATION_IMAGES, seed=0) if method == "static" else None

    def quantize_and_stamp(tmp: str) -> None:
        quantize(onnx_path, tmp, calibration)
        stamp_metadata(tmp, onnx_metadata(model))

    atomic_write(int8_path, quantize_and_stamp)
    record = {"file": int8_path.name, "sha256": file_digest(int8_path), "method": method,
              **({"calibration_images": len(calibration)} if calibration is not None else {}),
              **quantised_convs(onnx_path, int8_path), **int8_accuracy(model, onnx_path, int8_path, prepared)}
    log(f"wrote {int8_path}: {record['convs_quantised']} of {record['convs']} convolutions run in int8; "
        f"val {record['metric']} fp32 {record['val_fp32']:.4f} → int8 {record['val_int8']:.4f}")
    return record


def quantize(onnx_path: Path, out_path: str | Path, calibration: torch.Tensor | None = None) -> None:
    """Static QDQ quantisation calibrated on ``calibration`` (normalised images), or ORT's dynamic
    quantisation when it is None. Both start from ORT's recommended pre-processing (shape
    inference + graph optimisation)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(str(onnx_path), pre)
        if calibration is None:
            # uint8 weights: ConvInteger with int8 weights was ~8x slower here (module docstring)
            quantize_dynamic(pre, str(out_path), weight_type=QuantType.QUInt8)
        else:
            quantize_static(pre, str(out_path), _CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=shape_arithmetic_nodes(pre), extra_options=PER_CHANNEL_AXES)


def shape_arithmetic_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the nodes that compute from tensor shapes only (Shape and what follows from it and
    constants), e.g. the "same" padding of timm's TF-ported convs (EfficientNet-Lite), which is
    computed from the input size in float Cast/Div/Ceil/Sub/Mul ops. Quantised, those pad amounts
    were rounded to uint8 steps: val mAP of an EfficientNet-Lite0 fell 0.56 -> 0.32; kept in float,
    0.55. They are bookkeeping, not activations: int8 gains nothing there."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    constant = {t.name for t in graph.initializer}
    from_shapes: set[str] = set()
    excluded = []
    for node in graph.node:                                   # ONNX graphs are topologically sorted
        inputs = [i for i in node.input if i and i not in constant]
        if node.op_type == "Constant":
            constant.update(node.output)
        elif node.op_type == "Shape" or (inputs and all(i in from_shapes for i in inputs)):
            from_shapes.update(node.output)
            excluded.append(node.name)
    return excluded


class _CalibrationReader:
    """Feeds calibration images to ORT's static quantiser in batches of 16."""

    def __init__(self, images: torch.Tensor, batch: int = 16):
        self._batches = iter([{"images": images[i:i + batch].numpy()} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantised_convs(onnx_path: Path, int8_path: Path) -> dict:
    """How many of the network's convolutions ORT actually runs in int8 (after its graph fusions):
    a quantiser may leave ops in float, and that is worth saying, not assuming."""
    import onnx
    import onnxruntime as ort

    convs = sum(n.op_type == "Conv" for n in onnx.load(str(onnx_path)).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
        ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {"convs": int(convs), "convs_quantised": int(sum(ops[k] for k in _QUANTISED_CONVS))}


def int8_check_rows(prepared) -> np.ndarray:
    """The val rows the int8 model's accuracy is measured on; asked before anything is written."""
    rows = prepared.rows("val")
    if len(rows) == 0:
        raise UserError("the run's data has no validation images to measure the int8 model on; "
                        "pass --data with a val split, or export without --int8.")
    return rows


def int8_accuracy(model: Model, onnx_path: Path, int8_path: Path, prepared) -> dict:
    """Validation metric (mAP or accuracy) of the fp32 and int8 ONNX models on the same images."""
    from multitag.inference import scores_from_logits
    from multitag.metrics import accuracy, mean_average_precision

    rows = int8_check_rows(prepared)
    t = prepared.table
    outputs = {}
    for name, path in (("fp32", onnx_path), ("int8", int8_path)):
        session = OnnxBackend(path, torch.device("cpu"))
        outputs[name] = torch.cat([session(_normalised(model, prepared, rows[i:i + 256]))
                                   for i in range(0, len(rows), 256)])
    scores = {k: scores_from_logits(v, model.multi_label).numpy() for k, v in outputs.items()}
    if model.multi_label:
        metric, value = "mAP", {k: mean_average_precision(s, t.targets[rows], t.ignore[rows]) for k, s in scores.items()}
    else:
        metric, value = "accuracy", {k: accuracy(s, t.targets[rows].argmax(1)) for k, s in scores.items()}
    return {"metric": metric, "val_images": len(rows), "val_fp32": float(value["fp32"]),
            "val_int8": float(value["int8"]), "val_change": float(value["int8"] - value["fp32"]),
            "max_abs_diff": _max_diff(outputs["int8"], outputs["fp32"])}
