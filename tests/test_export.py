"""ONNX export: parity with PyTorch on real images, dynamic batch, int8 with its measured cost,
and the predictor's choice between the ONNX and PyTorch backends."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

import multitag
from multitag import api
from multitag.errors import UserError
from multitag.export import export_onnx, stamp_metadata
from multitag.predict import ONNX_INT8_MODEL, ONNX_MODEL, file_digest, load

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
    assert record["check_images"] == "run" and record["sha256"] == file_digest(run / ONNX_MODEL)


@pytest.mark.parametrize("name", [ONNX_MODEL, ONNX_INT8_MODEL])
def test_each_exported_file_describes_itself_in_its_metadata(exported, name):
    run, _ = exported
    meta = json.loads((run / "model.json").read_text())
    session = ort.InferenceSession(str(run / name), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == meta["class_names"]
    np.testing.assert_allclose(json.loads(props["thresholds"]), meta["thresholds"], rtol=1e-6)
    assert json.loads(props["multi_label"]) is True and props["activation"] == "sigmoid"
    assert int(props["input_size"]) == meta["input_size"] == 32
    assert json.loads(props["mean"]) == meta["mean"] and json.loads(props["std"]) == meta["std"]
    assert "normalisation is not in the graph" in props["input"] and "no crop" in props["preprocessing"]
    assert props["multitag_version"] == multitag.__version__ and props["run_name"] == run.name


def test_a_changed_onnx_file_is_refused_in_one_sentence(exported, tmp_path):
    run = copy_run(exported[0], tmp_path / "run")
    for name in (ONNX_MODEL, ONNX_INT8_MODEL):
        stamp_metadata(exported[0] / name, {"edited": "yes"}, out=run / name)     # still a valid model
    with pytest.raises(UserError, match=r"model.onnx does not match the run's model.json \(sha256 .*\); "
                                        r"export again with multitag export .*run\.$"):
        load(run)                                    # auto refuses too: no quiet fallback to torch
    with pytest.raises(UserError, match=r"model.int8.onnx does not match .* --int8\.$"):
        load(run, backend="onnx-int8")
    assert load(run, backend="torch").backend == "torch"


def test_calibrate_rewrites_the_thresholds_in_the_exported_metadata(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "thresholds": None}))     # as before a calibration
    export_onnx(run, log=lambda *a: None)
    api.calibrate(run, log=lambda *a: None)
    thresholds = json.loads((run / "model.json").read_text())["thresholds"]
    props = ort.InferenceSession(str(run / ONNX_MODEL), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert thresholds != [0.5] * 10
    np.testing.assert_allclose(json.loads(props.custom_metadata_map["thresholds"]), thresholds, rtol=1e-6)
    assert load(run).backend == "onnx"               # its new sha256 is recorded


def test_a_resumed_run_that_keeps_its_weights_restamps_the_thresholds(digits_csv, tmp_path):
    """Exported mid-run (no thresholds yet: 0.5 in the metadata), resumed, no better epoch: the weights and the
    export stay, finish() calibrates, and the file's metadata follows as after `multitag calibrate`."""
    run = api.train("demo", data=digits_csv, out=tmp_path / "run", overrides=FAST + ["train.report=false"],
                    log=lambda *a: None)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "thresholds": None}))     # as model.json is mid-run
    export_onnx(run, log=lambda *a: None)
    api.train(resume=run, log=lambda *a: None)
    thresholds = json.loads((run / "model.json").read_text())["thresholds"]
    props = ort.InferenceSession(str(run / ONNX_MODEL), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert thresholds != [0.5] * 10
    np.testing.assert_allclose(json.loads(props.custom_metadata_map["thresholds"]), thresholds, rtol=1e-6)
    assert load(run).backend == "onnx"


def moved_data(run):
    """The run as on a machine where its training data is not (model.json names a path that is gone)."""
    meta = json.loads((run / "model.json").read_text())
    meta["recipe"]["data"]["path"] = str(run.parent / "moved" / "labels.csv")
    (run / "model.json").write_text(json.dumps(meta))
    return run


def test_export_after_the_data_moved_checks_parity_on_synthetic_images(trained, tmp_path):
    run = moved_data(copy_run(trained, tmp_path / "run"))
    said = []
    result = export_onnx(run, log=said.append)
    assert result["check_images"] == "synthetic" and result["images"] == 64 and result["max_abs_diff"] < 1e-3
    assert any("moved" in line and "synthetic" in line and "--data PATH" in line for line in said)
    assert load(run).backend == "onnx"


def test_export_on_other_data_says_so(trained, digits_csv, tmp_path):
    run, said = copy_run(trained, tmp_path / "run"), []
    assert export_onnx(run, data=str(digits_csv), log=said.append)["check_images"] == "data"
    assert any(f"images of {digits_csv}" in line for line in said)


def test_int8_export_after_the_data_moved_names_the_path_and_the_flag(trained, tmp_path):
    run = moved_data(copy_run(trained, tmp_path / "run"))
    with pytest.raises(UserError, match=r"run's data .*moved.labels.csv is not there .*pass --data PATH .*"
                                        r"or export without --int8"):
        export_onnx(run, int8=True, log=lambda *a: None)
    assert not (run / ONNX_MODEL).exists()


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


def test_static_int8_quantises_an_unfolded_batchnorm_per_channel_without_warnings(tmp_path, caplog):
    """airbench's BatchNorms follow a pool, so they stay unfolded; ORT asked for their 1-D scale on axis 1
    and logged "Axis 1 is out-of-range for weight ..." through the root logger."""
    import onnx

    from multitag.export import _torch_export, quantize
    from multitag.models import build_model

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    _torch_export(build_model("airbench", 3).eval(), str(path), 32)
    with caplog.at_level("WARNING"):
        quantize(path, tmp_path / "q.onnx", calibration=torch.randn(16, 3, 32, 32))
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    bn_scales = {n.input[1] for n in graph.node if n.op_type == "BatchNormalization"}
    axes = [a.i for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in bn_scales
            for a in n.attribute if a.name == "axis"]
    assert bn_scales and axes == [0] * len(bn_scales)


def readme_snippet(start="<!-- onnx-without-multitag:start -->", end="<!-- onnx-without-multitag:end -->") -> str:
    """The README's "Using model.onnx without multitag" code, between its marker comments."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text[text.index(start) + len(start):text.index(end)].strip()
    assert block.startswith("```python\n") and block.endswith("\n```"), block[:40]
    return block.removeprefix("```python\n").removesuffix("```")


def test_the_readme_snippet_predicts_what_multitag_predicts(exported, test_images, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    run, _ = exported
    script = tmp_path / "use_onnx.py"
    script.write_text(readme_snippet())
    images = list(test_images)
    for i, size in enumerate([(70, 45), (23, 51)]):      # other sizes than the model's 32 px: the resize counts
        images.append(str(tmp_path / f"resized_{i}.png"))
        Image.open(test_images[i]).resize(size, Image.NEAREST).save(images[-1])
    expected = load(run).predict(images)
    assert any(p.labels for p in expected)
    for image, prediction in zip(images, expected):
        out = subprocess.run([sys.executable, str(script), str(run / ONNX_MODEL), image], capture_output=True,
                             text=True, check=True, cwd=tmp_path)
        assert out.stdout.split() == prediction.labels, (image, out.stderr)
