"""ONNX export: parity with PyTorch on real images, dynamic batch, int8 with its measured cost,
and the predictor's choice between the ONNX and PyTorch backends."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from multitag import api
from multitag.errors import UserError
from multitag.export import export_onnx
from multitag.predict import ONNX_INT8_MODEL, ONNX_MODEL, load

FAST = ["train.epochs=1", "train.batch_size=32", "train.precision=fp32"]
RUN_FILES = ("model.json", "model.safetensors", "split.csv")


def copy_run(src, dst):
    """The files a predictor needs, without any exported model."""
    dst.mkdir()
    for name in RUN_FILES:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def trained(digits_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    return api.train("demo", data=digits_csv, out=out, overrides=FAST, log=lambda *a: None)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run = copy_run(trained, tmp_path_factory.mktemp("exported") / "run")
    result = export_onnx(run, int8=True, log=lambda *a: None)
    return run, result


@pytest.fixture
def test_images(digits_csv):
    return [str(digits_csv.parent / "images" / f"test_{i:05d}.png") for i in range(6)]


def test_parity_recorded_in_model_json(exported):
    run, result = exported
    assert (run / ONNX_MODEL).exists()
    record = json.loads((run / "model.json").read_text())["export"]["onnx"]
    assert record["max_abs_diff"] == result["max_abs_diff"] < 1e-3
    assert record["opset"] >= 17 and record["images"] == 40      # the 40 val images of the run


def test_dynamic_batch(exported, test_images):
    run, _ = exported
    session = ort.InferenceSession(str(run / ONNX_MODEL), providers=["CPUExecutionProvider"])
    model = load(run, backend="torch")
    x = model.preprocess(test_images[:3])
    for batch in (x[:1], x):
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        assert logits.shape == (len(batch), 10)
        np.testing.assert_allclose(logits, model.logits(batch).numpy(), atol=1e-4)


def test_int8_written_with_val_metric(exported):
    run, result = exported
    assert (run / ONNX_INT8_MODEL).exists()
    record = json.loads((run / "model.json").read_text())["export"]["int8"]
    assert record == result["int8"]
    assert record["metric"] == "mAP" and record["val_images"] == 40
    assert 0 <= record["val_fp32"] <= 1 and 0 <= record["val_int8"] <= 1
    assert record["convs_quantised"] == record["convs"] == 3     # static QDQ: every conv runs in int8
    assert load(run, backend="onnx-int8").predict_scores([np.zeros((32, 32, 3), np.uint8)]).shape == (1, 10)


def test_predictor_picks_onnx_when_exported_and_agrees_with_torch(exported, trained, test_images):
    run, _ = exported
    onnx_model, torch_model = load(run), load(run, backend="torch")
    assert onnx_model.backend == "onnx" and torch_model.backend == "torch"
    assert load(trained).backend == "torch"                       # no model.onnx there
    for a, b in zip(onnx_model.predict(test_images), torch_model.predict(test_images)):
        assert a.labels == b.labels
        np.testing.assert_allclose(list(a.scores.values()), list(b.scores.values()), atol=1e-4)
    # the torch network stays available (Grad-CAM) even on the ONNX backend
    assert isinstance(onnx_model.network, torch.nn.Module)


def test_forcing_onnx_without_export_is_a_user_error(trained):
    with pytest.raises(UserError, match="multitag export"):
        load(trained, backend="onnx")
    with pytest.raises(UserError, match="did you mean"):
        load(trained, backend="onxx")


def test_stale_onnx_is_never_used(exported, tmp_path):
    run = copy_run(exported[0], tmp_path / "run")
    shutil.copy(exported[0] / ONNX_MODEL, run / ONNX_MODEL)
    meta = json.loads((run / "model.json").read_text())
    meta["export"]["onnx"]["weights_sha256"] = "0" * 64           # as if the run was retrained after export
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="export .* again"):
        load(run, backend="onnx")
    with pytest.warns(UserWarning, match="export .* again"):       # eval/report keep working, loudly
        assert load(run).backend == "torch"


def test_parity_failure_is_loud_and_leaves_no_file(trained, tmp_path, monkeypatch):
    import multitag.export

    run = copy_run(trained, tmp_path / "run")
    monkeypatch.setattr(multitag.export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export_onnx(run, log=lambda *a: None)
    assert not (run / ONNX_MODEL).exists()
    assert "export" not in json.loads((run / "model.json").read_text())


def test_int8_without_val_images_is_refused_before_anything_is_written(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    split = run / "split.csv"
    split.write_text(split.read_text().replace(",val\n", ",train\n"))     # as a run trained without val
    with pytest.raises(UserError, match="no validation images .* or export without --int8"):
        export_onnx(run, int8=True, log=lambda *a: None)
    assert not (run / ONNX_MODEL).exists() and "export" not in json.loads((run / "model.json").read_text())


def test_a_failed_int8_step_keeps_the_fp32_export_usable(trained, tmp_path, monkeypatch):
    import multitag.export

    run = copy_run(trained, tmp_path / "run")

    def broken(*a, **k):
        raise UserError("int8 failed")

    monkeypatch.setattr(multitag.export, "write_int8", broken)
    with pytest.raises(UserError, match="int8 failed"):
        export_onnx(run, int8=True, log=lambda *a: None)
    assert load(run, backend="onnx").backend == "onnx"          # model.onnx has its record


def test_static_int8_keeps_shape_arithmetic_in_float(tmp_path):
    """EfficientNet-Lite's TF "same" padding is computed from the input shape in float ops; quantised,
    the pad amounts were rounded (val mAP 0.56 -> 0.32). Only the convs' data path may be quantised."""
    import onnx

    from multitag.export import _torch_export, quantize, shape_arithmetic_nodes
    from multitag.models import build_model

    torch.manual_seed(0)
    network = build_model("efficientnet_lite0", 3, pretrained=False).eval()
    path = tmp_path / "m.onnx"
    _torch_export(network, str(path), 64)
    nodes = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    excluded = set(shape_arithmetic_nodes(path))
    assert {n for n, op in nodes.items() if op in ("Shape", "Ceil")} <= excluded
    assert not any(nodes[n] in ("Conv", "Pad", "Gemm") for n in excluded)

    images = torch.randn(32, 3, 64, 64)
    quantize(path, tmp_path / "q.onnx", calibration=images[:16])
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    quantised = {producers[n.input[0]].op_type for n in graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] in producers}
    assert not quantised & {"Ceil", "Div", "Cast", "Shape", "Gather", "Concat"}, quantised
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    x = images[16:].numpy()
    a, b = fp32.run(None, {"images": x})[0], int8.run(None, {"images": x})[0]
    assert a.shape == b.shape and np.isfinite(b).all()
