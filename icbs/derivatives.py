"""Gradient and block-Hessian estimators for the block problem (DESIGN.md §4).

One call of :func:`estimate_blocks` makes one pass over a calibration batch (one forward, plus one
backward unless the estimator is ``layerwise``) and returns, for every requested layer, the gradient
``g`` (n,) and the Hessian block ``H`` (n, n) of the objective with respect to the block's weight
entries. The objective is the batch mean of ``loss_fn(model, batch)`` (one loss per sample). Several
layers are served by the same pass (a "round" of the BCD driver).

Estimators:

* ``fisher``: empirical Fisher :math:`H = \\frac1N \\sum_s g_s g_s^\\top` from per-sample gradients
  :math:`g_s`, :math:`g = \\frac1N \\sum_s g_s`. For ``nn.Linear`` layers the per-sample gradient of the
  entry ``(r, c)`` is :math:`\\sum_t \\partial\\ell_s/\\partial y_{s,t,r} \\; x_{s,t,c}`, taken from a forward
  hook (the layer input ``x``) and the gradient of the summed per-sample losses with respect to the
  layer output ``y``. Only the block's rows and columns are gathered, so the cost is O(B T n) on top
  of one forward and a backward that stops at the earliest blocked layer and computes no parameter
  gradient. Any other layer with a ``weight`` falls back to ``torch.func`` (``vmap(grad(...))`` over
  samples; a plain loop over samples when vmap cannot trace the model).
* ``exact``: the true Hessian block of the mean loss by forward-over-reverse Hessian-vector products
  (``torch.func.jvp`` of ``torch.func.grad``) vmapped over the block's basis vectors; a loop of
  double-backward products when vmap cannot trace the model. For checks and small models.
* ``gradient_mean``: rank-one :math:`H = g g^\\top` with the mean gradient from the same pass as ``fisher``.
* ``layerwise``: the reconstruction objective of one linear layer,
  :math:`L(W) = \\frac1N \\|(W - W_0) X\\|_F^2` over the N (non-padding) tokens of the batch, with
  :math:`C = X X^\\top / N`: :math:`\\partial^2 L / \\partial w_{r_1 c_1} \\partial w_{r_2 c_2} =
  2 C_{c_1 c_2} [r_1 = r_2]` and :math:`g = 2 ((W - W_0) C)` at the block entries. ``X`` are the layer's
  inputs in a forward of the *current* (pruned) model, so the objective measures how far the layer's
  output has drifted from that of the dense weights on the inputs it sees now. No backward pass; the
  caller may pass ``layer_inputs`` (``C`` per layer, see :func:`collect_layer_inputs`) to skip the
  forward as well. This is exact for that objective and is the scalable path for large models.

Everything is computed on the device of each layer (a model sharded with ``model.device_map`` keeps every
layer's statistics where the layer is) with float32 accumulation whatever the weights' dtype (bf16/fp16
included; float64 for float64 weights), and returned as float64 numpy arrays on the CPU. The layer input
moments ``C`` come from :mod:`icbs.moments` (streamed by hooks; padding tokens left out). Per-sample gradients from one batched backward are exact as long as samples do not
interact in the forward (no batch norm in training mode); a layer output modified in place after the
layer (``y += ...``) would also break the hook-based gradients, which no supported model does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from icbs.batching import batch_size, batch_to, index_batch
from icbs.exceptions import NonFiniteDerivativeError
from icbs.moments import accumulate_second_moments, accumulation_dtype

__all__ = ["ESTIMATORS", "BlockEstimate", "estimate_blocks", "per_sample_gradients", "collect_layer_inputs"]

logger = logging.getLogger(__name__)

ESTIMATORS = ("fisher", "exact", "gradient_mean", "layerwise")

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]

# Elements of one (B, T, chunk) temporary when gathering per-sample gradients; bounds memory on
# long windows without slowing small ones.
_GATHER_ELEMENTS = 1 << 24
# Basis vectors pushed through one vmapped Hessian-vector product in the ``exact`` estimator.
_HVP_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class BlockEstimate:
    """Derivatives of the objective with respect to one block's weight entries.

    Attributes:
        g: (n,) float64 gradient of the batch-mean loss at the current weights.
        H: (n, n) float64 symmetric Hessian estimate.
        loss: batch mean of ``loss_fn`` at the current weights (NaN for ``layerwise`` when
            ``layer_inputs`` made the forward unnecessary).
        timings: seconds per phase. ``forward``/``backward``/``covariance`` are the shared pass of the
            call (the same numbers in every estimate of one call); ``gather`` (per-sample gradient
            gathering) and ``hessian`` (building g and H) are this block's own; ``total`` is the
            whole call.
        estimator: the estimator's name.
        n_samples: number of samples in the batch.
        info: how the estimate was made (``method``: ``hooks``, ``vmap``, ``loop``, ``hvp``,
            ``double_backward``, ``covariance``), including any fallback taken; ``index``: the block's flat
            indices (CPU, long).
    """

    g: np.ndarray
    H: np.ndarray
    loss: float
    timings: dict[str, float]
    estimator: str = "fisher"
    n_samples: int = 0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Block:
    name: str
    module: nn.Module
    param_key: str  # "model.<qualified name>.weight" inside _LossModule
    idx: Tensor  # (n,) long, on the weight's device
    rows: Tensor  # (n,) long, only meaningful for 2-d weights
    cols: Tensor
    # Called with the layer's (n_out, n_in) mean gradient from the pass; returns the flat indices.
    choose: Callable[[Tensor], Tensor] | None = None


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``torch.func.functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self._loss_fn(self.model, batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _check_blocks(model: nn.Module, blocks: Mapping[str, tuple[nn.Module, Tensor]]) -> list[_Block]:
    if not isinstance(blocks, Mapping) or len(blocks) == 0:
        raise ValueError(f"'blocks' should map layer names to (module, flat indices); got {blocks!r}")
    qualified = {id(module): name for name, module in model.named_modules()}
    result = []
    for name, item in blocks.items():
        try:
            module, idx = item
        except (TypeError, ValueError) as err:
            raise ValueError(f"'blocks[{name!r}]' should be a (module, flat indices) pair; got {item!r}") from err
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Module) or not isinstance(weight, Tensor):
            raise TypeError(f"'blocks[{name!r}]' should hold a module with a 'weight' tensor; got {type(module).__name__}")
        if id(module) not in qualified:
            raise ValueError(f"'blocks[{name!r}]': the module is not part of the model")
        if callable(idx):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"'blocks[{name!r}]': choosing the block from the pass needs an nn.Linear layer")
            result.append(_Block(name=str(name), module=module, param_key="", idx=torch.empty(0, dtype=torch.long),
                                 rows=torch.empty(0), cols=torch.empty(0), choose=idx))
            continue
        idx = torch.as_tensor(idx)
        if idx.dim() != 1 or idx.dtype in (torch.bool,) or idx.dtype.is_floating_point:
            raise ValueError(f"'blocks[{name!r}]' indices should be a 1-d integer tensor; got {tuple(idx.shape)} {idx.dtype}")
        block = _Block(
            name=str(name),
            module=module,
            param_key=f"model.{qualified[id(module)]}.weight" if qualified[id(module)] else "model.weight",
            idx=idx,
            rows=idx,
            cols=idx,
        )
        _set_index(block, idx)
        result.append(block)
    return result


def _set_index(block: _Block, idx: Tensor) -> None:
    """Check ``idx`` (1-d long, distinct, in range) and set the block's indices, rows and columns."""
    weight = block.module.weight
    idx = torch.as_tensor(idx).to(device=weight.device, dtype=torch.long)
    numel = weight.numel()
    if idx.dim() != 1:
        raise ValueError(f"'blocks[{block.name!r}]' indices should be a 1-d integer tensor; got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise ValueError(
            f"'blocks[{block.name!r}]' indices should be flat indices in [0, {numel - 1}]; "
            f"got values in [{int(idx.min())}, {int(idx.max())}]"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"'blocks[{block.name!r}]' indices should not repeat a weight")
    n_in = weight.shape[-1] if weight.dim() >= 2 else 1
    block.idx = idx
    block.rows = torch.div(idx, n_in, rounding_mode="floor")
    block.cols = idx % n_in


