"""inception_resnet: Inception-ResNet-v1 from scratch, block by block as in the paper.

Szegedy, Ioffe, Vanhoucke, Alemi (2016), "Inception-v4, Inception-ResNet and the Impact of
Residual Connections": stem (Fig. 14) → 5 × Inception-ResNet-A (Fig. 10) → Reduction-A (Fig. 7,
k=192 l=192 m=256 n=384) → 10 × Inception-ResNet-B (Fig. 11) → Reduction-B (Fig. 12) →
5 × Inception-ResNet-C (Fig. 13) → global average pool → dropout (paper: keep 0.8) → linear.

Spatial sizes (measured, see tests/test_inception_resnet.py). The paper's 299 px input gives the
35 / 17 / 8 grids; the reference system's 320 px input, through the same valid-padding convs, gives:

    input 320 → stem 37×37 → Reduction-A 18×18 → Reduction-B 8×8          (299 → 35 → 17 → 8)

The smallest input that survives every valid-padding reduction is 75 px (→ stem 7, → 3, → 1).

Parameter counts with 10 outputs (measured):
    InceptionResNetV1(10)                                         20,981,258  (1792 features)
    InceptionResNetV1(10, blocks=(1, 2, 1), width=0.25)  [_small]    554,898  ( 448 features)

Decisions beyond the paper:
- Residual scales default to 0.17 (A), 0.10 (B), 0.20 (C), the values of the common TF-slim /
  FaceNet implementations; the paper only says scaling by 0.1–0.3 stabilises training.
- Convs before a BatchNorm carry no bias (BN's shift makes it redundant); the 1×1 linear
  projection before each residual add has a bias and no BN and no activation.
- FaceNet's extra un-activated sixth C block and its 128/512-d embedding layer are not used: the
  paper's Figure 15 has 5 C blocks followed directly by pooling, dropout and the classifier.
- ``width`` multiplies every channel count, rounded to a multiple of 8 and at least 8 (as timm's
  ``make_divisible``), so ``width=0.25, blocks=(1, 2, 1)`` is a CPU-sized member of the family.
"""
from __future__ import annotations

import torch
from torch import nn

MIN_INPUT_SIZE = 75


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (≥ divisor), never more than 10 % below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Module):
    """The paper's conv unit: conv (no bias) → BatchNorm → ReLU. ``same`` pads stride-1 convs to keep
    the grid; ``same=False`` is the paper's "V" (valid, no padding). Kernels may be (h, w) tuples."""

    def __init__(self, cin: int, cout: int, kernel_size, stride: int = 1, same: bool = True):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        padding = (k[0] // 2, k[1] // 2) if same else 0
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def out_channels(branch: nn.Module) -> int:
    """Channels a conv branch emits: those of its last conv."""
    return [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def chain(*convs: ConvBNReLU) -> nn.Sequential:
    """One branch of an Inception block: conv units applied in order."""
    return nn.Sequential(*convs)


class ResidualBlock(nn.Module):
    """Inception-ResNet block: parallel branches → concat → 1×1 *linear* projection back to
    ``channels`` (bias, no BN, no activation) → × ``scale`` → + input → ReLU.

    Subclasses only say which branches they have; with ``scale=0`` the block is ReLU(x)."""

    def __init__(self, channels: int, branches: list[nn.Module], scale: float):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.project = nn.Conv2d(sum(out_channels(b) for b in branches), channels, 1, bias=True)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.branches], dim=1)   # (B, Σ branch widths, H, W)
        return torch.relu(x + self.scale * self.project(y))   # (B, channels, H, W)


class InceptionResNetA(ResidualBlock):
    """Figure 10 (35×35 grid): 1×1 | 1×1→3×3 | 1×1→3×3→3×3, all ``b`` (paper 32) wide."""

    def __init__(self, c: int, b: int, scale: float):
        super().__init__(c, [
            chain(ConvBNReLU(c, b, 1)),
            chain(ConvBNReLU(c, b, 1), ConvBNReLU(b, b, 3)),
            chain(ConvBNReLU(c, b, 1), ConvBNReLU(b, b, 3), ConvBNReLU(b, b, 3)),
        ], scale)


class InceptionResNetB(ResidualBlock):
    """Figure 11 (17×17 grid): 1×1 | 1×1→1×7→7×1, all ``b`` (paper 128) wide."""

    def __init__(self, c: int, b: int, scale: float):
        super().__init__(c, [
            chain(ConvBNReLU(c, b, 1)),
            chain(ConvBNReLU(c, b, 1), ConvBNReLU(b, b, (1, 7)), ConvBNReLU(b, b, (7, 1))),
        ], scale)


class InceptionResNetC(ResidualBlock):
    """Figure 13 (8×8 grid): 1×1 | 1×1→1×3→3×1, all ``b`` (paper 192) wide."""

    def __init__(self, c: int, b: int, scale: float):
        super().__init__(c, [
            chain(ConvBNReLU(c, b, 1)),
            chain(ConvBNReLU(c, b, 1), ConvBNReLU(b, b, (1, 3)), ConvBNReLU(b, b, (3, 1))),
        ], scale)


