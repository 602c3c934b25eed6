"""How close a training step runs to what this machine can compute: FLOPs per image and the conv peak.

A speed-up over another loop is bounded by the hardware: if every FLOP of a training step ran at the
fastest rate this machine computes a dense conv in some precision, the step would take
``training_flops / peak`` seconds per image, and no loop in that precision can beat it. ``multitag bench``
prints each row's achieved GFLOP/s beside that bound, and the bound's ratio to the naive loop: the most
any loop in that precision could gain here (RESULTS run Q: on an AMD EPYC without AMX, bf16's conv peak is
2.0x fp32's, and at 224 px the ResNet-18 layout's naive fp32 loop already runs at 56-60 % of the fp32 peak,
so no bf16 loop could be 4x it there).

What is counted: convolutions and matrix products, forward and backward (torch.utils.flop_counter) —
the arithmetic that the hardware's peak is about. BatchNorm, activations, pooling and the optimizer are
memory-bound extra time on top, which is why the bound is an upper one. Fused kernels without a FLOP
formula (nn.LSTM / nn.GRU, as in the CNN-RNN decoder) are not counted: for such models the achieved
GFLOP/s is a lower bound and the img/s bound too high. The peak is timed at the step's own batch size:
a larger batch can run faster (on a GPU especially), so the bound holds for that batch, not for every one.
"""
from __future__ import annotations

import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from multitag.losses import training_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}       # a Runtime's precision -> the tensors' dtype


def _flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with this module's formula for a conv's backward (conv_backward_flops)."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def best_seconds(fn, reps: int, device: torch.device | None = None, warmup: int = 2) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones (other work only ever
    slows a call down); on a CUDA ``device`` each call is waited for."""
    def call():
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        call()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def training_flops(model: torch.nn.Module, loss_fn, example: torch.Tensor, targets: torch.Tensor) -> float:
    """FLOPs of one training image (forward + backward of ``model`` on its loss), counted on a copy over
    two images of ``example`` ((N, 3, S, S)) in fp32 on the CPU, where every op is countable."""
    model = copy.deepcopy(model).cpu().float().train()
    loss_fn = copy.deepcopy(loss_fn).cpu() if isinstance(loss_fn, torch.nn.Module) else loss_fn
    x, y = example[:2].float().cpu(), targets[:2].cpu()
    with _flop_counter() as counter:
        training_loss(model, loss_fn, x, y, torch.zeros_like(y, dtype=torch.bool)).backward()
    return counter.get_total_flops() / len(x)


def forward_flops(model: torch.nn.Module, image_size: int) -> float:
    """FLOPs of one image's forward pass in eval mode at ``image_size`` (2 per multiply-add, as timm's and
    the papers' GFLOPs are twice their GMACs), counted on the CPU in fp32; RNN layers uncounted (module text)."""
    model = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad(), _flop_counter() as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def has_uncounted_layers(model: torch.nn.Module) -> bool:
    """Whether ``model`` has RNN layers, whose FLOPs torch.utils.flop_counter does not count."""
    return any(isinstance(m, torch.nn.RNNBase) for m in model.modules())


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A conv's backward: its forward's multiplications once for the input gradient and once for the
    weight gradient, as far as ``output_mask`` asks for them. torch 2.14's own formula computes the weight
    gradient as a conv of transposed shapes, which loses the group division (fixed upstream in
    pytorch/pytorch#183405): it counted EfficientNet-Lite0's training FLOPs 14x too high
    (32.2 GFLOP per image at 224 px; 2.28 with this formula, its forward being 0.77)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def conv_shapes(image_size: int) -> list[tuple[int, int]]:
    """(channels, map size) of the 3x3 convs timed for the peak: a ResNet's four stages at this input size.
    (On the AMD EPYC of RESULTS run Q a sweep of 64-512 channels on 7-56 px maps at batch 32 and 64 peaked
    at 501 GFLOP/s fp32 and 998 bf16; these four shapes at 224 px reached 465 and 927.)"""
    return [(c, max(4, image_size // stride)) for c, stride in ((64, 4), (128, 8), (256, 16), (512, 32))]


def conv_peak(device: torch.device, precision: str, batch: int, image_size: int, reps: int = 5) -> dict:
    """The fastest GFLOP/s a dense 3x3 conv forward (stride 1, channels_last, batch ``batch``) reaches
    here in ``precision`` over conv_shapes(image_size): {"gflop_s", "shape"}; best of ``reps`` calls
    each (other work only ever slows a call down)."""
    dtype = DTYPES[precision]
    best = {"gflop_s": 0.0, "shape": ""}
    for channels, size in conv_shapes(image_size):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(
            device, dtype, memory_format=torch.channels_last)
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        flops = 2 * batch * channels * channels * 9 * size * size
        with torch.no_grad():
            rate = flops / best_seconds(lambda: conv(x), reps, device) / 1e9
        if rate > best["gflop_s"]:
            best = {"gflop_s": rate, "shape": f"{channels}->{channels} 3x3 on {size}x{size}, batch {batch}"}
    return best
