"""Per-weight importance scores and the initial masks they give (paper Fig. 2, "init scoring").

Scores are pure tensor functions of the original weight ``(n_out, n_in)`` and, where the method needs
them, activation norms (Wanda) or mean gradients: higher = more important. Statistics come from
forward hooks / one backward over calibration batches (:func:`collect_activation_norms`,
:func:`collect_gradients`, :func:`collect_input_covariances`). :func:`init_mask` turns scores into a
keep-mask holding the pattern's exact counts, ranking within the layer, each row or each column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from icbs.config import SCORE_METHODS, SCORE_SCOPES
from icbs.exceptions import NonFiniteDerivativeError
from icbs.moments import accumulate_second_moments
from icbs.state import MaskPattern, layer_patterns

__all__ = [
    "score",
    "init_mask",
    "init_masks",
    "collect_activation_norms",
    "collect_gradients",
    "collect_input_covariances",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
_TINY = 1e-30


def score(
    method: str,
    scope: str,
    weight: Tensor,
    *,
    act_norm: Tensor | None = None,
    grad: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Score every weight of a layer; higher = more important.

    ``magnitude``: ``|w|``; ``wanda``: ``|w_ij| * ||x_j||_2``; ``gradient``: ``|w_ij g_ij|`` (first-order
    saliency with ``g`` the mean gradient); ``random``: uniform in [0, 1). With scope ``per_output``
    (``per_input``) each row (column) is divided by its mean, so that ranks inside a row (column) are
    kept and rows (columns) compare on an equal footing; ``per_layer`` leaves the raw values.

    Args:
        method: one of ``magnitude``, ``wanda``, ``gradient``, ``random``.
        scope: one of ``per_layer``, ``per_output``, ``per_input``.
        weight: ``(n_out, n_in)`` original (dense) weight.
        act_norm: ``(n_in,)`` input activation norms (``wanda``).
        grad: ``(n_out, n_in)`` mean gradient (``gradient``).
        generator: torch generator on the CPU (``random``).

    Returns:
        ``(n_out, n_in)`` float32 scores on the weight's device.

    Raises:
        ValueError: an unknown method/scope or a missing/misshaped statistic.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"'scoring method' should be one of {', '.join(SCORE_METHODS)}; got {method!r}")
    if scope not in SCORE_SCOPES:
        raise ValueError(f"'scoring scope' should be one of {', '.join(SCORE_SCOPES)}; got {scope!r}")
    if weight.dim() != 2:
        raise ValueError(f"'weight' should be (n_out, n_in); got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if method == "magnitude":
        values = w.abs()
    elif method == "wanda":
        if act_norm is None or act_norm.shape != (w.shape[1],):
            raise ValueError(
                f"'act_norm' should be ({w.shape[1]},) activation norms for wanda scoring; "
                f"got {None if act_norm is None else tuple(act_norm.shape)}"
            )
        values = w.abs() * act_norm.to(w.device).float()[None, :]
    elif method == "gradient":
        if grad is None or grad.shape != w.shape:
            raise ValueError(
                f"'grad' should be a {tuple(w.shape)} mean gradient for gradient scoring; "
                f"got {None if grad is None else tuple(grad.shape)}"
            )
        values = (w * grad.to(w.device).float()).abs()
    else:
        values = torch.rand(w.shape, generator=generator).to(w.device)
    if scope == "per_output":
        values = values / (values.mean(dim=1, keepdim=True) + _TINY)
    elif scope == "per_input":
        values = values / (values.mean(dim=0, keepdim=True) + _TINY)
    return values


def _top_per_line(scores: Tensor, counts: Tensor) -> Tensor:
    """Keep the ``counts[r]`` highest entries of every row ``r`` of a 2-d score tensor (stable ties)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank_kept = torch.arange(scores.shape[1], device=scores.device)[None, :] < counts[:, None]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, rank_kept)
    return mask


def _allocate(scores: Tensor, total: int) -> Tensor:
    """Split ``total`` kept weights over the rows of ``scores`` as evenly as possible.

    Every row gets ``total // n_rows``; the ``total % n_rows`` rows whose next-best score is highest get
    one more.
    """
    n_rows, n_cols = scores.shape
    base, extra = divmod(total, n_rows)
    counts = torch.full((n_rows,), base, dtype=torch.long, device=scores.device)
    if extra:
        next_best = torch.sort(scores, dim=1, descending=True, stable=True).values[:, base]
        winners = torch.sort(next_best, descending=True, stable=True).indices[:extra]
        counts[winners] += 1
    return counts


