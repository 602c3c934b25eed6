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