def _to_numpy(name: str, estimator: str, g: Tensor, H: Tensor) -> tuple[np.ndarray, np.ndarray]:
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(H).all())):
        what = "gradient" if not bool(torch.isfinite(g).all()) else "Hessian"
        raise NonFiniteDerivativeError(
            f"the {what} estimated by derivatives.estimator={estimator!r} for layer {name!r} holds NaN/Inf; "
            "check the calibration data and the model's dtype (try model.dtype=float32)"
        )
    g64 = g.detach().to(device="cpu", dtype=torch.float64).numpy()
    H64 = H.detach().to(device="cpu", dtype=torch.float64)
    H64 = 0.5 * (H64 + H64.T)
    return g64, H64.numpy()


def _check_losses(losses: Any, n_samples: int) -> Tensor:
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (n_samples,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"'loss_fn' should return one loss per sample, shape ({n_samples},); got {got}")
    return losses


def estimate_blocks(
    estimator: str,
    model: nn.Module,
    blocks: Mapping[str, tuple[nn.Module, Tensor]],
    batch: Mapping[str, Tensor],
    loss_fn: LossFn,
    *,
    layer_inputs: Mapping[str, Tensor] | None = None,
    reference_weights: Mapping[str, Tensor] | None = None,
) -> dict[str, BlockEstimate]:
    """Estimate g and H for blocks in one or more layers from one pass over ``batch``.

    Args:
        estimator: ``"fisher"``, ``"exact"``, ``"gradient_mean"`` or ``"layerwise"`` (see the module docstring).
        model: the model with its current (masked) weights; left unchanged (no ``.grad`` is written).
        blocks: layer name -> ``(module, flat_idx)``; ``flat_idx`` is a 1-d long tensor of ``n`` distinct
            row-major indices into ``module.weight`` (``row * n_in + col`` for a linear layer). For an
            ``nn.Linear`` layer with ``fisher``/``gradient_mean``, ``flat_idx`` may instead be a callable
            ``choose(mean_grad) -> flat_idx``: it is called after the backward with the layer's (n_out, n_in)
            mean gradient from the same pass, so block selection by gradient costs no second pass.
        batch: the calibration batch (``dict[str, Tensor]``, leading dimension B); moved to the
            model's device.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses; the objective is their mean.
        layer_inputs: ``layerwise`` only: layer name -> (n_in, n_in) ``X X^T / N`` of the layer's inputs;
            layers given here need no forward.
        reference_weights: ``layerwise`` only: layer name -> dense (original) weight ``W0`` (n_out, n_in).

    Returns:
        Layer name -> :class:`BlockEstimate`, in the order of ``blocks``; a layer whose ``choose`` picked
        no weight is left out. ``info["index"]`` holds the block's flat indices (CPU, long).

    Raises:
        ValueError: unknown estimator, malformed blocks or batch, ``loss_fn`` not returning (B,), or
            missing ``reference_weights`` for ``layerwise``.
        NonFiniteDerivativeError: g or H of some layer holds NaN/Inf (names the layer and estimator).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"'estimator' should be one of {', '.join(map(repr, ESTIMATORS))}; got {estimator!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' should be an nn.Module; got {type(model).__name__}")
    checked = _check_blocks(model, blocks)
    if estimator in ("layerwise", "exact") and any(block.choose is not None for block in checked):
        raise ValueError(f"choosing blocks from the pass needs derivatives.estimator 'fisher' or 'gradient_mean'; got {estimator!r}")
    device = _model_device(model)
    batch = batch_to(batch, device)
    n_samples = batch_size(batch)
    if estimator == "layerwise":
        return _estimate_layerwise(model, checked, batch, loss_fn, layer_inputs, reference_weights, device)
    if estimator == "exact":
        return _estimate_exact(model, checked, batch, loss_fn, device)
    return _estimate_first_order(model, checked, batch, loss_fn, estimator, n_samples, device)


# ---------------------------------------------------------------------------------------- fisher


def _gather_linear(
    calls: list[tuple[Tensor, Tensor]], block: _Block, n_samples: int
) -> Tensor:
    """Per-sample gradients (B, n) float32 of the block entries of one linear layer.

    ``calls`` holds (input (B, ..., n_in), output gradient (B, ..., n_out)) for every call of the layer
    in the forward; the entry (r, c) of sample s gets sum_t gout[s, t, r] * x[s, t, c].
    """
    n = block.idx.numel()
    acc = accumulation_dtype(block.module.weight.dtype)
    result = torch.zeros(n_samples, n, dtype=acc, device=block.idx.device)
    for inputs, grad_out in calls:
        if inputs.shape[0] % n_samples:
            raise ValueError(
                f"layer {block.name!r} saw an input of shape {tuple(inputs.shape)} whose leading dimension "
                f"is not a multiple of the batch size {n_samples}; per-sample gradients need it"
            )
        x = inputs.reshape(n_samples, -1, inputs.shape[-1])
        gout = grad_out.reshape(n_samples, -1, grad_out.shape[-1])
        step = max(1, _GATHER_ELEMENTS // max(1, x.shape[0] * x.shape[1]))
        for start in range(0, n, step):
            rows = block.rows[start : start + step]
            cols = block.cols[start : start + step]
            picked = gout.index_select(2, rows).to(acc) * x.index_select(2, cols).to(acc)
            result[:, start : start + step] += picked.sum(dim=1)
    return result


def _per_sample_generic(
    model: nn.Module, blocks: list[_Block], batch: dict[str, Tensor], loss_fn: LossFn, n_samples: int
) -> tuple[dict[str, Tensor], Tensor, str]:
    """Per-sample gradients (B, n) of other layers' block entries by torch.func, else a loop."""
    wrapper = _LossModule(model, loss_fn)
    params = {block.param_key: block.module.weight.detach() for block in blocks}

    def one_sample(weights: dict[str, Tensor], sample: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        single = {key: value.unsqueeze(0) for key, value in sample.items()}
        loss = torch.func.functional_call(wrapper, weights, (single,)).reshape(-1)[0]
        return loss, loss.detach()

    try:
        grads, losses = torch.func.vmap(torch.func.grad(one_sample, has_aux=True), in_dims=(None, 0))(params, batch)
        per_sample = {
            block.name: grads[block.param_key]
            .reshape(n_samples, -1)
            .index_select(1, block.idx)
            .to(accumulation_dtype(block.module.weight.dtype))
            for block in blocks
        }
        return per_sample, losses.detach(), "vmap"
    except (RuntimeError, NotImplementedError) as err:
        logger.warning("per-sample gradients by torch.func.vmap failed (%s); looping over the %d samples", err, n_samples)
    weights = [block.module.weight for block in blocks]
    flags = [w.requires_grad for w in weights]
    rows: dict[str, list[Tensor]] = {block.name: [] for block in blocks}
    losses_list = []
    try:
        for w in weights:
            w.requires_grad_(True)
        for s in range(n_samples):
            with torch.enable_grad():
                loss = _check_losses(loss_fn(model, index_batch(batch, s)), 1)[0]
                grads_s = torch.autograd.grad(loss, weights, allow_unused=True)
            losses_list.append(loss.detach())
            for block, grad_w, w in zip(blocks, grads_s, weights):
                flat = torch.zeros_like(w).reshape(-1) if grad_w is None else grad_w.reshape(-1)
                rows[block.name].append(flat.index_select(0, block.idx).to(accumulation_dtype(w.dtype)))
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return {name: torch.stack(r) for name, r in rows.items()}, torch.stack(losses_list), "loop"


@dataclasses.dataclass
class _PerSample:
    grads: dict[str, Tensor]  # layer name -> (B, n)
    losses: Tensor  # (B,)
    timings: dict[str, float]  # shared forward/backward
    gather: dict[str, float]  # per layer
    methods: dict[str, str]  # per layer


def _hooked_pass(
    model: nn.Module, linear: list[_Block], batch: dict[str, Tensor], loss_fn: LossFn, device: torch.device,
    result: _PerSample,
) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], tuple[Tensor | None, ...], Tensor]:
    """The forward + backward of the linear blocks: each call's inputs and output gradient, and the losses."""
    n_samples = batch_size(batch)
    t_start = time.perf_counter()
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {b.name: [] for b in linear}
    handles = []
    flags = [b.module.weight.requires_grad for b in linear]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
            inputs = args[0] if args else kwargs["input"]
            # A sharded model (device_map) may hand a layer inputs from another device; its output is
            # on the layer's own device, where the gathering happens.
            captured[name].append((inputs.detach().to(output.device), output))

        return hook

    # Only the blocked weights require grad during the pass: no graph (and no saved activation) is built
    # before the earliest blocked layer, so memory is the model plus the activations from there on.
    blocked = {id(b.module.weight) for b in linear}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in blocked]
    try:
        for param in frozen:
            param.requires_grad_(False)
        for block in linear:
            # The weight must require grad so the layer output joins the graph; autograd.grad below
            # asks only for output gradients, so no weight gradient is ever computed.
            block.module.weight.requires_grad_(True)
            handles.append(block.module.register_forward_hook(make_hook(block.name), with_kwargs=True))
        with torch.enable_grad():
            losses = _check_losses(loss_fn(model, batch), n_samples)
            _sync(device)
            t_forward = time.perf_counter()
            result.timings["forward"] = t_forward - t_start
            outputs = [out for b in linear for _, out in captured[b.name]]
            # Gradient of the SUM of per-sample losses: the output gradient of sample s is that of
            # its own loss, since samples do not interact in the forward.
            if losses.requires_grad:
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            else:  # no blocked layer reaches the loss: every output gradient is zero
                grads = tuple(None for _ in outputs)
        _sync(device)
        result.timings["backward"] = time.perf_counter() - t_forward
    finally:
        for param in frozen:
            param.requires_grad_(True)
        for handle in handles:
            handle.remove()
        for block, flag in zip(linear, flags):
            block.module.weight.requires_grad_(flag)
    return captured, grads, losses


