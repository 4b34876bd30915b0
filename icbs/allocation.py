r"""Layer densities of a run: the same for every layer, or OWL's, with the total kept count held exact.

``pruning.allocation: uniform`` keeps ``pruning.density`` in every layer. ``owl`` (Outlier Weighed Layerwise
sparsity, Yin et al., 2023, §3) keeps more where the dense model has more outlier weights: LLM blocks differ
in how many weights have a very large Wanda score, and pruning a block with many of them to the same density
as the others costs more. Computed once, from the dense model and the init's calibration samples, before the
init:

1. Scores: Wanda's :math:`S_{ij} = |W_{ij}| \, \|X_j\|_2` of every pruned layer (:func:`icbs.scoring.score`,
   with the input norms of :func:`icbs.scoring.collect_activation_norms`).
2. Groups: the layers of one decoder block form a group (:func:`icbs.layers.group_by_block`, the sequential
   SparseGPT/ALPS driver's rule); a layer outside every block is a group of its own.
3. Outlier ratio of group :math:`g` with :math:`n_g` weights and mean score :math:`\bar S_g`:
   :math:`D_g = |\{(i, j) \in g : S_{ij} > M \bar S_g\}| / n_g` with :math:`M` = ``pruning.owl_threshold``.
4. Densities, linear in the ratio over :math:`[d - \lambda, d + \lambda]` (``pruning.density``,
   ``pruning.owl_lambda``): :math:`d_g = d - \lambda + 2\lambda (D_g - \min D) / (\max D - \min D)`, all
   :math:`d` when :math:`\max D = \min D` (then the allocation is the uniform one, exactly). Then the shift:
   :math:`d_g \leftarrow \operatorname{clip}(d_g + s, d - \lambda, d + \lambda)` with :math:`s` such that
   :math:`\sum_g n_g d_g = T`, the total count the uniform allocation keeps (:math:`T / N` is ``density`` up to
   the uniform allocation's own rounding); the clip only acts when the shift would push a group out of range.
5. Integer counts: layer :math:`l` keeps :math:`c_l u_l` weights, with :math:`u_l = 1` (``unstructured``,
   :math:`c_l` kept in the layer) or :math:`u_l = n_{out}` (``per_output``, :math:`c_l` kept in every row).
   :math:`c_l` is :math:`\lfloor r_l \rfloor` or one more, :math:`r_l` the real target (:math:`d_g` times the
   layer's size or its row length); which layers get the one more is a 0/1 knapsack: the largest total of
   remainders :math:`r_l - \lfloor r_l \rfloor` whose units :math:`u_l` add up to exactly what the floors leave
   of :math:`T` (:func:`round_to_total`). For ``unstructured`` all units are 1 and this is largest-remainder
   rounding: the total is always exactly :math:`T`. For ``per_output`` it is exact whenever some set of the
   layers' row counts adds up to that remainder, e.g. when the smallest row count divides the others and
   enough layers have it (SmolLM2 and other grouped-query-attention models, through their key/value
   projections); otherwise it is the nearest total some set reaches, off by less than the largest layer's row
   count.

The densities go to :meth:`icbs.state.PruningState.set_densities` (and ``layer_densities`` of
:func:`icbs.baselines.run_baseline`); each is ``c_l / group length``, so the pattern's rounding gives back
``c_l`` exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from icbs.config import PruningConfig
from icbs.layers import group_by_block
from icbs.scoring import collect_activation_norms, score
from icbs.state import MaskPattern

__all__ = ["allocate", "owl_densities", "outlier_ratios", "round_to_total"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
_DP_CELLS = 50_000_000
"""Largest knapsack table (layers x reachable totals) :func:`round_to_total` builds; beyond it, a greedy fill."""


def allocate(pruning: PruningConfig, model: nn.Module, layers: Mapping[str, nn.Module], *,
             act_norms: Mapping[str, Tensor] | None = None, batches: Sequence[dict[str, Tensor]] = (),
             loss_fn: LossFn | None = None) -> dict[str, float] | None:
    """The layer densities of ``pruning.allocation``; ``None`` for ``uniform`` (every layer at ``pruning.density``).

    Args:
        pruning: the validated ``pruning`` section.
        model: the dense model.
        layers: ``{name: nn.Linear}`` to prune.
        act_norms: ``{name: (n_in,)}`` Wanda input norms of the dense model, or ``None`` to collect them over
            ``batches`` with ``loss_fn``.
        batches: calibration batches (the init's samples).
        loss_fn: ``loss_fn(model, batch) -> (B,)``, only run forward.

    Returns:
        ``{name: density}`` (:func:`owl_densities`), or ``None``.
    """
    if pruning.allocation == "uniform":
        return None
    if act_norms is None:
        if loss_fn is None or len(batches) == 0:
            raise ValueError("'pruning.allocation' 'owl' needs calibration batches and a loss_fn for the input norms")
        act_norms = collect_activation_norms(model, layers, batches, loss_fn)
    pattern = MaskPattern.from_config(pruning.density, pruning.pattern)
    return owl_densities(model, layers, act_norms, pattern, pruning.owl_lambda, pruning.owl_threshold)


def outlier_ratios(groups: Sequence[Sequence[str]], layers: Mapping[str, nn.Module],
                   act_norms: Mapping[str, Tensor], threshold: float) -> np.ndarray:
    """``D_g`` of every group: the fraction of its weights whose Wanda score exceeds ``threshold`` x its mean.

    Two passes over each group's layers (the mean, then the count), so one layer's scores are held at a time.

    Returns:
        ``(n_groups,)`` float64.
    """
    def wanda(name: str) -> Tensor:
        return score("wanda", "per_layer", layers[name].weight, act_norm=act_norms[name])

    ratios = np.zeros(len(groups))
    for i, names in enumerate(groups):
        n_weights = sum(layers[name].weight.numel() for name in names)
        mean = sum(float(wanda(name).sum(dtype=torch.float64)) for name in names) / n_weights
        outliers = sum(int((wanda(name) > threshold * mean).sum()) for name in names)
        ratios[i] = outliers / n_weights
    return ratios


def owl_densities(model: nn.Module, layers: Mapping[str, nn.Module], act_norms: Mapping[str, Tensor],
                  pattern: MaskPattern, owl_lambda: float, threshold: float) -> dict[str, float]:
    """OWL's layer densities (steps 2-5 of the module docstring).

    Args:
        model: the dense model (its blocks group the layers).
        layers: ``{name: nn.Linear}`` to prune, dense weights.
        act_norms: ``{name: (n_in,)}`` input norms ``||X_j||_2`` over the calibration tokens.
        pattern: the run's pattern (``unstructured`` or ``per_output``) at ``pruning.density``.
        owl_lambda: half-width of the density range.
        threshold: the outlier threshold ``M``.

    Returns:
        ``{name: density}``: every layer's kept count over its size, in ``[d - λ, d + λ]`` up to one count
        unit of rounding; ``pattern.density`` for every layer when all groups have the same outlier ratio.
    """
    if pattern.kind == "nm":
        raise ValueError(f"'pruning.allocation' 'owl' does not apply to pattern {str(pattern)!r} (N:M fixes every "
                         "group's count)")
    names = list(layers)
    shapes = {name: (int(layers[name].weight.shape[0]), int(layers[name].weight.shape[1])) for name in names}
    groups = group_by_block(model, names)
    ratios = outlier_ratios(groups, layers, act_norms, threshold)
    spread = float(ratios.max() - ratios.min())
    if owl_lambda == 0 or spread == 0:
        logger.info("allocation owl: every group has outlier ratio %.4g; uniform densities", float(ratios[0]))
        return dict.fromkeys(names, pattern.density)
    low, high = pattern.density - owl_lambda, pattern.density + owl_lambda
    raw = low + 2 * owl_lambda * (ratios - ratios.min()) / spread
    group_sizes = np.array([sum(shapes[name][0] * shapes[name][1] for name in group) for group in groups], dtype=float)
    total = sum(pattern.layer_target(shape) for shape in shapes.values())
    group_density = np.clip(raw + _shift(raw, group_sizes, total, low, high), low, high)
    of_layer = {name: float(group_density[i]) for i, group in enumerate(groups) for name in group}
    rows = pattern.kind == "per_output"
    units = np.array([shapes[name][0] if rows else 1 for name in names], dtype=np.int64)
    lengths = np.array([pattern.group_length(shapes[name]) for name in names], dtype=np.int64)
    real = np.array([of_layer[name] for name in names]) * lengths
    counts = round_to_total(real, units, total)
    densities = {name: int(counts[i]) / int(lengths[i]) for i, name in enumerate(names)}
    kept = int(np.dot(counts, units))
    logger.info("allocation owl (lambda %g, threshold %g): %d groups, outlier ratios %.4g..%.4g, layer densities "
                "%.4f..%.4f, %d weights kept (uniform %d)", owl_lambda, threshold, len(groups), float(ratios.min()),
                float(ratios.max()), min(densities.values()), max(densities.values()), kept, total)
    return densities


def _shift(raw: np.ndarray, sizes: np.ndarray, total: int, low: float, high: float) -> float:
    """The ``s`` with ``sum(sizes * clip(raw + s, low, high)) == total`` (bisection; the sum grows with ``s``)."""
    def kept(s: float) -> float:
        return float(np.dot(sizes, np.clip(raw + s, low, high)))

    below, above = low - float(raw.max()), high - float(raw.min())
    for _ in range(200):
        middle = 0.5 * (below + above)
        if kept(middle) < total:
            below = middle
        else:
            above = middle
    return 0.5 * (below + above)


def round_to_total(real: np.ndarray, units: np.ndarray, total: int) -> np.ndarray:
    r"""Integers :math:`c_l \in \{\lfloor r_l \rfloor, \lfloor r_l \rfloor + 1\}` with :math:`\sum_l u_l c_l = T`.

    Which layers round up is the 0/1 knapsack that maximises the rounded-up remainders
    :math:`\sum_l x_l (r_l - \lfloor r_l \rfloor)` subject to
    :math:`\sum_l x_l u_l = T - \sum_l u_l \lfloor r_l \rfloor`, solved exactly by dynamic programming over
    totals in units of :math:`\gcd(u)`. With all :math:`u_l = 1` it is largest-remainder rounding. When no set
    of units adds up to that remainder, the nearest total some set reaches is taken (off by less than
    :math:`\max u`). Beyond :data:`_DP_CELLS` table cells, layers round up greedily by remainder while their
    units fit in what is left (the total then stays at or below :math:`T`).

    Args:
        real: ``(L,)`` float targets :math:`r_l \ge 0` (in units).
        units: ``(L,)`` positive int weights :math:`u_l` of one count of each layer.
        total: :math:`T`.

    Returns:
        ``(L,)`` int64 counts.
    """
    base = np.floor(real).astype(np.int64)
    rest = real - base
    need = total - int(np.dot(units, base))
    step = math.gcd(*(int(u) for u in units))
    weight = (units // step).astype(np.int64)
    cap = int(weight.sum())
    if cap * len(real) > _DP_CELLS:
        up = np.zeros(len(real), dtype=np.int64)
        room = need
        for i in np.argsort(-rest, kind="stable"):
            if units[i] <= room:
                up[i], room = 1, room - int(units[i])
        return base + up
    best = np.full(cap + 1, -np.inf)
    best[0] = 0.0
    take = np.zeros((len(real), cap + 1), dtype=bool)
    for i, w in enumerate(weight):
        with_i = np.full(cap + 1, -np.inf)
        with_i[w:] = best[: cap + 1 - w] + rest[i]
        take[i] = with_i > best
        best = np.maximum(best, with_i)
    reachable = np.flatnonzero(np.isfinite(best))
    at = int(reachable[np.argmin(np.abs(reachable * step - need))])
    up = np.zeros(len(real), dtype=np.int64)
    for i in reversed(range(len(real))):
        if take[i, at]:
            up[i], at = 1, at - int(weight[i])
    return base + up
