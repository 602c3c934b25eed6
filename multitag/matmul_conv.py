"""A conv (bf16 under autocast, or plain fp32) whose gradients on small output maps are GEMMs where that is
faster, decided per conv shape by measuring both on this machine (layer_tweaks' ``matmul_weight_grad``).

oneDNN's backward kernels reduce over batch x output positions; on maps of a few positions they run
far below the GEMMs the same products make, but by how much — and whether at all — differs between CPUs:
- weight gradient, the AMX Intel machine (batch 32, channels_last, 2 threads): 512->512 3x3 on 4²
  8.8 vs 1.7 ms by GEMM, 256->512 3x3/2 8²->4² 5.0 vs 1.0, 512->512 on 7² 11.4 vs 5.3, 320->1280 1x1 on
  7² 1.5 vs 1.0; slower by GEMM on larger maps or small layers (128->128 on 16²: 1.5 vs 3.5, 64->64 on
  8²: 0.31 vs 0.48). On the AMD EPYC family 25 machine the GEMM won on 4² maps (256->512/2: 295 vs 107
  GFLOP/s) but lost on 256->256 on 8² (256 vs 326).
- input gradient: on the AMX machine the GEMM won on 4² maps (512->512 4.24 vs 1.96 ms, 256->512/2 2.56 vs
  1.24) and lost on 7²-8² (256->256 on 8²: 2.95 vs 1.23); on the AMD family 25 machine it lost on 4² too
  (512->512: 253 vs 347 GFLOP/s), where a fixed 4x4 rule cost the step 3 % (RESULTS run T).
- fp32, on the Intel machine without bf16 instructions (family 6 model 106, where the runtime trains in
  fp32; RESULTS run U): oneDNN's weight gradient 71 vs 153 GFLOP/s by GEMM on 256->512/2 8²->4², 104 vs
  172 on 512->512 on 4²; its input gradient 118 vs 171 there, but 176 vs 72 on 64->64 on 32².
So each conv shape (input, weight, stride, padding, dilation, thread count) is timed once both ways on
its first backward, with the real tensors, and the plan is kept in ``<cache root>/conv_grad_plans.json``
per machine (a rerun computes what the last run computed, and pays no measurement).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from multitag.ceiling import best_seconds
from multitag.config import cache_root
from multitag.fileio import read_json_object, update_json_object

# Only output maps of at most this many positions, and weights of at least this many elements, are
# measured: beyond them the GEMMs lost on every shape and machine measured (the examples above).
MAX_POSITIONS = 64
MIN_WEIGHT = 100_000
MEASURE_REPS = 3


def tap_windows(kernel: tuple[int, int], out: tuple[int, int], stride, dilation) -> list[tuple[slice, slice]]:
    """For each of a conv's kh*kw taps (row-major), the (H, W) slices of the zero-padded input that tap
    reads across all Ho x Wo output positions: a strided, dilated view the size of the output map."""
    (kh, kw), (ho, wo), (sh, sw), (dh, dw) = kernel, out, stride, dilation
    return [(slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw))
            for i in range(kh) for j in range(kw)]


def weight_grad_by_matmul(grad: torch.Tensor, x: torch.Tensor, kernel: tuple[int, int], stride, padding,
                          dilation) -> torch.Tensor:
    """dL/dW of a conv2d as one GEMM: the k*k shifted (strided, dilated) views of the zero-padded input
    side by side, against the output gradient, over every batch position.
    grad (B, O, Ho, Wo) and x (B, C, H, W) bf16 or fp32 -> (O, C, kh, kw), same dtype (channels_last strides)."""
    (b, c), (ho, wo), (kh, kw) = x.shape[:2], grad.shape[2:], kernel
    ph, pw = padding
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))                   # (B, H+2ph, W+2pw, C)
    taps = [xp[:, hs, ws] for hs, ws in tap_windows(kernel, (ho, wo), stride, dilation)]    # each (B, Ho, Wo, C)
    cols = torch.stack(taps, 3).reshape(b * ho * wo, kh * kw * c)              # (B*Ho*Wo, kh*kw*C)
    g = grad.permute(0, 2, 3, 1).reshape(b * ho * wo, -1)                       # (B*Ho*Wo, O)
    return (g.t() @ cols).view(-1, kh, kw, c).permute(0, 3, 1, 2)


def input_grad_by_matmul(grad: torch.Tensor, w: torch.Tensor, x_shape: torch.Size, stride, padding,
                         dilation) -> torch.Tensor:
    """dL/dx of a conv2d as one GEMM and a col2im: the output gradient against the weight gives each
    output position's share for each of its k*k input taps (in the grad's dtype, fp32-accumulated over
    the O channels), and the shares are summed into the zero-padded input in fp32, then rounded to that
    dtype — in bf16, k*k roundings of the shares where oneDNN rounds the sum once (measured worst 2e-3 of
    the largest gradient, tests/test_layer_tweaks.py). grad (B, O, Ho, Wo), w (O, C, kh, kw) bf16 or
    fp32 -> (B, C, H, W), same dtype (channels_last strides)."""
    (b, c, h, wd), (ho, wo), (kh, kw), (ph, pw) = x_shape, grad.shape[2:], w.shape[-2:], padding
    g = grad.permute(0, 2, 3, 1).reshape(b * ho * wo, -1)                       # (B*Ho*Wo, O)
    shares = (g @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)).view(b, ho, wo, kh * kw, c)
    gx = grad.new_zeros(b, h + 2 * ph, wd + 2 * pw, c, dtype=torch.float32)    # (B, H+2ph, W+2pw, C)
    for t, (hs, ws) in enumerate(tap_windows((kh, kw), (ho, wo), stride, dilation)):
        gx[:, hs, ws] += shares[:, :, :, t]
    return gx[:, ph: ph + h, pw: pw + wd].to(grad.dtype).permute(0, 3, 1, 2)


def _onednn_grads(grad, x, w, stride, padding, dilation, input_grad: bool, weight_grad: bool):
    """oneDNN's (ATen's) input and/or weight gradient of the conv, as plain autocast's backward computes them."""
    return torch.ops.aten.convolution_backward(grad, x, w, None, stride, padding, dilation, False, [0, 0], 1,
                                               [input_grad, weight_grad, False])[:2]