def _gather_hooked(
    linear: list[_Block], captured: dict[str, list[tuple[Tensor, Tensor]]], grads: tuple[Tensor | None, ...],
    n_samples: int, device: torch.device, result: _PerSample,
) -> None:
    """Per-sample gradients of each linear block from its calls' inputs and output gradients (choosing it first)."""
    position = 0
    for block in linear:
        t0 = time.perf_counter()
        calls = []
        for inputs, out in captured[block.name]:
            grad_out = grads[position]
            position += 1
            calls.append((inputs, torch.zeros_like(out) if grad_out is None else grad_out))
        if block.choose is not None:
            # The same pass serves block selection: the layer's mean gradient is sum_t gout^T x / B.
            acc = accumulation_dtype(block.module.weight.dtype)
            mean_grad = sum(
                gout.reshape(-1, gout.shape[-1]).to(acc).T @ x.reshape(-1, x.shape[-1]).to(acc)
                for x, gout in calls
            ) / n_samples
            if not bool(torch.isfinite(mean_grad).all()):
                raise NonFiniteDerivativeError(
                    f"the gradient of layer {block.name!r} holds NaN/Inf; check loss_fn and the calibration data"
                )
            _set_index(block, block.choose(mean_grad))
            if block.idx.numel() == 0:
                result.methods[block.name] = "empty"
                result.gather[block.name] = time.perf_counter() - t0
                continue
        result.grads[block.name] = _gather_linear(calls, block, n_samples)
        _sync(device)
        result.gather[block.name] = time.perf_counter() - t0
        result.methods[block.name] = "hooks"


