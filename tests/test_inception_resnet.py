"""Inception-ResNet-v1: parameter counts, the paper's grid sizes at 299 / 320 px, the model
contract, He init, residual scaling and a tiny overfit run."""
import math

import pytest
import torch
from torch import nn

from multitag.models import build_model, count_parameters
from multitag.models.inception_resnet import (
    MIN_INPUT_SIZE,
    InceptionResNetA,
    InceptionResNetB,
    InceptionResNetC,
    InceptionResNetV1,
)

FULL_PARAMS = 20_981_258    # InceptionResNetV1(10): blocks (5, 10, 5), width 1.0
SMALL_PARAMS = 554_898      # inception_resnet_v1_small(10): blocks (1, 2, 1), width 0.25


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core test machine, two OpenMP threads that busy-wait for
    each other while other processes hold the cores made a 20 ms training step take 0.4–8 s."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return build_model("inception_resnet_v1", 10).eval()


def test_parameter_counts(full):
    assert count_parameters(full) == FULL_PARAMS
    assert full.num_features == 1792
    small = build_model("inception_resnet_v1_small", 10)
    assert count_parameters(small) == SMALL_PARAMS
    assert small.num_features == 448


@torch.no_grad()
def test_grid_sizes_at_320_and_299(full):
    x = torch.randn(1, 3, 320, 320)
    stem = full.stem(x)
    red_a = full.reduction_a(full.blocks_a(stem))
    red_b = full.reduction_b(full.blocks_b(red_a))
    feats = full.blocks_c(red_b)
    assert stem.shape == (1, 256, 37, 37)
    assert red_a.shape == (1, 896, 18, 18)
    assert red_b.shape == (1, 1792, 8, 8)
    assert feats.shape == (1, 1792, 8, 8)
    assert full.forward_head(feats).shape == (1, 10)
    assert full.stem(torch.randn(1, 3, 299, 299)).shape == (1, 256, 35, 35)   # the paper's 35×35


@torch.no_grad()
def test_forward_is_features_then_head_and_small_input_is_refused():
    m = build_model("inception_resnet_v1_small", 7).eval()
    x = torch.randn(2, 3, 96, 96)
    feats = m.forward_features(x)
    assert feats.shape == (2, 448, 1, 1)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 448)
    logits = m(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, m.forward_head(feats))
    with pytest.raises(ValueError, match="at least 75 px"):
        m(torch.randn(1, 3, 64, 64))


def test_he_init(full):
    convs = [m for m in full.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if conv.weight.numel() >= 4096:
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.06)
        if conv.bias is not None:
            assert not conv.bias.any()
    biggest = full.reduction_b.branches[0][1].conv                 # 3×3, 256 → 384, 884,736 weights
    assert biggest.weight.std().item() == pytest.approx(math.sqrt(2 / (384 * 9)), rel=0.01)
    bns = [m for m in full.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in bns)
    assert not full.fc.bias.any()


@pytest.mark.parametrize("block", [InceptionResNetA, InceptionResNetB, InceptionResNetC])
@torch.no_grad()
def test_residual_scale(block):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9)
    b = block(16, 8, scale=0.0).eval()
    torch.testing.assert_close(b(x), torch.relu(x))               # scale 0: the block is ReLU(x)
    b.scale = 0.3
    branch = b.project(torch.cat([br(x) for br in b.branches], 1))
    torch.testing.assert_close(b(x), torch.relu(x + 0.3 * branch))
    assert b.project.out_channels == 16 and b.project.bias is not None


def test_width_keeps_channels_divisible():
    m = InceptionResNetV1(3, blocks=(1, 1, 1), width=0.05)
    assert all(c.out_channels >= 8 and c.out_channels % 8 == 0
               for c in m.modules() if isinstance(c, nn.Conv2d) and c is not m.fc)


def test_small_variant_overfits_a_tiny_batch():
    # 80 px, not 64: the valid-padding reductions need at least 75 px (see the module docstring).
    torch.manual_seed(0)
    m = build_model("inception_resnet_v1_small", 5, drop_rate=0.0).train()
    x = torch.randn(4, 3, 80, 80)
    y = (torch.rand(4, 5) > 0.5).float()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = nn.functional.binary_cross_entropy_with_logits(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses          # 0.65 → 0.11 here


@pytest.mark.parametrize("name", ["inception_resnet_v1", "inception_resnet_v1_small"])
def test_too_small_size_is_said_by_the_config_check_before_any_image_is_read(name, tmp_path):
    """The registry's min_size is the size the built model's probe finds, and check_config (which
    runs before the cache is built) refuses smaller ones with the probe's own sentence."""
    from multitag.config import Config
    from multitag.config_checks import check_config
    from multitag.errors import UserError
    from multitag.models.registry import check_input_size, get_spec

    smallest = get_spec(name).min_size
    assert smallest == MIN_INPUT_SIZE
    model = build_model(name, 3)
    check_input_size(model, name, smallest)
    with pytest.raises(UserError, match=f"set data.image_size={smallest} or more") as probed:
        check_input_size(model, name, smallest - 11)
    cfg = Config()
    cfg.model.name, cfg.data.image_size, cfg.data.path = name, smallest - 11, str(tmp_path / "nowhere.csv")
    with pytest.raises(UserError) as checked:
        check_config(cfg)
    assert str(checked.value) == str(probed.value)
