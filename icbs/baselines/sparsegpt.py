r"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

For one linear layer with weight :math:`W \in \mathbb{R}^{n_{out} \times n_{in}}` and calibration inputs
:math:`X`, the layer-wise objective is :math:`\|(W' - W) X\|_F^2` with Hessian :math:`H = 2 X X^\top / N`.
Columns are processed left to right in blocks of ``block_size``. Inside a block the mask is chosen by the
OBS saliency :math:`w_{ij}^2 / [H^{-1}]_{jj}^2` (for N:M, per group of M columns when the group starts), a
pruned weight is zeroed, and its error :math:`e = w / [H^{-1}]_{jj}` is spread over the later columns with
the upper Cholesky factor of :math:`H^{-1}` (the sequential OBS update); blocks then pass their
accumulated error to the remaining columns in one matrix product. Damping adds
``damping_frac * mean(diag H)`` to the diagonal.

:func:`sparsegpt_prune_weight` is the numeric kernel. :func:`run_sequential` drives a whole model layer by
layer with any such kernel (a :data:`WeightPruner`; SparseGPT here, ALPS in :mod:`icbs.baselines.alps`), so
that every layer's Hessian comes from inputs that went through the already-pruned earlier layers: repeated blocks (transformer layers in an ``nn.ModuleList``) are processed one at a time on
cached hidden states, their linears in call-order groups (q,k,v -> o -> gate,up -> down), with the
inputs re-captured between groups; models without such blocks re-run the calibration forward per group.
Counts are exact: unstructured keeps ``round_half_up(d * size)`` per layer, ``per_output`` that many per
row, N:M exactly N in every M consecutive inputs of a row.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from icbs.exceptions import PruningError, StatisticsError
from icbs.layers import block_list, block_prefixes
from icbs.moments import accumulate_second_moments, check_finite_moment
from icbs.state import MaskPattern, layer_patterns

__all__ = [
    "sparsegpt_prune_weight",
    "run_sparsegpt",
    "run_sequential",
    "inverse_hessian_factor",
    "single_thread_on_cpu",
    "WeightPruner",
    "layer_kernels",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]

WeightPruner = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""A per-layer kernel: ``(weight (n_out, n_in), hessian (n_in, n_in)) -> (new_weight float32, keep_mask bool)``.

``hessian`` is ``2 X X^T / N`` of the layer's inputs; pruned entries of ``new_weight`` are exactly 0."""


@contextlib.contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the body with one torch thread when ``device`` is the CPU (no change elsewhere).

    Layer kernels are long chains of mid-sized ops; on a CPU one thread runs them many times faster
    than several (no fork/join per op, no spin-waiting when the machine is busy).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_factor(hessian: Tensor, damping_frac: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^{-1}`` (``U^T U = (H + damp I)^{-1}``).

    Args:
        hessian: ``(n, n)`` float32 symmetric PSD matrix (zero diagonal entries already set to 1).
        damping_frac: ``damp = damping_frac * mean(diag H)``; multiplied by 10 (with a warning) up to three
            times if the factorisation fails.

    Returns:
        ``(n, n)`` upper-triangular float32.

    Raises:
        PruningError: still not positive definite; increase ``damping_frac``.
    """
    n = hessian.shape[0]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    damp = damping_frac * float(torch.diag(hessian).mean())
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        if attempt < 3:
            new_damp = max(damp * 10.0, 1e-8)
            logger.warning(
                "SparseGPT: Hessian + %.3g I is not positive definite; retrying with damping %.3g "
                "(raise 'damping_frac', scoring.init_damping_frac, to avoid this)", damp, new_damp,
            )
            damp = new_damp
    raise StatisticsError(
        "SparseGPT: the layer Hessian 2 X X^T / N stays singular after damping; increase "
        "'scoring.init_damping_frac' (the damping_frac argument)"
    )


def _split_counts(total: int, n_cols: int, start: int, stop: int) -> int:
    """How many of ``total`` pruned weights fall in columns ``[start, stop)`` (an exact integer split)."""
    return total * stop // n_cols - total * start // n_cols


def sparsegpt_prune_weight(
    weight: Tensor,
    hessian: Tensor,
    pattern: MaskPattern,
    *,
    block_size: int = 128,
    damping_frac: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune one weight matrix with SparseGPT.

    Args:
        weight: ``(n_out, n_in)`` dense weight (any float dtype; the math runs in float32 on its device).
        hessian: ``(n_in, n_in)`` ``2 X X^T / N`` of the layer's inputs.
        pattern: the mask pattern (``unstructured``, ``per_output`` or ``nm``) and density.
        block_size: columns per lazy-update block (a multiple of M for N:M).
        damping_frac: relative diagonal damping (see :func:`inverse_hessian_factor`).

    Returns:
        ``(new_weight (n_out, n_in) float32, keep_mask (n_out, n_in) bool)``; pruned entries are exactly 0.

    Raises:
        ValueError: shapes that do not fit, or N:M with ``n_in`` or ``block_size`` not a multiple of M.
    """
    n_out, n_in = weight.shape
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"'hessian' should be ({n_in}, {n_in}) for a weight {tuple(weight.shape)}; got {tuple(hessian.shape)}")
    if pattern.kind == "nm" and (n_in % pattern.m or block_size % pattern.m):
        raise ValueError(
            f"'block_size' ({block_size}) and n_in ({n_in}) should be multiples of M={pattern.m} for pattern {pattern}"
        )
    with single_thread_on_cpu(weight.device):
        return _prune_weight(weight, hessian, pattern, block_size, damping_frac)