def _per_sample(
    model: nn.Module, blocks: list[_Block], batch: dict[str, Tensor], loss_fn: LossFn, device: torch.device
) -> _PerSample:
    """One batched forward + backward; per-sample gradients of every block's entries."""
    n_samples = batch_size(batch)
    linear = [b for b in blocks if isinstance(b.module, nn.Linear)]
    generic = [b for b in blocks if not isinstance(b.module, nn.Linear)]
    result = _PerSample(grads={}, losses=torch.empty(0), timings={"forward": 0.0, "backward": 0.0}, gather={}, methods={})
    losses: Tensor | None = None
    if linear:
        captured, grads, losses = _hooked_pass(model, linear, batch, loss_fn, device, result)
        _gather_hooked(linear, captured, grads, n_samples, device, result)
        del captured, grads
    if generic:
        t0 = time.perf_counter()
        generic_grads, generic_losses, method = _per_sample_generic(model, generic, batch, loss_fn, n_samples)
        _sync(device)
        result.timings["backward"] += time.perf_counter() - t0
        result.grads.update(generic_grads)
        for block in generic:
            result.gather[block.name] = 0.0
            result.methods[block.name] = method
        if losses is None:
            losses = generic_losses
    result.losses = losses.detach() if losses is not None else torch.empty(0)
    return result


