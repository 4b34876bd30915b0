r"""ALPS (Meng et al., 2024): one-shot pruning by ADMM on the layer reconstruction, then PCG on the kept weights.

The layer problem (paper §3.1). For a linear layer with dense weight :math:`W \in \mathbb{R}^{n_{out} \times n_{in}}`
and damped input second moment :math:`H = 2 X X^\top / N + \delta I` (``δ = damping_frac * mean(diag H)``, as in
SparseGPT), find

.. math:: \min_{\hat W} \; f(\hat W) = \tfrac12 \operatorname{tr}\big((\hat W - W) H (\hat W - W)^\top\big)
          \quad \text{s.t. } \operatorname{supp}(\hat W) \in \mathcal{C},

where :math:`\mathcal{C}` holds the pattern's exact counts (:class:`~icbs.state.MaskPattern`: the layer, each row, or
each group of ``m`` consecutive inputs of a row keeps ``group_target`` weights).

Support by ADMM (paper §3.2). Split :math:`\hat W = D` with :math:`D` restricted to :math:`\mathcal{C}`; with dual
:math:`V` and penalty :math:`\rho` the augmented Lagrangian :math:`f(\hat W) + \langle V, \hat W - D\rangle +
\tfrac\rho2 \|\hat W - D\|_F^2` is minimised alternately:

.. math:: \hat W \leftarrow (W H - V + \rho D)(H + \rho I)^{-1}, \qquad
          D \leftarrow P_{\mathcal{C}}(\hat W + V/\rho), \qquad V \leftarrow V + \rho(\hat W - D),

where :math:`P_{\mathcal{C}}` keeps the largest magnitudes of every group (the exact ℓ0 projection for that
pattern). The penalty grows while the support still moves: after each iteration, with ``s`` the number of
weights whose kept/pruned status changed and ``k`` the kept count, :math:`\rho` is multiplied by 1.3 when
``s ≥ 0.1 k``, by 1.2 when ``s ≥ 0.005 k``, by 1.1 when ``s ≥ 1``, and kept when nothing changed; ADMM ends after
``admm_iters`` iterations or when the support has not moved for :data:`_STABLE_ITERS` iterations. A small
:math:`\rho` lets the support follow the reconstruction gradient (:math:`V` tends to :math:`-\nabla f`, so
:math:`\hat W + V/\rho` is a gradient step); a large one freezes it.

ADMM runs in column-scaled coordinates, :math:`\tilde W = W S`, :math:`\tilde H = S^{-1} H S^{-1}` with
:math:`S = \operatorname{diag}(H)^{1/2}`. This leaves the objective, the supports and the pattern unchanged and
makes the penalty :math:`\rho\|\cdot\|^2` a diagonally weighted one: its first projection then ranks
:math:`|w_{ij}| \|x_j\|` (Wanda's score) instead of :math:`|w_{ij}|`, which matters for inputs of very different
scales (outlier features), and one :math:`\rho_0` (``rho_init``, relative to the unit diagonal) fits every layer.

Values by PCG (paper §3.3). With the support :math:`M` fixed, :math:`f` is minimised over the kept weights by
conjugate gradients on the normal equations :math:`(\hat W H) \odot M = (W H) \odot M`, one independent system
per row (a step size per row), Jacobi-preconditioned and warm-started from :math:`D` (:func:`pcg_refit`).

Iteration counts. Each ADMM iteration costs one ``(n_out, n_in) x (n_in, n_in)`` product, plus a Cholesky
inverse of :math:`\tilde H + \rho I` when :math:`\rho` changed; each PCG iteration one product. The defaults,
``admm_iters=10`` and ``pcg_iters=5``, keep a whole small LLM within a few CPU minutes: with :math:`\rho`
updated after every iteration the support has settled up to a small fraction of a percent after ten, and
the warm-started PCG has then converged to within the noise of the layer error. Raise them on a GPU.

:func:`alps_prune_weight` is the per-layer kernel; :func:`run_alps` prunes a model sequentially through the
driver shared with SparseGPT (:func:`icbs.baselines.sparsegpt.run_sequential`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from icbs.baselines.sparsegpt import layer_kernels, run_sequential
from icbs.exceptions import PruningError, StatisticsError
from icbs.moments import check_finite_moment
from icbs.state import MaskPattern, layer_patterns

__all__ = ["alps_prune_weight", "run_alps", "pcg_refit", "project_to_pattern"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]

_STABLE_ITERS = 3
"""ADMM stops early once the support has not changed for this many consecutive iterations."""

_RHO_STEPS = ((0.1, 1.3), (0.005, 1.2))
"""``(fraction of the kept count that changed, growth factor)``, checked in order; any change at all: 1.1."""


def project_to_pattern(values: Tensor, pattern: MaskPattern) -> Tensor:
    """Keep-mask of the largest ``|values|`` with exactly the pattern's count in every group.

    Args:
        values: ``(n_out, n_in)`` float tensor.
        pattern: the mask pattern (its groups: the layer, each row, or ``m`` consecutive inputs of a row).

    Returns:
        ``(n_out, n_in)`` bool keep-mask (ties broken by ``torch.topk``).
    """
    shape = (int(values.shape[0]), int(values.shape[1]))
    groups = values.abs().reshape(-1, pattern.group_length(shape))
    keep = torch.topk(groups, pattern.group_target(shape), dim=1, sorted=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True).view(shape)


def pcg_refit(
    weight: Tensor,
    hessian: Tensor,
    keep_mask: Tensor,
    *,
    start: Tensor | None = None,
    max_iters: int = 50,
    rel_tol: float = 1e-6,
) -> Tensor:
    r"""Least-squares values of the kept weights: :math:`\arg\min \operatorname{tr}((\hat W - W) H (\hat W - W)^\top)`
    over :math:`\hat W` that are zero off ``keep_mask`` (ALPS §3.3).

    Every row is its own system :math:`H_{SS} \hat w_S = (w H)_S` (``S`` its kept inputs), solved by conjugate
    gradients with the Jacobi preconditioner, all rows at once with a step size per row.

    Args:
        weight: ``(n_out, n_in)`` float32 target (the dense weight).
        hessian: ``(n_in, n_in)`` float32 symmetric positive (semi-)definite matrix, damped as the caller wants.
        keep_mask: ``(n_out, n_in)`` bool.
        start: ``(n_out, n_in)`` warm start (masked here); ``None`` starts from ``weight * keep_mask``.
        max_iters: at most this many CG iterations (exact after ``max |S|`` in exact arithmetic).
        rel_tol: stop once every row's preconditioned residual norm² is below ``rel_tol²`` times its start.

    Returns:
        ``(n_out, n_in)`` float32, exactly 0 off ``keep_mask``.
    """
    keep = keep_mask.to(weight.dtype)
    x = (weight if start is None else start) * keep
    diag = torch.diag(hessian)
    precond = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))
    residual = (weight - x) @ hessian * keep
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(dim=1, keepdim=True)
    limit = rz * rel_tol**2
    for _ in range(max_iters):
        if bool((rz <= limit).all()):
            break
        h_dir = direction @ hessian * keep
        curvature = (direction * h_dir).sum(dim=1, keepdim=True)
        # Rows already solved (zero residual, zero direction) take a zero step instead of 0/0.
        step = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(rz))
        x = x + step * direction
        residual = residual - step * h_dir
        z = residual * precond
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        direction = z + torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(rz)) * direction
        rz = rz_next
    return x


def alps_prune_weight(
    weight: Tensor,
    hessian: Tensor,
    pattern: MaskPattern,
    *,
    damping_frac: float = 0.01,
    admm_iters: int = 10,
    pcg_iters: int = 5,
    rho_init: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Prune one weight matrix with ALPS (ADMM support, then PCG values).

    Args:
        weight: ``(n_out, n_in)`` dense weight (any float dtype; the math runs in float32 on its device).
        hessian: ``(n_in, n_in)`` ``2 X X^T / N`` of the layer's inputs.
        pattern: the mask pattern (``unstructured``, ``per_output`` or ``nm``) and density.
        damping_frac: ``H += damping_frac * mean(diag H) * I`` (SparseGPT's semantics).
        admm_iters: at most this many ADMM iterations.
        pcg_iters: at most this many PCG iterations on the final support.
        rho_init: the first penalty, relative to the unit diagonal of the scaled Hessian.

    Returns:
        ``(new_weight (n_out, n_in) float32, keep_mask (n_out, n_in) bool)``; pruned entries are exactly 0.

    Raises:
        ValueError: shapes that do not fit, or a layer that cannot hold the pattern.
        PruningError: a non-finite Hessian, or one that stays indefinite under the penalty.
    """
    n_out, n_in = weight.shape
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"'hessian' should be ({n_in}, {n_in}) for a weight {tuple(weight.shape)}; got {tuple(hessian.shape)}")
    pattern.check_layer("weight", (int(n_out), int(n_in)))
    # Unlike SparseGPT's column loop, every step here is a large matrix product or factorisation, which
    # torch's threads speed up (1.6x with 2 threads on a 2-core CPU for SmolLM2's layers): no single-thread guard.
    return _prune_weight(weight, hessian, pattern, damping_frac, admm_iters, pcg_iters, rho_init)


