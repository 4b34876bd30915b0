"""The round check: a round whose moves raised the true loss is undone (DESIGN.md §4).

The block QUBOs are local quadratic models, and the blocks of one round ignore each other, so every
round's moves are checked against the true loss on the samples ``bcd.check`` names:

- ``validation``: the validation split (``calibration.n_validation``), which no estimate is fitted on;
  its loss is cached like ``calibration``'s.
- ``calibration``: every calibration sample. The loss at the current masks is cached between rounds,
  so the calibration loss of the run never rises.
- ``fresh``: a batch of the estimation batch's size drawn from the other samples.
- ``batch``: the estimation batch itself (cheapest: its loss before the round comes from the pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from icbs.pool import SamplePool, calibration_loss

__all__ = ["RoundCheck"]

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


class RoundCheck:
    """Measure the loss before and after a round on the samples of ``mode``.

    Args:
        mode: ``bcd.check``.
        model: the model being pruned.
        loss_fn: per-sample loss.
        pool: the calibration samples.
    """

    def __init__(self, mode: str, model: nn.Module, loss_fn: LossFn, pool: SamplePool) -> None:
        self.mode = mode
        self.model = model
        self.loss_fn = loss_fn
        self.pool = pool
        self._cached: float | None = None  # calibration loss at the current masks ('calibration' mode)

    def _loss(self, batches: Sequence[dict[str, Tensor]]) -> float:
        return calibration_loss(self.model, batches, self.loss_fn, self.pool.device)

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
                self._cached = self._loss(samples)
            return samples, self._cached
        if self.mode == "fresh":
            check_on = [self.pool.fresh_batch(first_step)]
            return check_on, self._loss(check_on)
        return [batch], batch_loss if math.isfinite(batch_loss) else self._loss([batch])

    def passes(self, check_on: Sequence[dict[str, Tensor]], before: float) -> tuple[bool, float]:
        """Whether the loss on ``check_on`` did not rise above ``before``; also returns the loss now."""
        after = self._loss(check_on)
        if after <= before and self.mode in ("calibration", "validation"):
            self._cached = after
        return after <= before, after

    def forget(self) -> None:
        """The masks changed without a check: the cached loss is stale."""
        self._cached = None
