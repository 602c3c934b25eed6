"""The ceiling's arithmetic (multitag/ceiling.py): FLOPs per training image as the layer formulas give
them, and a conv peak measured on one of the named shapes. No speed is asserted."""
from __future__ import annotations

import torch
from torch import nn

from multitag.ceiling import conv_peak, conv_shapes, training_flops


def test_training_flops_follow_the_layer_formulas():
    # conv 3->4 3x3 on 8x8, then a linear 256->5: forward 2·C_out·C_in·9·64 + 2·256·5 per image; backward
    # the conv's weight gradient only (the input needs none) and the linear's input and weight gradients.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 5))
    conv, linear = 2 * 4 * 3 * 9 * 64, 2 * 256 * 5
    loss = lambda logits, y, ignore: nn.functional.binary_cross_entropy_with_logits(logits, y)  # noqa: E731
    flops = training_flops(model, loss, torch.randn(6, 3, 8, 8), torch.rand(6, 5))
    assert flops == 2 * conv + 3 * linear
    assert all(p.grad is None for p in model.parameters())      # counted on a copy


def test_grouped_convs_backward_costs_what_their_forward_costs():
    # conv 3->8, then a depthwise 8->8 3x3 (groups 8) on 8x8: torch 2.14's own formula counted the depthwise
    # weight gradient as an ungrouped conv (2.6x the whole count here; EfficientNet-Lite0's 14x).
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                          nn.Flatten(), nn.Linear(512, 2, bias=False))
    first, depthwise, linear = 2 * 8 * 3 * 64, 2 * 8 * 1 * 9 * 64, 2 * 512 * 2
    loss = lambda logits, y, ignore: logits.square().mean()  # noqa: E731
    flops = training_flops(model, loss, torch.randn(2, 3, 8, 8), torch.zeros(2, 2))
    assert flops == 2 * first + 3 * depthwise + 3 * linear


def test_conv_peak_is_measured_on_one_of_its_shapes():
    peak = conv_peak(torch.device("cpu"), "fp32", batch=2, image_size=32, reps=1)
    assert peak["gflop_s"] > 0
    assert any(peak["shape"].startswith(f"{c}->{c} 3x3 on {s}x{s}") for c, s in conv_shapes(32))
    assert conv_shapes(16) == [(64, 4), (128, 4), (256, 4), (512, 4)]        # maps never below 4x4
