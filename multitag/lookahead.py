"""Lookahead with a rising decay, as airbench94 trains (Zhang et al. 2019's Lookahead; Jordan 2024's schedule).

Unlike an EMA that is only evaluated (ema.py), lookahead changes the training path: every ``every``
optimizer steps the slow weights move toward the live ones, avg = ρ·avg + (1 − ρ)·live, and the live
weights are set back to that average. ρ rises with training progress, ρ = base^every · (step/total)^power,
so early steps move fast (ρ ≈ 0) and late ones are averaged strongly (ρ → base^every ≈ 0.77 for 0.95):
the averaging does part of the LR annealing. Float buffers (BatchNorm statistics) are averaged too.

At every epoch's end the steps since the last update are folded in by one more update (at that
step's ρ) and the live weights are set to the average, so at a checkpoint the average *is* the model:
lookahead keeps no state of its own across epochs and a resumed run continues exactly. (airbench
carries those steps into the next epoch instead; dropping them would lose up to every−1 steps of
progress per epoch, 3 of 43 in cifar10_speed.)
"""
from __future__ import annotations

import torch

from multitag.errors import UserError


class Lookahead:
    def __init__(self, model: torch.nn.Module, base: float, every: int, from_epoch: int, steps_per_epoch: int,
                 epochs: int, power: float = 3.0):
        if not 0 < base < 1 or every < 1:
            raise UserError(f"train.lookahead must be a decay between 0 and 1 (airbench: 0.95) with "
                            f"train.lookahead_every ≥ 1, or 0 for off; got {base} and {every}.")
        self.model = getattr(model, "_orig_mod", model)
        self.base, self.every, self.power = base, every, power
        self.from_epoch, self.steps_per_epoch, self.total = from_epoch, steps_per_epoch, max(1, epochs * steps_per_epoch)
        self.step, self.avg = 0, None

    def decay(self, step: int) -> float:
        """ρ of the update after global step ``step`` (1-based) of the stage."""
        return self.base ** self.every * (step / self.total) ** self.power

    def begin_epoch(self, epoch: int) -> None:
        """Before the stage's epoch ``epoch`` (0-based): the average restarts from the live weights."""
        self.step = epoch * self.steps_per_epoch
        active = epoch >= self.from_epoch
        self.avg = {k: v.detach().clone() for k, v in self._floats().items()} if active else None

    def after_step(self) -> None:
        self.step += 1
        if self.avg is not None and self.step % self.every == 0:
            self._pull_back()

    def end_epoch(self) -> None:
        """The live weights become the average (what is evaluated, saved and trained on next), with the
        steps since the last update folded in."""
        if self.avg is not None and self.step % self.every:
            self._pull_back()

    @torch.no_grad()
    def _pull_back(self) -> None:
        rho = self.decay(self.step)
        for name, live in self._floats().items():
            avg = self.avg[name]
            avg.lerp_(live, 1 - rho)                                     # avg = ρ·avg + (1-ρ)·live
            live.copy_(avg)

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