def per_sample_gradients(
    model: nn.Module,
    blocks: Mapping[str, tuple[nn.Module, Tensor]],
    batch: Mapping[str, Tensor],
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Per-sample gradients of the block entries, from one batched forward and backward.

    The machinery behind ``fisher`` and ``gradient_mean`` (see the module docstring), exposed for
    checks and for callers that want the raw gradients.

    Args:
        model: the model; left unchanged (no ``.grad`` is written).
        blocks: layer name -> ``(module, flat_idx)`` as in :func:`estimate_blocks`.
        batch: B samples.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses.

    Returns:
        Layer name -> (B, n) tensor on the model's device (float32; float64 for float64 weights):
        row s is the gradient of sample s's loss with respect to the block entries.
    """
    checked = _check_blocks(model, blocks)
    device = _model_device(model)
    return _per_sample(model, checked, batch_to(batch, device), loss_fn, device).grads


def _estimate_first_order(
    model: nn.Module,
    blocks: list[_Block],
    batch: dict[str, Tensor],
    loss_fn: LossFn,
    estimator: str,
    n_samples: int,
    device: torch.device,
) -> dict[str, BlockEstimate]:
    """``fisher`` and ``gradient_mean``: per-sample gradients from one batched forward + backward."""
    t_start = time.perf_counter()
    per_sample = _per_sample(model, blocks, batch, loss_fn, device)
    loss = float(per_sample.losses.double().mean())
    hessian_time: dict[str, float] = {}
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    blocks = [block for block in blocks if block.name in per_sample.grads]
    for block in blocks:
        t0 = time.perf_counter()
        G = per_sample.grads[block.name]  # (B, n)
        g = G.mean(dim=0)
        # Empirical Fisher (1/N) sum_s g_s g_s^T, or the rank-one outer product of the mean gradient.
        H = (G.T @ G) / n_samples if estimator == "fisher" else torch.outer(g, g)
        results[block.name] = _to_numpy(block.name, estimator, g, H)
        _sync(device)
        hessian_time[block.name] = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    return {
        block.name: BlockEstimate(
            g=results[block.name][0],
            H=results[block.name][1],
            loss=loss,
            timings={
                **per_sample.timings,
                "gather": per_sample.gather[block.name],
                "hessian": hessian_time[block.name],
                "total": total,
            },
            estimator=estimator,
            n_samples=n_samples,
            info={"method": per_sample.methods[block.name], "index": block.idx.detach().cpu()},
        )
        for block in blocks
    }

# ---------------------------------------------------------------------------------------- exact


def _math_attention() -> contextlib.AbstractContextManager[None]:
    """Force the math SDPA kernel: the fused CPU/GPU kernels have no forward-mode AD or double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no backend selection, keep the default
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _gradient_and_hessian(objective: Callable[[Tensor], Tensor], v0: Tensor) -> tuple[Tensor, Tensor, Tensor, str]:
    """Gradient (n,), Hessian (n, n), value and method of a scalar function at ``v0``.

    Forward-over-reverse Hessian-vector products vmapped over the basis vectors; a double-backward
    loop when torch.func cannot trace the function.
    """
    try:
        g_full, loss_t = torch.func.grad_and_value(objective)(v0)
        grad_fn = torch.func.grad(objective)

        def hvp(direction: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (v0,), (direction,))[1]

        basis = torch.eye(v0.numel(), dtype=v0.dtype, device=v0.device)
        H_full = torch.func.vmap(hvp, chunk_size=_HVP_CHUNK)(basis)
        return g_full.detach(), H_full.detach(), loss_t.detach(), "hvp"
    except (RuntimeError, NotImplementedError) as err:
        logger.warning("Hessian-vector products by torch.func failed (%s); using a double-backward loop", err)
    v = v0.clone().requires_grad_(True)
    with torch.enable_grad():
        loss_t = objective(v)
        (g_full,) = torch.autograd.grad(loss_t, v, create_graph=True)
        rows = [torch.autograd.grad(g_full[i], v, retain_graph=True)[0] for i in range(v.numel())]
    H_full = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=v0.dtype, device=v0.device)
    return g_full.detach(), H_full.detach(), loss_t.detach(), "double_backward"


