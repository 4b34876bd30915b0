"""The calibration samples a run draws from, and the loss on them.

:class:`SamplePool` holds every calibration sample in one batch on the model's device. Each round
estimates on ``derivatives.n_samples`` of them, drawn from ``(bcd.seed, step)`` only, and the ``fresh``
round check draws a disjoint batch of the same size. The last ``calibration.n_validation`` samples form
a validation split that nothing estimates on; only the ``validation`` round check reads it.
:func:`calibration_loss` is the mean per-sample loss over a list of batches, the quantity the round
check and the run's reports compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from icbs.batching import batch_size, batch_to, concat_batches, index_batch, split_batch
from icbs.schedule import Stream, step_rng
from icbs.targets import check_targets, without_dense_targets

if TYPE_CHECKING:
    from icbs.config import IcbsConfig

__all__ = ["SamplePool", "calibration_loss", "check_calibration", "mean_loss", "sample_losses"]

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def check_calibration(calibration: object, targets: str = "labels") -> list[dict[str, Tensor]]:
    """The calibration batches as a list of dicts; raises naming ``calibration`` when malformed.

    ``targets`` is ``calibration.targets``: ``dense`` needs every batch to carry the dense model's targets
    (:func:`icbs.targets.with_dense_targets`), ``labels`` needs none to.
    """
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise ValueError("'calibration' should be a non-empty list of batches (dict[str, Tensor])")
    for i, batch in enumerate(calibration):
        if not isinstance(batch, Mapping):
            raise TypeError(f"'calibration[{i}]' should be a dict[str, Tensor]; got {type(batch).__name__}")
        batch_size(batch)
    check_targets(calibration, targets)
    return [dict(b) for b in calibration]


def sample_losses(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], loss_fn: LossFn,
                  device: torch.device) -> list[Tensor]:
    """Per-sample losses of ``model`` over ``batches`` (moved to ``device``): one float64 CPU vector per batch."""
    with torch.no_grad():
        return [loss_fn(model, batch_to(batch, device)).detach().double().cpu() for batch in batches]


def mean_loss(losses: Sequence[Tensor]) -> float:
    """The mean of :func:`sample_losses`' vectors, accumulated batch by batch in float64."""
    total, count = 0.0, 0
    for vector in losses:
        total += float(vector.sum())
        count += int(vector.shape[0])
    return total / max(count, 1)


def calibration_loss(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], loss_fn: LossFn,
                     device: torch.device) -> float:
    """Mean per-sample loss of ``model`` over ``batches`` (moved to ``device``), accumulated in float64."""
    return mean_loss(sample_losses(model, batches, loss_fn, device))


class SamplePool:
    """All calibration samples, and the seeded draws of each round.

    Args:
        calibration: the calibration batches.
        device: the model's device (draws are moved there).
        seed: ``bcd.seed``.
        n_per_step: samples per round (``derivatives.n_samples``; capped at the pool's size).
        n_validation: samples held out at the end as the validation split.
        n_init: the first samples of the estimation split that the init reads and the reported
            calibration loss averages (``scoring.init_n_samples``; 0 = all).
        estimate_on_labels: drop the dense-model targets from the rounds' estimation batches, so the
            estimates follow the labels while the round check and the reported losses read the KL to the
            dense model (``calibration.targets: dense_check``).
    """

    def __init__(self, calibration: Sequence[Mapping[str, Tensor]], device: torch.device, seed: int,
                 n_per_step: int, n_validation: int = 0, *, n_init: int = 0, estimate_on_labels: bool = False) -> None:
        self.batches = [dict(b) for b in calibration]
        self.validation: list[dict[str, Tensor]] = []
        if n_validation:
            samples = concat_batches(self.batches)
            total, per_batch = batch_size(samples), batch_size(self.batches[0])
            if n_validation >= total:
                raise ValueError(f"'calibration.n_validation' ({n_validation}) should be below the "
                                 f"{total} calibration samples")
            fit = total - n_validation
            self.batches = split_batch(index_batch(samples, slice(0, fit)), per_batch)
            self.validation = [index_batch(samples, torch.arange(fit, total))]
        self.samples = concat_batches(self.batches)
        self.size = batch_size(self.samples)
        self.device = device
        self.seed = int(seed)
        self.n_per_step = min(int(n_per_step), self.size)
        self.estimate_on_labels = bool(estimate_on_labels)
        self.init_batches = self._head(int(n_init))

    @classmethod
    def from_config(cls, calibration: Sequence[Mapping[str, Tensor]], device: torch.device,
                    config: IcbsConfig) -> SamplePool:
        """The pool of a run of ``config`` (bcd.seed, derivatives.n_samples, calibration and scoring keys)."""
        return cls(calibration, device, config.bcd.seed, config.derivatives.n_samples, config.calibration.n_validation,
                   n_init=config.scoring.init_n_samples, estimate_on_labels=config.calibration.targets == "dense_check")

    def reported_loss(self, model: nn.Module, loss_fn: LossFn) -> float:
        """The calibration loss a run reports after its init and at its end: over :attr:`init_batches`.

        With a pool of hundreds of samples this keeps the two reports from costing more than the init.
        """
        return calibration_loss(model, self.init_batches, loss_fn, self.device)

    def device_batches(self, init: bool = False) -> list[dict[str, Tensor]]:
        """Every estimation batch, or with ``init`` the init's (:attr:`init_batches`), on the model's device."""
        return [batch_to(b, self.device) for b in (self.init_batches if init else self.batches)]

    def _head(self, n: int) -> list[dict[str, Tensor]]:
        """The first ``n`` estimation samples in batches of the pool's size (``0``: every batch)."""
        if n > self.size:
            raise ValueError(f"'scoring.init_n_samples' ({n}) should be at most the {self.size} estimation samples")
        if n <= 0 or n == self.size:
            return list(self.batches)
        return split_batch(index_batch(self.samples, slice(0, n)), batch_size(self.batches[0]))

    def step_indices(self, first_step: int) -> np.ndarray:
        """Sorted indices of the samples the round starting at ``first_step`` estimates on."""
        rng = step_rng(self.seed, first_step, Stream.STEP_SAMPLES)
        return np.sort(rng.choice(self.size, size=self.n_per_step, replace=False))

    def take(self, indices: np.ndarray) -> dict[str, Tensor]:
        """The samples at ``indices`` as one batch on the model's device."""
        return batch_to(index_batch(self.samples, torch.as_tensor(indices, dtype=torch.long)), self.device)

    def step_batch(self, first_step: int) -> dict[str, Tensor]:
        """The round's estimation batch (without dense-model targets when estimating on the labels)."""
        batch = self.take(self.step_indices(first_step))
        return without_dense_targets(batch) if self.estimate_on_labels else batch

    def fresh_batch(self, first_step: int) -> dict[str, Tensor]:
        """A batch of the step batch's size from the other samples (from all when too few are left)."""
        fitted = self.step_indices(first_step)
        others = np.setdiff1d(np.arange(self.size), fitted)
        pool = others if others.size >= fitted.size else np.arange(self.size)
        rng = step_rng(self.seed, first_step, Stream.CHECK_SAMPLES)
        return self.take(np.sort(rng.choice(pool, size=fitted.size, replace=False)))