def init_mask(scores: Tensor, pattern: MaskPattern, scope: str = "per_layer") -> Tensor:
    """Keep-mask holding the pattern's exact counts, keeping the highest scores.

    ``nm``: the ``n`` best of every ``m`` inputs of a row; ``per_output``: ``round(d n_in)`` best per
    row; ``unstructured``: ``round(d n_out n_in)`` kept in all, ranked over the layer (``per_layer``),
    within rows (``per_output``: counts spread evenly over rows) or within columns (``per_input``).

    Args:
        scores: ``(n_out, n_in)`` scores, higher = kept first.
        pattern: the mask pattern.
        scope: ranking scope for the unstructured pattern.

    Returns:
        ``(n_out, n_in)`` bool keep-mask on the scores' device.
    """
    n_out, n_in = scores.shape
    s = scores.float()
    if pattern.kind == "nm":
        grouped = s.reshape(-1, pattern.m)
        counts = torch.full((grouped.shape[0],), pattern.n, dtype=torch.long, device=s.device)
        return _top_per_line(grouped, counts).reshape(n_out, n_in)
    if pattern.kind == "per_output":
        counts = torch.full((n_out,), pattern.group_target((n_out, n_in)), dtype=torch.long, device=s.device)
        return _top_per_line(s, counts)
    total = pattern.group_target((n_out, n_in))
    if scope == "per_output":
        return _top_per_line(s, _allocate(s, total))
    if scope == "per_input":
        return _top_per_line(s.T, _allocate(s.T, total)).T.contiguous()
    flat = s.reshape(1, -1)
    return _top_per_line(flat, torch.tensor([total], device=s.device)).reshape(n_out, n_in)


def init_masks(scores: Mapping[str, Tensor], pattern: MaskPattern | Mapping[str, MaskPattern],
               scope: str = "per_layer") -> dict[str, Tensor]:
    """:func:`init_mask` for every layer: ``{name: (n_out, n_in) bool}``.

    ``pattern`` is one for every layer or one per layer (a non-uniform allocation, :mod:`icbs.allocation`).
    """
    patterns = layer_patterns(pattern, scores)
    return {name: init_mask(value, patterns[name], scope) for name, value in scores.items()}


def _run_forward(model: nn.Module, batches: Sequence[dict[str, Tensor]], loss_fn: LossFn) -> None:
    with torch.no_grad():
        for batch in batches:
            loss_fn(model, batch)


def _hook_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    update: Callable[[str, Tensor], None],
) -> None:
    """Run every batch through ``loss_fn`` (no grad) and call ``update(name, X)`` with each layer's input rows ``(N, n_in)``."""
    handles = []
    for name, module in layers.items():

        def hook(_module: nn.Module, args: tuple, _output: Tensor, name: str = name) -> None:
            x = args[0].detach()
            update(name, x.reshape(-1, x.shape[-1]).float())

        handles.append(module.register_forward_hook(hook))
    try:
        _run_forward(model, batches, loss_fn)
    finally:
        for handle in handles:
            handle.remove()


def collect_activation_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[dict[str, Tensor]], loss_fn: LossFn
) -> dict[str, Tensor]:
    """Input activation norms ``||x_j||_2`` of every layer over all rows (tokens/samples) of ``batches``.

    Args:
        model: the model; run through ``loss_fn`` without gradients.
        layers: ``{name: module}`` to hook.
        batches: calibration batches.
        loss_fn: ``loss_fn(model, batch) -> (B,)``, used only to run the forward pass.

    Returns:
        ``{name: (n_in,) float32}`` on each layer's device.
    """
    sums: dict[str, Tensor] = {}

    def update(name: str, x: Tensor) -> None:
        sq = (x * x).sum(dim=0)
        sums[name] = sq if name not in sums else sums[name] + sq

    _hook_inputs(model, layers, batches, loss_fn, update)
    return {name: sums[name].sqrt() for name in layers}


def collect_input_covariances(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[dict[str, Tensor]], loss_fn: LossFn
) -> dict[str, Tensor]:
    """``X^T X / N`` of every layer's inputs, ``X`` the ``(N, n_in)`` non-padding input rows over ``batches``.

    Streamed by :func:`icbs.moments.accumulate_second_moments` (padding tokens of a batch's
    ``attention_mask`` are left out).

    Returns:
        ``{name: (n_in, n_in) float32}`` on each layer's device (float64 for float64 layers): the
        layer-wise objective's Hessian / 2.

    Raises:
        ValueError: a layer is not called by the forward.
    """
    return accumulate_second_moments(layers, lambda batch: loss_fn(model, batch), batches).mean()


def collect_gradients(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[dict[str, Tensor]], loss_fn: LossFn
) -> dict[str, Tensor]:
    """Mean gradient of the mean per-sample loss over all samples of ``batches``, for every layer's weight.

    Args:
        model: the model (its parameters' ``.grad`` are not touched).
        layers: ``{name: module}``.
        batches: calibration batches.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses.

    Returns:
        ``{name: (n_out, n_in) float32}`` on each layer's device.

    Raises:
        NonFiniteDerivativeError: a gradient holds NaN/Inf.
    """
    names = list(layers)
    weights = [layers[name].weight for name in names]
    flags = [w.requires_grad for w in weights]
    totals: list[Tensor] = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    n_total = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                losses = loss_fn(model, batch)
                n = int(losses.shape[0])
                grads = torch.autograd.grad(losses.sum(), weights, allow_unused=True)
            for i, grad in enumerate(grads):
                if grad is not None:
                    totals[i] += grad.float()
            n_total += n
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    result = {}
    for name, total in zip(names, totals):
        mean = total / max(n_total, 1)
        if not bool(torch.isfinite(mean).all()):
            raise NonFiniteDerivativeError(
                f"the gradient of layer {name!r} holds NaN/Inf; check loss_fn and the calibration data "
                "(or use a scoring method other than 'gradient')"
            )
        result[name] = mean
    return result