def _estimate_exact(
    model: nn.Module, blocks: list[_Block], batch: dict[str, Tensor], loss_fn: LossFn, device: torch.device
) -> dict[str, BlockEstimate]:
    """True gradient and Hessian blocks of the batch-mean loss by Hessian-vector products."""
    t_start = time.perf_counter()
    n_samples = batch_size(batch)
    wrapper = _LossModule(model, loss_fn)
    sizes = [b.idx.numel() for b in blocks]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n_total = int(offsets[-1])
    base = {b.param_key: b.module.weight.detach() for b in blocks}

    def objective(v: Tensor) -> Tensor:
        # W(v) = W + scatter(v) at the block entries; derivatives at v = 0 are those w.r.t. the entries.
        params = {}
        for block, start, stop in zip(blocks, offsets[:-1], offsets[1:]):
            weight = base[block.param_key]
            flat = weight.reshape(-1).index_add(0, block.idx, v[start:stop].to(device=weight.device, dtype=weight.dtype))
            params[block.param_key] = flat.reshape(weight.shape)
        losses = _check_losses(torch.func.functional_call(wrapper, params, (batch,)), n_samples)
        return losses.to(acc).mean()

    acc = torch.float64 if any(b.module.weight.dtype == torch.float64 for b in blocks) else torch.float32
    v0 = torch.zeros(n_total, dtype=acc, device=device)
    with _math_attention():
        g_full, H_full, loss_t, method = _gradient_and_hessian(objective, v0)
    _sync(device)
    elapsed = time.perf_counter() - t_start
    loss = float(loss_t.detach())
    estimates = {}
    for block, start, stop in zip(blocks, offsets[:-1], offsets[1:]):
        g, H = _to_numpy(block.name, "exact", g_full[start:stop], H_full[start:stop, start:stop])
        estimates[block.name] = BlockEstimate(
            g=g,
            H=H,
            loss=loss,
            timings={"forward": 0.0, "backward": elapsed, "gather": 0.0, "hessian": 0.0, "total": elapsed},
            estimator="exact",
            n_samples=n_samples,
            info={"method": method, "index": block.idx.detach().cpu()},
        )
    return estimates


