"""Dense-model targets for the calibration loss (``calibration.targets: dense``).

With ``labels`` the search minimises the loss on the calibration data's own labels, and it can fit that
text better than the dense model does: on SmolLM2 the calibration loss fell well below the dense model's
while perplexity on another domain rose. With ``dense``, each calibration sample carries the dense model's
output distribution (its ``top_k`` most likely outcomes per position, :func:`icbs.evaluation.dense_top_k`),
and the adapters' ``per_sample_loss`` becomes the KL divergence to it, which is zero at the dense model and
never negative. The targets are computed once, from the dense weights, before anything is pruned; a resumed
run computes the same ones from the same dense model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from icbs.schedule import Stream, step_seed

__all__ = ["DENSE_IDS", "DENSE_LOGP", "DENSE_SAMPLE", "has_dense_targets", "with_dense_targets",
           "without_dense_targets", "check_targets"]

#: Batch keys of the dense model's top-k outcomes, their log-probabilities, and one outcome sampled from it.
DENSE_IDS, DENSE_LOGP, DENSE_SAMPLE = "dense_ids", "dense_logp", "dense_sample"


def has_dense_targets(batch: Mapping[str, Tensor]) -> bool:
    """Whether the batch carries dense-model targets."""
    return DENSE_IDS in batch and DENSE_LOGP in batch and DENSE_SAMPLE in batch


def with_dense_targets(adapter: Any, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], top_k: int, *,
                       seed: int = 0, progress: bool = False) -> list[dict[str, Tensor]]:
    """The batches with the dense ``model``'s top-``top_k`` targets added (new dicts; the inputs are untouched).

    Call it while the model still holds its dense weights. Batch ``i``'s sampled outcomes are drawn with
    :func:`icbs.schedule.step_seed` of ``(seed, i, Stream.DENSE_SAMPLE)``, so the same model, batches and seed give the same targets.

    Raises:
        ValueError: the adapter has no dense targets (names ``calibration.targets``).
    """
    if not hasattr(adapter, "dense_targets"):
        raise ValueError(f"'calibration.targets' other than 'labels' is not available for {adapter.kind} models")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            bar = tqdm(batches, desc="dense targets", unit="batch", disable=not progress, leave=False)
            return [{**batch, **adapter.dense_targets(model, batch, top_k, seed=step_seed(seed, i, Stream.DENSE_SAMPLE))}
                    for i, batch in enumerate(bar)]
    finally:
        model.train(was_training)


def without_dense_targets(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The batch without its dense-model targets (a new dict)."""
    return {key: value for key, value in batch.items() if key not in (DENSE_IDS, DENSE_LOGP, DENSE_SAMPLE)}


def check_targets(batches: Sequence[Mapping[str, Tensor]], targets: str) -> None:
    """Raise naming ``calibration.targets`` when the batches do not carry what it asks for."""
    carried = [has_dense_targets(batch) for batch in batches]
    if targets != "labels" and not all(carried):
        raise ValueError(f"'calibration.targets' is {targets!r} but the calibration batches carry no dense-model "
                         "targets; add them with icbs.targets.with_dense_targets(adapter, model, batches, top_k)")
    if targets == "labels" and any(carried):
        raise ValueError("'calibration.targets' is 'labels' but the calibration batches carry dense-model "
                         "targets; set it to 'dense' or pass the batches without them")
