"""Scoring: model logits → per-class scores, the one place that turns logits into probabilities.

Multi-label models are scored with a sigmoid per class; single-label ones with a softmax.
Used by evaluation during training, by `multitag eval`/`calibrate` and by predict.
"""
from __future__ import annotations

from typing import Iterable

import torch

from multitag.runtime import Runtime


def scores_from_logits(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)


@torch.no_grad()
def logits_of(model: torch.nn.Module, batches: Iterable[torch.Tensor], rt: Runtime) -> torch.Tensor:
    """Normalised image batches (B, 3, S, S) → logits (N, C) float32 on the CPU."""
    model.eval()
    out = []
    for x in batches:
        with rt.autocast():
            out.append(model(rt.prepare_input(x)).float().cpu())
    return torch.cat(out)
