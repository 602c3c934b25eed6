"""The stem ReLU moved behind the max-pool (multitag/models/resnet_stem.py) changes nothing a user sees."""
import pytest
import timm
import torch
from torch import nn

from multitag.models import build_model
from multitag.models.resnet_stem import PoolFirstResNet


def _reference_and_ours(arch: str, **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=5, **kw)
    ours = build_model(f"timm/{arch}", 5, **kw)
    ours.load_state_dict(ref.state_dict())            # same keys: the swap adds and drops nothing
    return ref, ours


@pytest.mark.parametrize("arch", ["resnet18", "resnet18d"])
def test_outputs_and_gradients_equal_timms_order(arch):
    ref, ours = _reference_and_ours(arch)
    assert type(ours) is PoolFirstResNet and type(ref) is not PoolFirstResNet
    with torch.no_grad():                              # a stem output with negatives in most windows
        ours.bn1.bias.fill_(-0.5), ref.bn1.bias.fill_(-0.5)
        ours.bn1.weight[:8].neg_(), ref.bn1.weight[:8].neg_()
    x = torch.randn(4, 3, 64, 64)
    for m in (ref, ours):
        m.train()
        m(x).square().sum().backward()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(ours.bn1.running_mean, ref.bn1.running_mean, rtol=0, atol=0)
    # timm's own feature API still returns the stem's post-ReLU map
    ref.eval(), ours.eval()
    f_ours, f_ref = ours.forward_intermediates(x, intermediates_only=True), ref.forward_intermediates(
        x, intermediates_only=True)
    assert (f_ours[0] >= 0).all()
    for a, b in zip(f_ours, f_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_plain_relu_and_maxpool_stems_are_swapped():
    assert type(build_model("advanced_cnn", 3)) is PoolFirstResNet
    # SiLU is not monotonic: pooling first would change the output
    assert type(build_model("timm/resnet18", 3, act_layer="silu")) is not PoolFirstResNet
    assert type(build_model("timm/efficientnet_b0", 3)).__name__ == "EfficientNet"


def test_relu_before_pool_gives_timms_class_back():
    from multitag.models.resnet_stem import relu_before_pool

    model = build_model("advanced_cnn", 3)
    assert type(relu_before_pool(model)) is timm.models.resnet.ResNet
    assert type(relu_before_pool(nn.Linear(2, 2))) is nn.Linear