# ---------------------------------------------------------------------------------------- layerwise


def collect_layer_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: list[Mapping[str, Tensor]] | Mapping[str, Tensor],
    loss_fn: LossFn | None = None,
) -> dict[str, Tensor]:
    """Second moment ``C = X X^T / N`` of the inputs of linear layers over one or more batches.

    Padding tokens (``attention_mask == 0``) are left out. The result can be cached and passed to
    :func:`estimate_blocks` as ``layer_inputs`` for the ``layerwise`` estimator.

    Args:
        model: the model (its current weights are used; nothing is modified).
        layers: layer name -> ``nn.Linear``.
        batches: one batch or a list of them.
        loss_fn: called as ``loss_fn(model, batch)`` to run the forward; ``None`` calls ``model(**batch)``.

    Returns:
        Layer name -> (n_in, n_in) float32 tensor on the layer's device.
    """
    covariance, _, _ = _accumulate_inputs(model, layers, [batches] if isinstance(batches, Mapping) else batches, loss_fn)
    return covariance


def _accumulate_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: list[Mapping[str, Tensor]],
    loss_fn: LossFn | None,
) -> tuple[dict[str, Tensor], float, float]:
    """Run forwards with hooks; return (C per layer, mean loss or NaN, seconds spent in the hooks)."""
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"layer {name!r} should be an nn.Linear for the layer-wise objective; got {type(module).__name__}"
            )
    device = _model_device(model)
    totals = {"loss": 0.0, "samples": 0}

    def run(batch: Mapping[str, Tensor]) -> None:
        if loss_fn is None:
            model(**batch)
            return
        n = batch_size(batch)
        losses = _check_losses(loss_fn(model, dict(batch)), n)
        totals["loss"] += float(losses.float().sum())
        totals["samples"] += n

    moments = accumulate_second_moments(layers, run, [batch_to(batch, device) for batch in batches])
    loss = totals["loss"] / totals["samples"] if totals["samples"] else float("nan")
    return moments.mean(), loss, moments.hook_seconds


