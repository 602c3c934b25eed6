import pytest
import torch

from multitag.errors import UserError
from multitag.models import build_model, count_parameters
from multitag.models.registry import describe_models


@pytest.mark.parametrize("name,size,params", [("simple_cnn", 32, 1_147_914), ("advanced_cnn", 64, 11_181_642)])
def test_parameter_counts_and_contract(name, size, params):
    m = build_model(name, 10)
    assert count_parameters(m) == params
    x = torch.randn(2, 3, size, size)
    feats = m.forward_features(x)
    assert feats.ndim == 4
    assert m.forward_head(feats).shape == (2, 10)
    assert m(x).shape == (2, 10)


def test_timm_and_unknown_names():
    m = build_model("timm/resnet10t", 3)
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(UserError, match='did you mean "simple_cnn"'):
        build_model("simple_cn", 3)
    with pytest.raises(UserError, match="unknown timm architecture"):
        build_model("timm/resnet_nonexistent_xyz", 3)


def test_describe_models_lists_counts():
    rows = {r["name"]: r for r in describe_models()}
    assert rows["simple_cnn"]["parameters"] == 1_147_914


@pytest.mark.parametrize("name,size", [("simple_cnn", 32), ("advanced_cnn", 64), ("timm/resnet10t", 64),
                                       ("efficientnet_lite0", 64), ("inception_resnet_v1_small", 80)])
def test_each_family_overfits_a_tiny_batch(name, size):
    """A few optimizer steps on 4 fixed images lower the loss: gradients reach the weights."""
    torch.manual_seed(0)
    model = build_model(name, 3, pretrained=False)
    x, y = torch.randn(4, 3, size, size), torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_every_recipe_builds():
    from multitag.config import list_recipes, load_config
    from multitag.models.registry import get_spec

    for name in list_recipes():
        cfg = load_config(name)
        spec = get_spec(cfg.model.name)
        assert spec.default_size > 0 and cfg.notes, name


def test_efficientnet_lite_relu6_runs_out_of_place():
    """In place, hardtanh_ clones its input for autograd every step; out of place nothing is copied."""
    from torch import nn

    model = build_model("efficientnet_lite0", 3, pretrained=False)
    relu6 = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    assert len(relu6) > 10 and not any(m.inplace for m in relu6)


def test_an_image_size_too_small_for_the_model_names_the_smallest_that_works():
    from multitag.errors import UserError
    from multitag.models.registry import build_model, check_input_size

    model = build_model("simple_cnn", 3).train()
    check_input_size(model, "simple_cnn", 8)
    with pytest.raises(UserError, match=r"simple_cnn cannot take 4×4 images.*data.image_size=8 or more"):
        check_input_size(model, "simple_cnn", 4)
    assert model.training                               # the probe leaves the mode as it was


def test_model_args_pretrained_is_honoured_and_never_downloads(capsys):
    """timm's spelling, model.args.pretrained, was passed twice to the builder (a TypeError)."""
    from multitag.models.registry import configured_args

    build_model("efficientnet_lite0", 3, **configured_args("efficientnet_lite0", {"pretrained": False}, True))
    assert "ImageNet weights" not in capsys.readouterr().out          # false: no packaged weights
    build_model("efficientnet_lite0", 3, **configured_args("efficientnet_lite0", {"pretrained": True}, True))
    assert "ImageNet weights" in capsys.readouterr().out
    assert configured_args("efficientnet_lite0", {"pretrained": True}, False)["pretrained"] is False   # a file wins
    assert configured_args("timm/resnet18", {"pretrained": False, "drop_rate": 0.1}, True) == {
        "pretrained": False, "drop_rate": 0.1}
    with pytest.raises(UserError, match="no packaged pretrained weights.*model.weights=FILE"):
        configured_args("timm/resnet18", {"pretrained": True}, True)
    with pytest.raises(UserError, match="true or false"):
        configured_args("timm/resnet18", {"pretrained": "yes"}, True)


def test_train_takes_model_args_pretrained(digits_csv, tmp_path):
    from multitag.api import train

    run = train("demo", data=str(digits_csv), out=tmp_path / "r", log=lambda *a: None,
                overrides=["model.name=timm/resnet18", "model.args.pretrained=false", "data.image_size=32",
                           "train.epochs=1", "train.precision=fp32", "train.channels_last=false", "train.report=false"])
    from multitag.predict import load

    assert load(run).predict([torch.zeros(3, 32, 32, dtype=torch.uint8)])[0].scores     # reloads too


def test_a_timm_name_without_timm_prefix_suggests_it():
    with pytest.raises(UserError, match='unknown model "resnet18" \\(did you mean "timm/resnet18"\\?\\)'):
        build_model("resnet18", 3)
    with pytest.raises(UserError, match='unknown model "resnet18.a1_in1k" \\(did you mean "timm/resnet18.a1_in1k"\\?\\)'):
        build_model("resnet18.a1_in1k", 3)
    with pytest.raises(UserError, match='did you mean "simple_cnn"'):      # not a timm name: the closest of ours
        build_model("simple_cn", 3)


def test_a_timm_pretrained_tag_takes_its_normalisation_and_size():
    from multitag.config import load_config
    from multitag.engine import resolved_config
    from multitag.models.registry import get_spec

    spec = get_spec("timm/inception_v3.tf_in1k")          # TF weights: inputs in [-1, 1], 299 px
    assert (spec.mean, spec.std, spec.default_size) == ((0.5,) * 3, (0.5,) * 3, 299)
    cfg = resolved_config(load_config("demo", ["model.name=timm/inception_v3.tf_in1k", "data.mean=[]", "data.std=[]"]))
    assert cfg.data.mean == (0.5,) * 3 and cfg.data.std == (0.5,) * 3
    assert get_spec("timm/inception_v3").mean == get_spec("simple_cnn").mean        # no tag: ImageNet's, as before
    model = build_model("timm/resnet10t.c3_in1k", 3).eval()   # random init: nothing downloaded
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and get_spec("timm/resnet10t.c3_in1k").default_size == 176
    with pytest.raises(UserError, match='no pretrained tag "a1_in1kk" for resnet18 \\(did you mean "timm/resnet18.a1_in1k"\\?\\)'):
        get_spec("timm/resnet18.a1_in1kk")