def _prune_weight(
    weight: Tensor, hessian: Tensor, pattern: MaskPattern, damping_frac: float, admm_iters: int, pcg_iters: int,
    rho_init: float,
) -> tuple[Tensor, Tensor]:
    W = weight.detach().float()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    check_finite_moment(H, "weight", "scoring.init_damping_frac")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damping_frac * float(torch.diag(H).mean()))
    scale = torch.sqrt(torch.diag(H))
    H_scaled = H / scale[:, None] / scale[None, :]
    keep, D_scaled = _admm_support(W * scale, H_scaled, pattern, admm_iters, rho_init)
    return pcg_refit(W, H, keep, start=D_scaled / scale, max_iters=pcg_iters), keep


def _admm_support(
    W: Tensor, H: Tensor, pattern: MaskPattern, iters: int, rho: float
) -> tuple[Tensor, Tensor]:
    """ADMM on the scaled problem (unit-diagonal ``H``); returns ``(keep_mask, D)``, ``D`` zero off the mask."""
    target = W @ H
    keep = project_to_pattern(W, pattern)
    D = W * keep
    V = torch.zeros_like(W)
    kept = int(keep.sum())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    inverse, inverse_rho, stable = None, None, 0
    for _ in range(iters):
        if inverse_rho != rho:
            chol, info = torch.linalg.cholesky_ex(H + rho * eye)
            if int(info) != 0:
                raise StatisticsError(
                    "ALPS: the layer Hessian + penalty is not positive definite; increase "
                    "'scoring.init_damping_frac' (the damping_frac argument)"
                )
            inverse, inverse_rho = torch.cholesky_inverse(chol), rho
        W_new = (target - V + rho * D) @ inverse
        shifted = W_new + V / rho
        keep_new = project_to_pattern(shifted, pattern)
        D = shifted * keep_new
        V = V + rho * (W_new - D)
        changed = int((keep_new ^ keep).sum())
        keep = keep_new
        stable = stable + 1 if changed == 0 else 0
        if stable >= _STABLE_ITERS:
            break
        rho *= _rho_growth(changed, kept)
    return keep, D


