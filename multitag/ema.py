"""Exponential moving average of a model's weights (Polyak averaging), as timm's ModelEmaV2.

After every optimizer step: ema = d · ema + (1 − d) · weights, for parameters and float buffers
(BatchNorm running statistics) alike; integer buffers (num_batches_tracked) are copied. The
average is the model that is evaluated and saved: it smooths the last steps' noise, which a
short high-LR run has plenty of. Its state (tensors + update count) is part of the checkpoint,
so a resumed run continues the same average.
"""
from __future__ import annotations

import copy

import torch

from multitag.errors import UserError


class ModelEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise UserError(f"train.ema must be a decay between 0 and 1 (e.g. 0.999), or 0 for off; got {decay}.")
        self.source = getattr(model, "_orig_mod", model)                 # the live model it follows
        self.module = copy.deepcopy(self.source).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    def current_decay(self) -> float:
        """The decay of the next update: ramps up as (1 + n) / (10 + n) so the random init's weight
        in the average dies out fast, capped at the configured decay (timm / YOLOv5 warm-up)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.updates += 1
        live = self.source.state_dict()
        for name, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(live[name].to(avg.dtype), 1 - d)              # avg = d·avg + (1-d)·live
            else:
                avg.copy_(live[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged state, keyed "ema.<name>" for the checkpoint file."""
        return {f"ema.{k}": v for k, v in self.module.state_dict().items()}

    def restore(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Load what ``tensors()`` saved (from a checkpoint's tensors) and the update count."""
        self.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.updates = updates