def _estimate_layerwise(
    model: nn.Module,
    blocks: list[_Block],
    batch: dict[str, Tensor],
    loss_fn: LossFn,
    layer_inputs: Mapping[str, Tensor] | None,
    reference_weights: Mapping[str, Tensor] | None,
    device: torch.device,
) -> dict[str, BlockEstimate]:
    """Derivatives of the layer-wise reconstruction objective ``(1/N) ||(W - W0) X||^2``."""
    t_start = time.perf_counter()
    n_samples = batch_size(batch)
    reference_weights = reference_weights or {}
    layer_inputs = dict(layer_inputs or {})
    for block in blocks:
        if not isinstance(block.module, nn.Linear):
            raise TypeError(
                f"derivatives.estimator='layerwise' needs nn.Linear layers; {block.name!r} is {type(block.module).__name__}"
            )
        ref = reference_weights.get(block.name)
        if ref is None:
            raise ValueError(
                f"'reference_weights' should give the dense weight of every layer for estimator 'layerwise'; "
                f"missing {block.name!r}"
            )
        if tuple(ref.shape) != tuple(block.module.weight.shape):
            raise ValueError(
                f"'reference_weights[{block.name!r}]' should have shape {tuple(block.module.weight.shape)}; "
                f"got {tuple(ref.shape)}"
            )
        given = layer_inputs.get(block.name)
        n_in = block.module.in_features
        if given is not None and tuple(given.shape) != (n_in, n_in):
            raise ValueError(f"'layer_inputs[{block.name!r}]' should have shape ({n_in}, {n_in}); got {tuple(given.shape)}")
    missing = {b.name: b.module for b in blocks if b.name not in layer_inputs}
    loss, forward_time, covariance_time = float("nan"), 0.0, 0.0
    if missing:
        collected, loss, covariance_time = _accumulate_inputs(model, missing, [batch], loss_fn)
        _sync(device)
        forward_time = time.perf_counter() - t_start - covariance_time
        layer_inputs.update(collected)
    estimates = {}
    for block in blocks:
        t0 = time.perf_counter()
        weight = block.module.weight.detach()
        acc = accumulation_dtype(weight.dtype)
        C = layer_inputs[block.name].to(device=weight.device, dtype=acc)
        ref = reference_weights[block.name].detach().to(device=weight.device, dtype=acc)
        deviation = (weight.to(acc) - ref).index_select(0, block.rows)  # (n, n_in): row r_i of W - W0
        # g_i = 2 sum_j (W - W0)[r_i, j] C[j, c_i]
        g = 2.0 * (deviation * C.index_select(1, block.cols).T).sum(dim=1)
        # H_ij = 2 C[c_i, c_j] when r_i == r_j (rows of W do not interact in ||(W - W0) X||^2).
        same_row = block.rows[:, None] == block.rows[None, :]
        H = 2.0 * C.index_select(0, block.cols).index_select(1, block.cols) * same_row
        g64, H64 = _to_numpy(block.name, "layerwise", g, H)
        _sync(device)
        estimates[block.name] = BlockEstimate(
            g=g64,
            H=H64,
            loss=loss,
            timings={"forward": forward_time, "covariance": covariance_time, "backward": 0.0, "gather": 0.0,
                     "hessian": time.perf_counter() - t0, "total": 0.0},
            estimator="layerwise",
            n_samples=n_samples,
            info={"method": "covariance", "cached_inputs": block.name not in missing, "index": block.idx.detach().cpu()},
        )
    total = time.perf_counter() - t_start
    for estimate in estimates.values():
        estimate.timings["total"] = total
    return estimates
