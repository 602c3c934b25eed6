"""Flip test-time augmentation for any model (model.args.tta_flip): eval-mode logits averaged with the
mirror image's, training unchanged, state dicts unchanged, and the flip reaching predict and ONNX."""
import numpy as np
import pytest
import torch

from model_checks import assert_training_sees_one_view
from multitag.errors import UserError
from multitag.models import build_model


@pytest.mark.parametrize("name", ["simple_cnn", "advanced_cnn", "timm/mobilenetv3_small_050"])
def test_eval_logits_are_the_mean_of_the_image_and_its_mirror(name):
    torch.manual_seed(0)
    plain = build_model(name, 4, pretrained=False).eval()
    flipped = build_model(name, 4, pretrained=False, tta_flip=True).eval()
    assert sorted(flipped.state_dict()) == sorted(plain.state_dict())         # same keys: weights load either way
    flipped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = (plain(x) + plain(x.flip(3))) / 2
        got = flipped(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(flipped(x.flip(3)), got)                            # mirror images score alike
    assert_training_sees_one_view(plain, flipped, x)


def test_tta_flip_is_checked():
    with pytest.raises(UserError, match="tta_flip must be true or false"):
        build_model("simple_cnn", 3, tta_flip="yes")
    with pytest.raises(UserError, match="beam search"):
        build_model("cnn_rnn", 3, pretrained=False, tta_flip=True, backbone="simple_cnn")
    # airbench keeps its own tta_flip (and tta_translate): not wrapped twice
    assert type(build_model("airbench", 10, tta_flip=True)).__name__ == "AirbenchNet"


def test_a_run_trained_with_tta_flip_predicts_and_exports_with_it(digits_csv, tmp_path):
    from PIL import Image

    from multitag.api import train
    from multitag.export import export_onnx
    from multitag.predict import load

    run = train("demo", data=str(digits_csv), out=tmp_path / "run", log=lambda *a: None,
                overrides=["train.epochs=1", "train.batch_size=32", "train.precision=fp32", "train.report=false",
                           "model.args.tta_flip=true"])
    model = load(run)
    image = Image.open(sorted((digits_csv.parent / "images").glob("*.png"))[0]).convert("RGB")
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a, b = model.predict([image, mirror])
    assert a.scores == pytest.approx(b.scores, abs=1e-6)     # the mirror is the same pair of views
    export_onnx(run, log=lambda *a: None)                    # its parity check compares with the flip in the graph
    onnx_model = load(run, backend="onnx")
    c, d = onnx_model.predict([image, mirror])
    assert c.scores == pytest.approx(d.scores, abs=1e-5)
    assert np.allclose(list(c.scores.values()), list(a.scores.values()), atol=1e-4)


@pytest.mark.parametrize("sets, message", [
    (["model.args.tta_flip=both"], "tta_flip must be true or false"),
    (["model.name=cnn_rnn", "model.args.backbone=simple_cnn", "model.args.tta_flip=true"], "beam search"),
])
def test_tta_flip_is_checked_before_any_work(sets, message):
    """check_config says it, before the image cache is built, not the model builder after it."""
    from multitag.config import load_config
    from multitag.config_checks import check_config

    with pytest.raises(UserError, match=message):
        check_config(load_config("demo", sets))
    check_config(load_config("demo", ["model.name=airbench", "model.args.tta_flip=true"]))   # its own flip
