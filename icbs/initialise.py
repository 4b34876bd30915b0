"""The start of a run (paper Fig. 2, steps 1-2): dense statistics, the layer densities, the one-shot mask, the
fixed extremes.

The layer densities come from ``pruning.allocation`` (:mod:`icbs.allocation`), computed from the dense model
before the init (:func:`dense_start`); a resumed run computes them again and its checkpoint must agree.

Score-based inits (``magnitude``, ``wanda``, ``gradient``, ``random``) rank every weight and keep the
pattern's exact counts. Weight-refitting inits (``sparsegpt``, ``alps``) run that baseline through
:func:`icbs.baselines.run_baseline` and keep both of its results: the mask, and the re-fitted kept weights,
which become each layer's value-if-kept (a weight the init pruned returns with its dense value if a later
move keeps it). The extremes are then fixed by the init scores (magnitude for refitting inits).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from icbs.allocation import allocate
from icbs.baselines import run_baseline
from icbs.blocks import check_block_size
from icbs.config import IcbsConfig
from icbs.derivatives import collect_layer_inputs
from icbs.moments import check_finite_moment
from icbs.pool import SamplePool
from icbs.schedule import Stream, step_seed
from icbs.scoring import collect_activation_norms, collect_gradients, init_masks
from icbs.selection import layer_scores
from icbs.state import PruningState

__all__ = ["DenseStatistics", "dense_statistics", "dense_start", "initialise_masks", "REFITTING_INITS"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
# Inits that re-fit the kept weights (their updated values are kept as the value-if-kept).
REFITTING_INITS = ("sparsegpt", "alps")


@dataclasses.dataclass
class DenseStatistics:
    """What the dense model's calibration pass provides later: input norms (wanda) and ``X X^T / N`` per layer."""

    act_norms: dict[str, Tensor] | None = None
    layer_inputs: dict[str, Tensor] | None = None


def dense_statistics(model: nn.Module, layers: Mapping[str, nn.Module], pool: SamplePool, loss_fn: LossFn,
                     cfg: IcbsConfig) -> DenseStatistics:
    """Collect only the statistics this config uses, from the dense model (input norms: wanda or the owl allocation)."""
    stats = DenseStatistics()
    if "wanda" in (cfg.scoring.init_method, cfg.scoring.selection_method) or cfg.pruning.allocation == "owl":
        stats.act_norms = collect_activation_norms(model, layers, pool.device_batches(init=True), loss_fn)
    if cfg.derivatives.estimator == "layerwise" or cfg.bcd.refit != "none":
        stats.layer_inputs = collect_layer_inputs(model, layers, pool.device_batches(), loss_fn)
        key = "bcd.refit_damping" if cfg.bcd.refit != "none" else "derivatives.estimator"
        for name, moment in stats.layer_inputs.items():
            check_finite_moment(moment, name, key)
    return stats


def dense_start(model: nn.Module, layers: Mapping[str, nn.Module], state: PruningState, pool: SamplePool,
                loss_fn: LossFn, cfg: IcbsConfig) -> DenseStatistics:
    """:func:`dense_statistics`, then every layer's density (``pruning.allocation``) set on ``state``.

    A non-uniform allocation changes the layers' kept counts, so the block size is checked again against
    the free weights they leave.
    """
    stats = dense_statistics(model, layers, pool, loss_fn, cfg)
    densities = allocate(cfg.pruning, model, layers, act_norms=stats.act_norms)
    if densities is not None:
        state.set_densities(densities)
        check_block_size(cfg.blocks.block_size, cfg.blocks.k,
                         state.free_counts(cfg.scoring.fix_frac_prune, cfg.scoring.fix_frac_keep))
    return stats


def _refitting_init(method: str, model: nn.Module, layers: Mapping[str, nn.Module], state: PruningState,
                    pool: SamplePool, loss_fn: LossFn, cfg: IcbsConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Masks and re-fitted kept values of a weight-refitting baseline; the model gets its dense weights back."""
    masks = run_baseline(
        method, model, layers, pool.init_batches, loss_fn, density=state.pattern.density,
        pattern=cfg.pruning.pattern, seed=cfg.bcd.seed, layer_densities=state.layer_densities(),
        damping_frac=cfg.scoring.init_damping_frac,
    )
    masks = {name: masks[name].bool() for name in layers}
    values = {}
    for name, module in layers.items():
        keep = masks[name].to(module.weight.device)
        values[name] = torch.where(keep, module.weight.detach(), state[name].w0)
    state.restore()
    return masks, values


def initialise_masks(model: nn.Module, layers: Mapping[str, nn.Module], state: PruningState, pool: SamplePool,
                     loss_fn: LossFn, cfg: IcbsConfig, stats: DenseStatistics) -> None:
    """Set the initial masks (and values), fix the extremes and write the pruned weights into the model."""
    scoring = cfg.scoring
    values: dict[str, Tensor] = {}
    if scoring.init_method in REFITTING_INITS:
        masks, values = _refitting_init(scoring.init_method, model, layers, state, pool, loss_fn, cfg)
        method = "magnitude"
    else:
        method = scoring.init_method
    grads = collect_gradients(model, layers, pool.device_batches(init=True), loss_fn) if method == "gradient" else None
    generator = torch.Generator().manual_seed(step_seed(cfg.bcd.seed, 0, stream=Stream.INIT_SCORES))
    scores = layer_scores(method, scoring.init_scope, state, list(layers), act_norms=stats.act_norms, grads=grads,
                          generator=generator)
    if scoring.init_method not in REFITTING_INITS:
        masks = init_masks(scores, {name: state.pattern_of(name) for name in layers}, scoring.init_scope)
    state.set_masks(masks)
    for name, layer_values in values.items():
        state.set_values(name, layer_values)
    state.fix_extremes(scores, scoring.fix_frac_prune, scoring.fix_frac_keep)
    state.apply()
    state.check_invariants()