def _prune_weight(
    weight: Tensor, hessian: Tensor, pattern: MaskPattern, block_size: int, damping_frac: float
) -> tuple[Tensor, Tensor]:
    n_out, n_in = weight.shape
    W = weight.detach().float().clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    check_finite_moment(H, "weight", "scoring.init_damping_frac")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    Hinv = inverse_hessian_factor(H, damping_frac)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    if pattern.kind == "nm":
        total_prune = row_prune = 0
    elif pattern.kind == "per_output":
        row_prune = n_in - pattern.group_target((n_out, n_in))
        total_prune = 0
    else:
        total_prune = n_out * n_in - pattern.group_target((n_out, n_in))
        row_prune = 0
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            k = _split_counts(total_prune, n_in, i1, i2)
            if k:
                saliency = (W1**2 / diag[None, :] ** 2).flatten()
                mask1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        elif pattern.kind == "per_output":
            k = _split_counts(row_prune, n_in, i1, i2)
            if k:
                saliency = W1**2 / diag[None, :] ** 2
                mask1.scatter_(1, torch.topk(saliency, k, dim=1, largest=False).indices, True)
        for i in range(count):
            if pattern.kind == "nm" and i % pattern.m == 0:
                saliency = W1[:, i : i + pattern.m] ** 2 / diag[None, i : i + pattern.m] ** 2
                idx = torch.topk(saliency, pattern.m - pattern.n, dim=1, largest=False).indices
                group = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, idx, True)
                mask1[:, i : i + pattern.m] = group
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / diag[i]
            # Sequential OBS update of the block's remaining columns (row i of the Cholesky factor).
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        # Lazy batch update of all later columns with the block's accumulated errors.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned


# ----------------------------------------------------------------------------------------------------
# Driving a whole model
# ----------------------------------------------------------------------------------------------------


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")
"""Keyword arguments through which transformers blocks receive a key/value cache."""


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def _call_groups(run: Callable[[], Any], layers: Mapping[str, nn.Module]) -> list[list[str]]:
    """Group layers by the input tensor they are called on, in call order (q,k,v share one input).

    Layers never called during ``run`` are appended as groups of their own (they get an empty Hessian).
    """
    calls: list[tuple[str, Tensor]] = []
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in seen:
                seen.add(name)
                calls.append((name, args[0]))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    group_inputs: list[Tensor] = []
    for name, x in calls:
        for group, x_group in zip(groups, group_inputs):
            if x_group is x:
                group.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(x)
    for name in layers:
        if name not in seen:
            logger.warning("layer %s is not used by the forward pass; it is pruned with an identity Hessian", name)
            groups.append([name])
    return groups


