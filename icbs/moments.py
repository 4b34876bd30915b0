r"""Input second moments of linear layers, streamed by forward hooks: the one place for :math:`X X^\top / N`.

The layer-wise objective (``derivatives.estimator=layerwise``), the end refit, input covariances for scoring
and SparseGPT's Hessian :math:`2 X X^\top / N` all need, for every layer, the second moment of its input rows
:math:`x_t \in \mathbb{R}^{n_{in}}` over the calibration tokens. :func:`accumulate_second_moments` adds
:math:`\sum_t x_t x_t^\top` from a forward pre-hook while the forward runs, so no activation outlives its
layer's call: memory is the model plus one block's activations plus one ``(n_in, n_in)`` sum per layer,
whatever the number of batches. Padding rows (``attention_mask == 0`` in the batch being run) are left out
of both the sum and the count. Sums live on each layer's own device (a model sharded by ``device_map`` gets
its statistics where the layer is; inputs arriving on another device are moved there) in float32, or
float64 for float64 layers (:func:`accumulation_dtype`), whatever the weights' dtype (bf16/fp16 included).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from icbs.exceptions import StatisticsError

__all__ = ["SecondMoments", "accumulate_second_moments", "accumulation_dtype", "check_finite_moment", "token_mask"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for any weight dtype, float64 for float64 weights (used by the exactness checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite_moment(moment: Tensor, layer: str, damping_key: str) -> None:
    """Raise :class:`~icbs.exceptions.StatisticsError` naming ``layer`` when ``moment`` (X X^T) holds NaN or Inf.

    No damping repairs that: the activations overflowed (a half-precision ``model.dtype``) or the data holds
    non-finite inputs. ``damping_key`` is the setting the caller's solve reads, named so the user sees which
    statistics failed.
    """
    if not bool(torch.isfinite(moment).all()):
        raise StatisticsError(
            f"the input second moment X X^T of layer {layer!r} has non-finite entries ({damping_key} cannot repair "
            "it): the activations overflow (use model.dtype: float32) or the calibration data is not finite"
        )


def token_mask(attention_mask: Tensor | None, inputs: Tensor) -> Tensor | None:
    """``(B, T)`` bool mask of real tokens when ``attention_mask`` fits the leading dims of ``inputs`` (B, T, n).

    Returns ``None`` (every row counts) without a mask, or when the inputs are not laid out per token.
    """
    if attention_mask is None or inputs.dim() < 3 or tuple(attention_mask.shape) != tuple(inputs.shape[:2]):
        return None
    return attention_mask.to(inputs.device).bool()


@dataclasses.dataclass
class SecondMoments:
    r"""Running :math:`\sum_t x_t x_t^\top` and row counts per layer.

    Attributes:
        sums: layer name -> ``(n_in, n_in)`` sum of outer products, on the layer's device.
        counts: layer name -> number of (non-padding) input rows added.
        hook_seconds: wall time spent inside the hooks (the statistics' own cost).
    """

    sums: dict[str, Tensor]
    counts: dict[str, int]
    hook_seconds: float = 0.0

    def mean(self, scale: float = 1.0, *, allow_empty: bool = False) -> dict[str, Tensor]:
        r"""``scale * sum / count`` per layer (``scale=2`` gives SparseGPT's :math:`H = 2 X X^\top / N`).

        Args:
            scale: the factor.
            allow_empty: a layer that saw no input row gets a zero matrix instead of an error.

        Raises:
            ValueError: a layer was never called in the forward (it has no inputs), unless ``allow_empty``.
        """
        result = {}
        for name, total in self.sums.items():
            if self.counts[name] == 0:
                if allow_empty:
                    result[name] = total.clone()
                    continue
                raise ValueError(f"layer {name!r} was not called in the forward; it has no inputs to collect")
            result[name] = total / self.counts[name] if scale == 1.0 else total * (scale / self.counts[name])
        return result


def accumulate_second_moments(
    layers: Mapping[str, nn.Module],
    run: Callable[[Mapping[str, Tensor]], Any],
    batches: Sequence[Mapping[str, Tensor]] = ({},),
    *,
    dtype: torch.dtype | None = None,
) -> SecondMoments:
    r"""Call ``run(batch)`` for every batch with hooks that add each layer's :math:`\sum_t x_t x_t^\top`.

    Args:
        layers: layer name -> ``nn.Linear`` (anything called with input rows ``(..., n_in)`` and a
            ``weight``); the hook reads the first positional argument (or ``input=``).
        run: runs the forward of one batch (e.g. ``lambda b: loss_fn(model, b)``); its result is ignored.
            Runs under ``torch.no_grad``.
        batches: the batches; the ``attention_mask`` of the one being run masks padding rows of inputs laid
            out ``(B, T, n_in)``. The default runs once with no mask (a closure that feeds its own inputs).
        dtype: the sums' dtype; ``None`` = :func:`accumulation_dtype` of each layer's weight.

    Returns:
        The sums and counts (call :meth:`SecondMoments.mean`).
    """
    moments = SecondMoments(
        sums={
            name: torch.zeros(
                module.weight.shape[-1], module.weight.shape[-1], device=module.weight.device,
                dtype=dtype or accumulation_dtype(module.weight.dtype),
            )
            for name, module in layers.items()
        },
        counts=dict.fromkeys(layers, 0),
    )
    current: dict[str, Tensor | None] = {"mask": None}

    def make_hook(name: str) -> Callable[..., None]:
        total = moments.sums[name]

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            inputs = (args[0] if args else kwargs["input"]).detach()
            mask = token_mask(current["mask"], inputs)
            rows = inputs[mask] if mask is not None else inputs.reshape(-1, inputs.shape[-1])
            rows = rows.to(device=total.device, dtype=total.dtype)
            total.addmm_(rows.T, rows)
            moments.counts[name] += rows.shape[0]
            moments.hook_seconds += time.perf_counter() - t0

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, module in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                run(batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments
