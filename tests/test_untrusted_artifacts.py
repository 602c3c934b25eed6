"""A run directory is untrusted input: tampered or damaged files give one-line UserErrors naming the
file, nothing is ever unpickled, and ONNX files are read only from inside the run directory.

``ARTIFACT_CASES`` and ``artifact_outcome`` are also run by benchmarks/reliability_report.py.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from multitag.checkpoint import MODEL_META, MODEL_WEIGHTS
from multitag.errors import UserError
from multitag.predict import ONNX_MODEL, file_digest, load, weights_digest

RUN_FILES = (MODEL_META, MODEL_WEIGHTS)


def fresh_run(source: Path, dest: Path) -> Path:
    """A copy of the files ``load`` reads from a run directory."""
    dest.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy(source / name, dest / name)
    return dest


def edit_meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A tampering step: load model.json, let ``change`` edit it in place, write it back."""
    def tamper(run: Path) -> None:
        meta = json.loads((run / MODEL_META).read_text())
        change(meta)
        (run / MODEL_META).write_text(json.dumps(meta))
    return tamper


def write(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """A tampering step: replace file ``name`` with bytes, or with a function of its current bytes."""
    def tamper(run: Path) -> None:
        path = run / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
    return tamper


def _set(key: str, value) -> Callable[[Path], None]:
    return edit_meta(lambda m: m.__setitem__(key, value))


def _weights_in_memory(run: Path) -> dict[str, torch.Tensor]:
    """The run's weights copied out of the file (load_file's tensors map it: rewriting it in place
    under them would be a SIGBUS)."""
    return {k: v.clone() for k, v in load_file(str(run / MODEL_WEIGHTS)).items()}


def _pickled_weights(run: Path) -> None:
    """model.safetensors replaced by a torch pickle of the same weights (what an attacker would plant)."""
    torch.save(_weights_in_memory(run), run / MODEL_WEIGHTS)


def _renamed_keys(run: Path) -> None:
    from safetensors.torch import save_file

    save_file({f"other.{k}": v for k, v in _weights_in_memory(run).items()}, str(run / MODEL_WEIGHTS))


def _as_directory(name: str) -> Callable[[Path], None]:
    def tamper(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
    return tamper


def _onnx_record(run: Path) -> None:
    """model.json's export record, matching the weights and the file: so only the ONNX file's content can
    be wrong."""
    record = {"weights_sha256": weights_digest(run), "sha256": file_digest(run / ONNX_MODEL)}
    edit_meta(lambda m: m.__setitem__("export", {"onnx": record}))(run)


def _onnx_with_external_data(location: str) -> Callable[[Path], None]:
    """A model.onnx whose one initializer is stored in an external file at ``location``."""
    def tamper(run: Path) -> None:
        from onnx import TensorProto, helper, numpy_helper

        (run.parent / "outside.bin").write_bytes(np.ones(3, np.float32).tobytes())
        w = numpy_helper.from_array(np.ones(3, np.float32), "w")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "12")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        (run / ONNX_MODEL).write_bytes(model.SerializeToString())
        _onnx_record(run)
    return tamper


def _onnx_link_outside(run: Path) -> None:
    (run.parent / "elsewhere.onnx").write_bytes(b"\x08\x07")
    (run / ONNX_MODEL).symlink_to(run.parent / "elsewhere.onnx")
    _onnx_record(run)


def _onnx_truncated(run: Path) -> None:
    _onnx_with_external_data("w.bin")(run)
    (run / ONNX_MODEL).write_bytes((run / ONNX_MODEL).read_bytes()[:25])
    _onnx_record(run)           # truncated by whoever wrote it: the check is ONNX Runtime's, not the sha256


def _onnx_changed(run: Path) -> None:
    """model.onnx edited after its export was recorded (one byte added)."""
    _onnx_with_external_data("w.bin")(run)
    (run / ONNX_MODEL).write_bytes((run / ONNX_MODEL).read_bytes() + b"\x00")


class Case(NamedTuple):
    name: str
    tamper: Callable[[Path], None]
    fragment: str              # expected in the UserError
    file: str = MODEL_META     # the file the message must name
    backend: str = "torch"


ARTIFACT_CASES: list[Case] = [
    # model.json
    Case("model.json missing", lambda run: (run / MODEL_META).unlink(), "has no model.json", file=""),
    Case("model.json truncated", write(MODEL_META, lambda b: b[: len(b) // 2]), "is not valid JSON"),
    Case("model.json binary garbage", write(MODEL_META, b"\x80\x04\x95 pickle? \xff"), "is not UTF-8 JSON text"),
    Case("model.json empty", write(MODEL_META, b""), "is not valid JSON"),
    Case("model.json a directory", _as_directory(MODEL_META), "cannot read"),
    Case("model.json a JSON list", write(MODEL_META, b"[1, 2]"), "holds a JSON list, not an object"),
    Case("class_names missing", edit_meta(lambda m: m.pop("class_names")), '"class_names" is null'),
    Case("class_names a string", _set("class_names", "d0 d1"), '"class_names" is "d0 d1", not a list'),
    Case("class_names repeated", _set("class_names", ["d0"] * 10), "distinct class names"),
    Case("multi_label a string", _set("multi_label", "yes"), '"multi_label" is "yes", not true or false'),
    Case("input_size a string", _set("input_size", "32"), '"input_size" is "32"'),
    Case("input_size 10^9 (a resize bomb)", _set("input_size", 10**9), "from 1 to 4096"),
    Case("input_size 0", _set("input_size", 0), "from 1 to 4096"),
    Case("mean of 2 numbers", _set("mean", [0.5, 0.5]), '"mean" is [0.5, 0.5], not a list of 3 numbers'),
    Case("std of zeros", _set("std", [0, 0, 0]), "3 positive numbers"),
    Case("model not an object", _set("model", "simple_cnn"), '"model" is "simple_cnn"'),
    Case("unknown model name", edit_meta(lambda m: m["model"].__setitem__("name", "simple_cnnn")),
         'cannot be built: unknown model "simple_cnnn" (did you mean "simple_cnn"?)'),
    Case("model args the builder refuses", edit_meta(lambda m: m["model"]["args"].__setitem__("depth", 99)),
         "cannot be built: model \"simple_cnn\" does not accept these model.args"),
    Case("model args naming a checkpoint file", edit_meta(lambda m: m["model"]["args"].__setitem__(
        "checkpoint_path", "/tmp/evil.pth")), "model args name a file to load (checkpoint_path)"),
    Case("nested args naming a file", edit_meta(lambda m: m["model"]["args"].__setitem__(
        "backbone_args", {"pretrained_cfg_overlay": {"file": "/tmp/evil.pth"}})), "(pretrained_cfg_overlay)"),
    Case("thresholds of the wrong length", _set("thresholds", [0.5, 0.5]), "one number per class"),
    Case("one class more than the weights", edit_meta(lambda m: (m["class_names"].append("d10"),
                                                                 m.__setitem__("thresholds", None))),
         "the network model.json describes (11 classes) needs (11,", file=MODEL_WEIGHTS),
    Case("export record not an object", _set("export", ["onnx"]), '"export" is ["onnx"]'),
    # model.safetensors
    Case("weights missing", lambda run: (run / MODEL_WEIGHTS).unlink(), "does not exist", file=MODEL_WEIGHTS),
    Case("weights truncated", write(MODEL_WEIGHTS, lambda b: b[: len(b) // 2]), "is not a readable safetensors file",
         file=MODEL_WEIGHTS),
    Case("weights empty", write(MODEL_WEIGHTS, b""), "is not a readable safetensors file", file=MODEL_WEIGHTS),
    Case("weights header claiming 2^60 bytes", write(MODEL_WEIGHTS, lambda b: (1 << 60).to_bytes(8, "little") + b[8:]),
         "is not a readable safetensors file", file=MODEL_WEIGHTS),
    Case("weights header not JSON", write(MODEL_WEIGHTS, lambda b: b[:8] + b"!" + b[9:]),
         "is not a readable safetensors file", file=MODEL_WEIGHTS),
    Case("weights replaced by a torch pickle", _pickled_weights, "is not a readable safetensors file", file=MODEL_WEIGHTS),
    Case("weights of another architecture", _renamed_keys, "does not match the model", file=MODEL_WEIGHTS),
    Case("weights a directory", _as_directory(MODEL_WEIGHTS), "is not a readable safetensors file", file=MODEL_WEIGHTS),
    # ONNX: only files inside the run directory
    Case("model.onnx linked to a file outside the run", _onnx_link_outside, "outside", file=ONNX_MODEL, backend="onnx"),
    Case("model.onnx reading ../ external data", _onnx_with_external_data("../outside.bin"), "reads",
         file=ONNX_MODEL, backend="onnx"),
    Case("model.onnx reading absolute external data", lambda run: _onnx_with_external_data(
        str(run.parent / "outside.bin"))(run), "outside", file=ONNX_MODEL, backend="onnx"),
    Case("model.onnx truncated", _onnx_truncated, "cannot be loaded by ONNX Runtime", file=ONNX_MODEL, backend="onnx"),
    Case("model.onnx without model.safetensors", lambda run: (_onnx_truncated(run), (run / MODEL_WEIGHTS).unlink()),
         "is missing, so", file=MODEL_WEIGHTS, backend="onnx"),
    Case("model.onnx changed after its export", _onnx_changed, "does not match the run's model.json (sha256",
         file=ONNX_MODEL, backend="auto"),      # refused on auto too, not replaced by the torch backend
]


def artifact_outcome(source: Path, dest: Path, case: Case, image) -> str:
    """Copy the run, tamper it, load it and predict one image: the UserError message (checked to be one
    line naming the file), or "loaded" when no error came."""
    run = fresh_run(source, dest)
    case.tamper(run)
    try:
        load(run, device="cpu", backend=case.backend).predict([image])
    except UserError as e:
        message = str(e)
        assert "\n" not in message, message
        assert str(run / case.file) in message, message
        return message
    return "loaded"


@pytest.fixture(scope="module")
def image(digits_csv) -> Path:
    return digits_csv.parent / "images" / "test_00000.png"


@contextlib.contextmanager
def unpickling_refused():
    """pickle.load/loads/Unpickler and torch.load raise while inside: any attempt to unpickle fails
    loudly instead of running."""
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class Refusing:
        def __init__(self, *args, **kwargs):
            refuse()

    targets = ((pickle, "load", refuse), (pickle, "loads", refuse), (pickle, "Unpickler", Refusing),
               (torch, "load", refuse), (torch.serialization, "load", refuse))
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in targets:
            stack.enter_context(mock.patch.object(owner, name, replacement))
        yield


@pytest.fixture
def no_unpickling():
    with unpickling_refused():
        yield


@pytest.mark.parametrize("case", ARTIFACT_CASES, ids=[c.name for c in ARTIFACT_CASES])
def test_tampered_run_gives_a_one_line_error_naming_the_file(tiny_run, tmp_path, image, no_unpickling, case):
    message = artifact_outcome(tiny_run, tmp_path / "run", case, image)
    assert case.fragment in message


def test_loading_and_predicting_never_unpickles(tiny_run, tmp_path, image, no_unpickling):
    run = fresh_run(tiny_run, tmp_path / "run")
    for backend in ("auto", "torch"):
        model = load(run, device="cpu", backend=backend)
        [pred] = model.predict([image])
        assert set(pred.scores) == set(model.class_names)
        good, missing = model.predict_each([image, tmp_path / "missing.png"])
        assert good.error is None and missing.error


def test_a_stale_or_outside_onnx_falls_back_to_torch_with_auto(tiny_run, tmp_path, image):
    run = fresh_run(tiny_run, tmp_path / "run")
    _onnx_link_outside(run)
    with pytest.warns(UserWarning, match="outside"):
        model = load(run, device="cpu", backend="auto")
    assert model.backend == "torch" and model.predict([image])