def _hessians(run: Callable[[], Any], layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """``2 X X^T / N`` (float32, on each layer's device) of every layer's input rows during ``run``."""
    return accumulate_second_moments(layers, lambda _batch: run()).mean(scale=2.0, allow_empty=True)


def _capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: Sequence[dict[str, Tensor]], loss_fn: LossFn
) -> list[list[tuple[tuple, dict]]]:
    """``(args, kwargs)`` of every block for every batch, from one dense forward pass per batch.

    Caches (``past_key_values``, or ``cache`` in transformers 5) are dropped and ``use_cache`` turned off so
    blocks can be re-run: a kept cache would grow on every re-run and feed the dense pass's keys and values to
    the pruned block's attention (a ``loss_fn`` that does not pass ``use_cache=False`` creates one).
    """
    captured: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            for key in _CACHE_KWARGS:
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            args = tuple(args)
            if index > 0:
                # Only block 0's hidden states are needed: later ones come from the pruned blocks.
                args, kwargs = _with_hidden(args, kwargs, None)
            captured[index].append((args, kwargs))
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in calibration:
                try:
                    loss_fn(model, batch)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != len(calibration) for c in captured):
        raise PruningError("the model's blocks were not each called once per calibration batch; sequential pruning needs that")
    return captured


def _run_until(calls: Sequence[tuple[tuple, dict]], block: nn.Module, last: nn.Module) -> None:
    """Run ``block`` on every call, but only up to the input of ``last`` (the last layer of a group).

    The Hessians of a group need its input and nothing after it: the rest of the block's forward is
    skipped. Hooks registered before this call (the moment hooks) still fire on ``last``'s input.
    """

    def stop(_module: nn.Module, _args: tuple) -> None:
        raise _StopForward

    handle = last.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                try:
                    block(*args, **kwargs)
                except _StopForward:
                    pass
    finally:
        handle.remove()


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor | None) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _prune_group(
    names: Sequence[str],
    layers: Mapping[str, nn.Module],
    hessians: Mapping[str, Tensor],
    prune: Mapping[str, WeightPruner],
    masks: dict[str, Tensor],
    originals: dict[str, Tensor],
) -> None:
    for name in names:
        module = layers[name]
        try:  # the kernel checks its Hessian; the layer's name is added here
            new_weight, keep = prune[name](module.weight, hessians[name])
        except StatisticsError as err:
            raise StatisticsError(f"layer {name!r}: {err}") from err
        originals.setdefault(name, module.weight.detach().to("cpu", copy=True))
        with torch.no_grad():
            module.weight.copy_(new_weight.to(module.weight.dtype))
        masks[name] = keep


def run_sparsegpt(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    pattern: MaskPattern | Mapping[str, MaskPattern],
    *,
    block_size: int = 128,
    damping_frac: float = 0.01,
) -> dict[str, Tensor]:
    """Prune every layer with SparseGPT, sequentially, feeding pruned outputs forward (:func:`run_sequential`).

    Args:
        model: the model (modified in place: masks and weight updates applied).
        layers: ``{name: nn.Linear}`` to prune, in model order.
        calibration: batches run through ``loss_fn`` (no grad) to capture inputs.
        loss_fn: ``loss_fn(model, batch) -> (B,)``.
        pattern: mask pattern and density, one for every layer or one per layer.
        block_size: SparseGPT column block.
        damping_frac: relative Hessian damping.

    Returns:
        ``{name: (n_out, n_in) bool}`` keep-masks.

    Raises:
        ValueError: no calibration batches.
        PruningError: numerical failure (weights of the layers already pruned are restored first).
    """
    prune = layer_kernels(sparsegpt_prune_weight, layer_patterns(pattern, layers), block_size=block_size,
                          damping_frac=damping_frac)
    return run_sequential(model, layers, calibration, loss_fn, prune, method="sparsegpt")


def layer_kernels(kernel: Callable[..., tuple[Tensor, Tensor]], patterns: Mapping[str, MaskPattern],
                  **options: Any) -> dict[str, WeightPruner]:
    """Every layer's :data:`WeightPruner`: ``kernel`` with the layer's pattern and the shared ``options``."""
    return {name: functools.partial(kernel, pattern=pattern, **options) for name, pattern in patterns.items()}