class Plan(NamedTuple):
    input_grad_by_matmul: bool
    weight_grad_by_matmul: bool


def _plan_key(grad, x, w, stride, padding, dilation) -> str:
    from multitag.runtime import machine_fingerprint      # runtime imports the tweaks, which import this
    return json.dumps([machine_fingerprint(x.device), torch.__version__, torch.get_num_threads(), str(x.dtype),
                       list(x.shape), list(w.shape), list(grad.shape), list(stride), list(padding), list(dilation)])


def _plans_path() -> Path:
    return cache_root() / "conv_grad_plans.json"


@lru_cache(maxsize=None)
def _known(path: Path) -> dict[str, list[bool]]:
    """The plans measured before, per cache file (tests and users may switch $MULTITAG_CACHE)."""
    return read_json_object(path)


def measure_plan(grad, x, w, stride, padding, dilation) -> Plan:
    """Each gradient the faster of oneDNN's and the GEMM's, on these tensors (best of MEASURE_REPS calls
    after one warm-up, the two ways of one gradient timed back to back)."""
    def faster_by_matmul(onednn, matmul) -> bool:
        return (best_seconds(onednn, MEASURE_REPS, x.device, warmup=1)         # oneDNN first, then the GEMM
                > best_seconds(matmul, MEASURE_REPS, x.device, warmup=1))
    with torch.no_grad():
        return Plan(
            faster_by_matmul(lambda: _onednn_grads(grad, x, w, stride, padding, dilation, True, False),
                             lambda: input_grad_by_matmul(grad, w, x.shape, stride, padding, dilation)),
            faster_by_matmul(lambda: _onednn_grads(grad, x, w, stride, padding, dilation, False, True),
                             lambda: weight_grad_by_matmul(grad, x, w.shape[-2:], stride, padding, dilation)))


def plan_for(grad, x, w, stride, padding, dilation) -> Plan:
    """The plan for this conv shape on this machine: measured once, then read from the cache file."""
    path, key = _plans_path(), _plan_key(grad, x, w, stride, padding, dilation)
    known = _known(path)
    if key not in known:
        # (the file as written also holds what other processes measured meanwhile: keep that too)
        known.update(update_json_object(path, key, list(measure_plan(grad, x, w, stride, padding, dilation))))
    return Plan(*known[key])


class MatmulConv(torch.autograd.Function):
    """conv2d in x's dtype (oneDNN's forward, as under plain autocast in bf16 or plain fp32) whose input and
    weight gradients each come from a GEMM (input_grad_by_matmul, weight_grad_by_matmul) or from oneDNN,
    as plan_for measured for this shape and dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        # x (B, C, H, W) bf16 or fp32, already padded when the layer pads in its forward; weight (O, C, k, k) fp32
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.conv = (list(stride), list(padding), list(dilation), bias is not None, weight.dtype)
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        stride, padding, dilation, has_bias, weight_dtype = ctx.conv
        grad, needs = grad.to(x.dtype), ctx.needs_input_grad
        plan = plan_for(grad, x, w, stride, padding, dilation)
        by_onednn = (needs[0] and not plan.input_grad_by_matmul, needs[1] and not plan.weight_grad_by_matmul)
        gx, gw = _onednn_grads(grad, x, w, stride, padding, dilation, *by_onednn) if any(by_onednn) else (None, None)
        if needs[0] and plan.input_grad_by_matmul:
            gx = input_grad_by_matmul(grad, w, x.shape, stride, padding, dilation)
        if needs[1] and plan.weight_grad_by_matmul:
            gw = weight_grad_by_matmul(grad, x, w.shape[-2:], stride, padding, dilation)
        gb = grad.sum((0, 2, 3), dtype=torch.float32) if has_bias and needs[2] else None
        return gx, None if gw is None else gw.to(weight_dtype), gb, None, None, None