class ReductionBlock(nn.Module):
    """Grid reduction: 3×3 max-pool stride 2 (valid) next to conv branches that each end in a
    stride-2 valid conv; all concatenated. ``out_channels`` = input channels + the branches' widths."""

    def __init__(self, cin: int, branches: list[nn.Module]):
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=2)
        self.branches = nn.ModuleList(branches)
        self.out_channels = cin + sum(out_channels(b) for b in branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pool(x)] + [b(x) for b in self.branches], dim=1)


class ReductionA(ReductionBlock):
    """Figure 7: pool | 3×3/2 n | 1×1 k → 3×3 l → 3×3/2 m (v1: k=192, l=192, m=256, n=384)."""

    def __init__(self, c: int, k: int, l: int, m: int, n: int):
        super().__init__(c, [
            chain(ConvBNReLU(c, n, 3, stride=2, same=False)),
            chain(ConvBNReLU(c, k, 1), ConvBNReLU(k, l, 3), ConvBNReLU(l, m, 3, stride=2, same=False)),
        ])


class ReductionB(ReductionBlock):
    """Figure 12: pool | 1×1 r → 3×3/2 s | 1×1 r → 3×3/2 r | 1×1 r → 3×3 r → 3×3/2 r
    (v1: r=256, s=384)."""

    def __init__(self, c: int, r: int, s: int):
        super().__init__(c, [
            chain(ConvBNReLU(c, r, 1), ConvBNReLU(r, s, 3, stride=2, same=False)),
            chain(ConvBNReLU(c, r, 1), ConvBNReLU(r, r, 3, stride=2, same=False)),
            chain(ConvBNReLU(c, r, 1), ConvBNReLU(r, r, 3), ConvBNReLU(r, r, 3, stride=2, same=False)),
        ])


def stem(in_chans: int, ch) -> nn.Sequential:
    """Figure 14; shapes for a 320 px input (paper's 299 px in brackets)."""
    return nn.Sequential(
        ConvBNReLU(in_chans, ch(32), 3, stride=2, same=False),  # (B,  32, 159, 159)  [149]
        ConvBNReLU(ch(32), ch(32), 3, same=False),              # (B,  32, 157, 157)  [147]
        ConvBNReLU(ch(32), ch(64), 3),                          # (B,  64, 157, 157)  [147]
        nn.MaxPool2d(3, stride=2),                              # (B,  64,  78,  78)  [73]
        ConvBNReLU(ch(64), ch(80), 1),                          # (B,  80,  78,  78)  [73]
        ConvBNReLU(ch(80), ch(192), 3, same=False),             # (B, 192,  76,  76)  [71]
        ConvBNReLU(ch(192), ch(256), 3, stride=2, same=False),  # (B, 256,  37,  37)  [35]
    )


class InceptionResNetV1(nn.Module):
    """Inception-ResNet-v1 classifier returning logits (no sigmoid).

    Args:
        num_classes: outputs of the linear head.
        in_chans: input channels.
        blocks: number of A, B and C blocks (paper: 5, 10, 5).
        width: multiplier for every channel count (1.0 = paper).
        drop_rate: dropout before the linear head (paper: keep probability 0.8 → 0.2).
        scales: residual scales of the A, B and C blocks.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, blocks=(5, 10, 5), width: float = 1.0,
                 drop_rate: float = 0.2, scales=(0.17, 0.10, 0.20)):
        super().__init__()
        n_a, n_b, n_c = blocks
        s_a, s_b, s_c = scales

        def ch(c: int) -> int:
            return make_divisible(c * width)

        self.stem = stem(in_chans, ch)                                          # (B,  256, 37, 37)
        c = ch(256)
        self.blocks_a = nn.Sequential(*[InceptionResNetA(c, ch(32), s_a) for _ in range(n_a)])
        self.reduction_a = ReductionA(c, ch(192), ch(192), ch(256), ch(384))    # (B,  896, 18, 18)
        c = self.reduction_a.out_channels
        self.blocks_b = nn.Sequential(*[InceptionResNetB(c, ch(128), s_b) for _ in range(n_b)])
        self.reduction_b = ReductionB(c, ch(256), ch(384))                      # (B, 1792,  8,  8)
        c = self.reduction_b.out_channels
        self.blocks_c = nn.Sequential(*[InceptionResNetC(c, ch(192), s_c) for _ in range(n_c)])
        self.num_features = c
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(c, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init (normal, fan_out, ReLU gain) for convs; zero biases; BN weight 1, bias 0.
        The linear head keeps PyTorch's default weight init with a zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and min(x.shape[-2:]) < MIN_INPUT_SIZE:   # a clear error, not torch's
            raise ValueError(f"InceptionResNetV1 needs inputs of at least {MIN_INPUT_SIZE} px, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.stem(x)          # (B,  256, 37, 37)  at 320 px
        x = self.blocks_a(x)      # (B,  256, 37, 37)
        x = self.reduction_a(x)   # (B,  896, 18, 18)
        x = self.blocks_b(x)      # (B,  896, 18, 18)
        x = self.reduction_b(x)   # (B, 1792,  8,  8)
        return self.blocks_c(x)   # (B, 1792,  8,  8)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(torch.flatten(self.global_pool(x), 1))   # (B, 1792)
        return x if pre_logits else self.fc(x)                 # (B, num_classes) logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