def run_sequential(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    prune: Mapping[str, WeightPruner],
    *,
    method: str,
) -> dict[str, Tensor]:
    """Prune every layer with its kernel ``prune[name]``, sequentially, feeding pruned outputs forward.

    Each group of layers that share an input is pruned from the Hessian of inputs that went through the
    already-pruned earlier layers; its new weights are written before the next group's inputs are captured.

    Args:
        model: the model (modified in place: masks and weight updates applied).
        layers: ``{name: nn.Linear}`` to prune, in model order.
        calibration: batches run through ``loss_fn`` (no grad) to capture inputs.
        loss_fn: ``loss_fn(model, batch) -> (B,)``.
        prune: ``{name: kernel}`` for every layer (:func:`layer_kernels`).
        method: the method's name, for messages (``"sparsegpt"``, ``"alps"``).

    Returns:
        ``{name: (n_out, n_in) bool}`` keep-masks.

    Raises:
        ValueError: no calibration batches.
        PruningError: numerical failure (weights of the layers already pruned are restored first).
    """
    if len(calibration) == 0:
        raise ValueError(f"'calibration' should hold at least one batch for {method}; got none")
    masks: dict[str, Tensor] = {}
    originals: dict[str, Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        found = block_list(model, layers)
        if found is None:
            _model_groups(model, layers, calibration, loss_fn, prune, masks, originals, method)
        else:
            # Layers outside the blocks (an included head, an input projection) run whole-model groups,
            # before or after the blocks according to their place in the model's module order.
            list_name, blocks = found
            prefixes = block_prefixes(list_name, len(blocks))
            names = list(layers)
            inside = [i for i, name in enumerate(names) if name.startswith(prefixes)]
            before = {n: layers[n] for n in names[: inside[0]] if not n.startswith(prefixes)}
            after = {n: layers[n] for n in names[inside[0] :] if not n.startswith(prefixes)}
            block_layers = {names[i]: layers[names[i]] for i in inside}
            args = (calibration, loss_fn, prune, masks, originals, method)
            if before:
                _model_groups(model, before, *args)
            _run_blocks(model, found, block_layers, *args)
            if after:
                _model_groups(model, after, *args)
    except BaseException:
        with torch.no_grad():
            for name, weight in originals.items():
                layers[name].weight.copy_(weight.to(layers[name].weight.device))
        raise
    finally:
        model.train(was_training)
    return {name: masks[name] for name in layers}


def _run_model_groups(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    pattern: MaskPattern,
    block_size: int,
    damping_frac: float,
    masks: dict[str, Tensor],
    originals: dict[str, Tensor],
) -> None:
    """SparseGPT on the whole-model path only (:func:`_model_groups`), whatever blocks the model has."""
    prune = layer_kernels(sparsegpt_prune_weight, layer_patterns(pattern, layers), block_size=block_size,
                          damping_frac=damping_frac)
    _model_groups(model, layers, calibration, loss_fn, prune, masks, originals, "sparsegpt")


def _model_groups(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    prune: Mapping[str, WeightPruner],
    masks: dict[str, Tensor],
    originals: dict[str, Tensor],
    method: str,
) -> None:
    """No repeated blocks: one full calibration forward per group of layers sharing an input."""

    def run_all() -> None:
        for batch in calibration:
            loss_fn(model, batch)

    groups = _call_groups(lambda: loss_fn(model, calibration[0]), layers)
    for names in groups:
        subset = {name: layers[name] for name in names}
        hessians = _hessians(run_all, subset)
        _prune_group(names, layers, hessians, prune, masks, originals)
        logger.debug("%s: pruned %s", method, ", ".join(names))


def _run_blocks(
    model: nn.Module,
    found: tuple[str, nn.ModuleList],
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    prune: Mapping[str, WeightPruner],
    masks: dict[str, Tensor],
    originals: dict[str, Tensor],
    method: str,
) -> None:
    """Transformer blocks one at a time on cached hidden states (each block's own kwargs, e.g. masks)."""
    list_name, blocks = found
    captured = _capture_block_inputs(model, blocks, calibration, loss_fn)
    hidden = [_hidden(args, kwargs) for args, kwargs in captured[0]]
    for index, (block, prefix) in enumerate(zip(blocks, block_prefixes(list_name, len(blocks)))):
        block_layers = {name: module for name, module in layers.items() if name.startswith(prefix)}
        calls = [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(captured[index], hidden)]

        def run_all(calls: list[tuple[tuple, dict]] = calls, block: nn.Module = block) -> list[Any]:
            return [block(*args, **kwargs) for args, kwargs in calls]

        if block_layers:
            first_args, first_kwargs = calls[0]
            groups = _call_groups(lambda: block(*first_args, **first_kwargs), block_layers)
            for names in groups:
                run_to_group = functools.partial(_run_until, calls, block, block_layers[names[-1]])
                hessians = _hessians(run_to_group, {name: block_layers[name] for name in names})
                _prune_group(names, layers, hessians, prune, masks, originals)
        with torch.no_grad():
            outputs = run_all()
        hidden = [out[0] if isinstance(out, (tuple, list)) else out for out in outputs]
        logger.info("%s: block %d/%d done (%d layers)", method, index + 1, len(blocks), len(block_layers))