def _rho_growth(changed: int, kept: int) -> float:
    """Penalty growth factor after an iteration in which ``changed`` weights switched kept/pruned status."""
    if changed == 0:
        return 1.0
    for fraction, factor in _RHO_STEPS:
        if changed >= fraction * kept:
            return factor
    return 1.1


def run_alps(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    pattern: MaskPattern | Mapping[str, MaskPattern],
    *,
    damping_frac: float = 0.01,
    admm_iters: int = 10,
    pcg_iters: int = 5,
    rho_init: float = 0.1,
) -> dict[str, Tensor]:
    """Prune every layer with ALPS, sequentially, feeding pruned outputs forward (like SparseGPT).

    Args:
        model: the model (modified in place: masks and re-fitted weights applied).
        layers: ``{name: nn.Linear}`` to prune, in model order.
        calibration: batches run through ``loss_fn`` (no grad) to capture inputs.
        loss_fn: ``loss_fn(model, batch) -> (B,)``.
        pattern: mask pattern and density, one for every layer or one per layer.
        damping_frac: relative Hessian damping.
        admm_iters: ADMM iterations per layer (at most).
        pcg_iters: PCG iterations per layer (at most).
        rho_init: first ADMM penalty.

    Returns:
        ``{name: (n_out, n_in) bool}`` keep-masks.

    Raises:
        ValueError: no calibration batches.
        PruningError: numerical failure (weights of the layers already pruned are restored first).
    """
    prune = layer_kernels(alps_prune_weight, layer_patterns(pattern, layers), damping_frac=damping_frac,
                          admm_iters=admm_iters, pcg_iters=pcg_iters, rho_init=rho_init)
    return run_sequential(model, layers, calibration, loss_fn, prune, method="alps")
