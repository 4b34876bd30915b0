"""One-shot baselines that only rank weights: magnitude, Wanda and random.

They share icbs's init code (:func:`icbs.scoring.score` and :func:`icbs.scoring.init_masks`), so a run's
``init`` mask and the matching baseline are the same mask. Wanda scores ``|W_ij| * ||X_j||_2`` and ranks
within each output row (Sun et al., 2023); magnitude ranks ``|W_ij|`` over the whole layer; random is a
seeded uniform draw. Every method keeps the pattern's exact counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from icbs.scoring import collect_activation_norms, init_masks, score
from icbs.state import MaskPattern

__all__ = ["one_shot_masks", "DEFAULT_SCOPES"]

logger = logging.getLogger(__name__)

#: The ranking scope each method uses unless ``scope=`` is given.
DEFAULT_SCOPES = {"magnitude": "per_layer", "wanda": "per_output", "random": "per_layer"}

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def one_shot_masks(
    method: str,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    pattern: MaskPattern | Mapping[str, MaskPattern],
    *,
    scope: str | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Keep-masks of a scoring baseline (the model is not modified).

    Args:
        method: ``"magnitude"``, ``"wanda"`` or ``"random"``.
        model: the dense model.
        layers: ``{name: nn.Linear}`` to prune.
        calibration: batches; Wanda runs them through ``loss_fn`` (no grad) to get input norms.
        loss_fn: ``loss_fn(model, batch) -> (B,)``.
        pattern: the mask pattern and density, one for every layer or one per layer.
        scope: ``per_layer``, ``per_output`` or ``per_input`` ranking; default :data:`DEFAULT_SCOPES`.
        seed: seeds the ``random`` method.

    Returns:
        ``{name: (n_out, n_in) bool}`` keep-masks, True = kept.

    Raises:
        ValueError: Wanda without calibration batches.
    """
    scope = scope or DEFAULT_SCOPES[method]
    act_norms: dict[str, Tensor] = {}
    if method == "wanda":
        if len(calibration) == 0:
            raise ValueError("'calibration' should hold at least one batch for wanda; got none")
        act_norms = collect_activation_norms(model, layers, calibration, loss_fn)
    generator = torch.Generator().manual_seed(int(seed))
    scores = {
        name: score(method, scope, module.weight, act_norm=act_norms.get(name), generator=generator)
        for name, module in layers.items()
    }
    return init_masks(scores, pattern, scope)
