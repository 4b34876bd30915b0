"""The round check: a round whose moves raised the true loss is undone (DESIGN.md §4).

The block QUBOs are local quadratic models, and the blocks of one round ignore each other, so every
round's moves are checked against the true loss on the samples ``bcd.check`` names:

- ``validation``: the validation split (``calibration.n_validation``), which no estimate is fitted on;
  its loss is cached like ``calibration``'s.
- ``calibration``: every calibration sample. The loss at the current masks is cached between rounds,
  so the calibration loss of the run never rises.
- ``fresh``: a batch of the estimation batch's size drawn from the other samples.
- ``batch``: the estimation batch itself (cheapest: its loss before the round comes from the pass).

With ``bcd.check_z`` = z > 0 a round must do more than not raise the loss: the mean of its per-sample
changes plus z standard errors of that mean must be ≤ 0, a one-sided paired test that the fall is real
on the checked samples. Late in a long run most rounds improve the checked loss by less than its noise;
they are undone, and ``bcd.patience`` then ends the run instead of letting it fit the pool's noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from icbs.pool import SamplePool, mean_loss, sample_losses

__all__ = ["RoundCheck"]

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


class RoundCheck:
    """Measure the loss before and after a round on the samples of ``mode``.

    Args:
        mode: ``bcd.check``.
        model: the model being pruned.
        loss_fn: per-sample loss.
        pool: the calibration samples.
        z: ``bcd.check_z``; 0 passes every round whose mean loss did not rise.
    """

    def __init__(self, mode: str, model: nn.Module, loss_fn: LossFn, pool: SamplePool, z: float = 0.0) -> None:
        self.mode = mode
        self.model = model
        self.loss_fn = loss_fn
        self.pool = pool
        self.z = z
        self._cached: list[Tensor] | None = None  # per-sample losses at the current masks (cached modes)
        self._before: list[Tensor] | None = None  # per-sample losses before the pending round (z > 0)

    def _losses(self, batches: Sequence[dict[str, Tensor]]) -> list[Tensor]:
        return sample_losses(self.model, batches, self.loss_fn, self.pool.device)

    def before(self, first_step: int, batch: dict[str, Tensor], batch_loss: float) -> tuple[list[dict[str, Tensor]], float]:
        """The samples the round is checked on and the loss there now.

        Args:
            first_step: the round's first step (seeds the ``fresh`` draw).
            batch: the round's estimation batch.
            batch_loss: that batch's loss as the estimating pass measured it (NaN when it did not).
        """
        if self.mode in ("calibration", "validation"):
            samples = self.pool.batches if self.mode == "calibration" else self.pool.validation
            if self._cached is None:
                self._cached = self._losses(samples)
            self._before = self._cached
            return samples, mean_loss(self._cached)
        check_on = [self.pool.fresh_batch(first_step)] if self.mode == "fresh" else [batch]
        if self.mode == "batch" and self.z == 0 and math.isfinite(batch_loss):
            self._before = None
            return check_on, batch_loss
        self._before = self._losses(check_on)
        return check_on, mean_loss(self._before)

    def passes(self, check_on: Sequence[dict[str, Tensor]], before: float) -> tuple[bool, float]:
        """Whether the round passes (see the module docstring); also returns the mean loss now."""
        losses = self._losses(check_on)
        after = mean_loss(losses)
        passed = after <= before if self.z == 0 or self._before is None else self._significant(losses, self._before)
        if passed and self.mode in ("calibration", "validation"):
            self._cached = losses
        return passed, after

    def _significant(self, after: list[Tensor], before: list[Tensor]) -> bool:
        """Mean per-sample change + z standard errors ≤ 0 (the standard error is 0 for a single sample)."""
        change = torch.cat(after) - torch.cat(before)
        n = int(change.numel())
        error = float(change.std()) / math.sqrt(n) if n > 1 else 0.0
        return float(change.mean()) + self.z * error <= 0

    def forget(self) -> None:
        """The masks changed without a check: the cached loss is stale."""
        self._cached = None
