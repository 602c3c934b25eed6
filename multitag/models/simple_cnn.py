"""simple_cnn: the 3-block CIFAR-10 CNN of the reference system (≈1.15 M parameters at 32 px).

conv3×3-BN-ReLU-maxpool ×3 (32, 64, 128 channels) → flatten 128×4×4 → FC 512 → ReLU → dropout 0.5 → FC.
An adaptive 4×4 pool before the flatten is the identity at 32 px and keeps the head's size fixed
at any other input size, so the same model runs on the 64 px demo and on CIFAR-10.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3, widths=(32, 64, 128), hidden: int = 512,
                 drop_rate: float = 0.5):
        super().__init__()
        chans = (in_chans, *widths)
        self.features = nn.Sequential(*[conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.num_features = widths[-1]
        self.fc1 = nn.Linear(widths[-1] * 16, hidden)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)                      # (B, 128, H/8, W/8)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)           # (B, 128*16)
        x = self.drop(torch.relu(self.fc1(x)))       # (B, 512)
        return x if pre_logits else self.fc(x)       # (B, num_classes) logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
