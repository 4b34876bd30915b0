"""One-shot pruning baselines behind one entry point, :func:`run_baseline`.

``magnitude``, ``wanda`` and ``random`` rank weights with icbs's own scoring code (the same masks icbs
starts from); ``sparsegpt`` prunes layer by layer with OBS weight updates (:mod:`icbs.baselines.sparsegpt`);
``alps`` layer by layer with ADMM on the layer reconstruction and a PCG re-fit of the kept weights
(:mod:`icbs.baselines.alps`), through the same sequential driver. Every method keeps the pattern's exact
counts, at one density for every layer or at each layer's own (``layer_densities``, e.g. from
:func:`icbs.allocation.allocate`), and leaves the model pruned (zeros written; SparseGPT's and ALPS's updated
weights in place).

Example::

    masks = run_baseline("sparsegpt", model, layers, calibration, adapter.per_sample_loss, density=0.5)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from icbs.baselines.alps import run_alps
from icbs.baselines.one_shot import DEFAULT_SCOPES, one_shot_masks
from icbs.baselines.sparsegpt import run_sparsegpt, sparsegpt_prune_weight
from icbs.config import SCORE_SCOPES
from icbs.state import MaskPattern, layer_patterns

__all__ = ["run_baseline", "BASELINE_METHODS", "sparsegpt_prune_weight"]

logger = logging.getLogger(__name__)

BASELINE_METHODS = ("magnitude", "wanda", "random", "sparsegpt", "alps")
_OPTIONS = {
    "magnitude": {"scope": None},
    "wanda": {"scope": None},
    "random": {"scope": None},
    "sparsegpt": {"block_size": 128, "damping_frac": 0.01},
    "alps": {"damping_frac": 0.01, "admm_iters": 10, "pcg_iters": 5, "rho_init": 0.1},
}

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def _check_options(method: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS[method]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for baseline {method!r}; valid options: {', '.join(allowed)}"
        )
    merged = {**allowed, **opts}
    for key in ("block_size", "admm_iters", "pcg_iters"):
        value = merged.get(key)
        if key in merged and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"'{key}' should be a positive int; got {value!r}")
    if "damping_frac" in merged:
        damping = merged["damping_frac"]
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise ValueError(f"'damping_frac' should be a non-negative number; got {damping!r}")
    if "rho_init" in merged:
        rho = merged["rho_init"]
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 < rho < float("inf")):
            raise ValueError(f"'rho_init' should be a positive number; got {rho!r}")
    if "scope" in merged and merged["scope"] is not None and merged["scope"] not in SCORE_SCOPES:
        raise ValueError(f"'scope' should be one of {', '.join(SCORE_SCOPES)}; got {merged['scope']!r}")
    return merged


def run_baseline(
    method: str,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    *,
    density: float,
    pattern: str = "unstructured",
    seed: int = 0,
    layer_densities: Mapping[str, float] | None = None,
    **opts: Any,
) -> dict[str, Tensor]:
    """Prune ``layers`` of ``model`` with a one-shot baseline and return the keep-masks.

    Args:
        method: ``"magnitude"``, ``"wanda"`` (per-output ranking), ``"random"``, ``"sparsegpt"`` or ``"alps"``.
        model: the dense model; modified in place (pruned weights zeroed; SparseGPT and ALPS also update kept
            ones).
        layers: ``{name: nn.Linear}`` to prune, in model order.
        calibration: calibration batches (used by ``wanda``, ``sparsegpt`` and ``alps``).
        loss_fn: ``loss_fn(model, batch) -> (B,)``; baselines only use it to run forward passes.
        density: fraction of weights kept, in (0, 1) (ignored for N:M, where it is N/M).
        pattern: ``"unstructured"``, ``"per_output"`` or ``"N:M"`` such as ``"2:4"``.
        seed: seeds ``random``.
        layer_densities: ``{name: density}`` of every layer, a non-uniform allocation
            (:func:`icbs.allocation.allocate`); each layer keeps the pattern's count at its own density.
            ``None``: ``density`` for every layer.
        **opts: ``scope`` (magnitude/wanda/random: ``per_layer``, ``per_output``, ``per_input``);
            ``block_size`` (128) and ``damping_frac`` (0.01) for sparsegpt; ``damping_frac`` (0.01),
            ``admm_iters`` (10), ``pcg_iters`` (5) and ``rho_init`` (0.1) for alps
            (:func:`icbs.baselines.alps.alps_prune_weight`).

    Returns:
        ``{name: (n_out, n_in) bool}`` keep-masks (True = kept) with exactly the pattern's counts.

    Raises:
        ValueError: unknown method or option, bad density/pattern, a layer that cannot hold the pattern,
            a layer without a density in ``layer_densities``, missing calibration data. The model is untouched
            in these cases.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"'method' should be one of {', '.join(BASELINE_METHODS)}; got {method!r}")
    options = _check_options(method, opts)
    mask_pattern = MaskPattern.from_config(density, pattern)
    if not layers:
        raise ValueError("'layers' should name at least one layer to prune; got none")
    patterns = layer_patterns(mask_pattern, layers, layer_densities)
    for name, module in layers.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"layer {name!r} should have a 2-d weight (n_out, n_in) to prune")
        patterns[name].check_layer(name, tuple(weight.shape))
    start = time.perf_counter()
    if method == "sparsegpt":
        masks = run_sparsegpt(
            model, layers, calibration, loss_fn, patterns,
            block_size=options["block_size"], damping_frac=float(options["damping_frac"]),
        )
    elif method == "alps":
        masks = run_alps(
            model, layers, calibration, loss_fn, patterns,
            damping_frac=float(options["damping_frac"]), admm_iters=options["admm_iters"],
            pcg_iters=options["pcg_iters"], rho_init=float(options["rho_init"]),
        )
    else:
        masks = one_shot_masks(
            method, model, layers, calibration, loss_fn, patterns,
            scope=options["scope"] or DEFAULT_SCOPES[method], seed=seed,
        )
    with torch.no_grad():
        for name, module in layers.items():
            keep = masks[name].to(module.weight.device)
            module.weight.mul_(keep.to(module.weight.dtype))
            masks[name] = keep.bool()
    logger.info("baseline %s (%s) pruned %d layers in %.1f s", method, mask_pattern, len(layers), time.perf_counter() - start)
    return masks
