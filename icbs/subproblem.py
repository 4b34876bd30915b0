r"""The block problem: from a derivative estimate and the current mask to a :class:`solvers.CardinalityQP`.

This is the one place where torch tensors become numpy arrays and where the keep-mask (True = kept)
becomes the QUBO variable (``x_i = 1`` = pruned after the move). For a block of ``n`` weights with
original values :math:`w_0`, current values :math:`w` (:math:`w_{0,i}` where kept, 0 where pruned),
:math:`d = w - w_0`, :math:`D = \mathrm{diag}(w_0)`, the new values are :math:`w'_i = (1 - x_i) w_{0,i}`
and the change is :math:`\Delta = w' - w = -(d + D x)`. With the gradient :math:`g`, Hessian block
:math:`H`, gradient multiplier :math:`\alpha` and ridge :math:`\lambda` (DESIGN.md §3):

.. math::

    \min_{x \in \{0,1\}^n} \; \Delta L(x) = \alpha\, g^\top \Delta + \tfrac12 \Delta^\top H \Delta
        + \lambda \|\Delta\|_2^2 = x^\top Q x + c

    \text{s.t.} \quad \sum_{i \in G} x_i = k_G \quad \text{for every group } G,

    Q = \tfrac12 D (H + 2\lambda I) D + \mathrm{diag}\big(D (H + 2\lambda I) d - \alpha D g\big), \qquad
    c = -\alpha\, g^\top d + \tfrac12 d^\top (H + 2\lambda I) d.

For an unstructured mask there is one group, the whole block, with :math:`k_G` = the number of
weights of the block pruned now, so the layer's density never moves. Per-row densities and N:M
patterns are several disjoint groups. The current mask :math:`x_{cur}` is feasible and, when
:math:`w = w_0 \odot \text{keep}`, has energy :math:`\Delta L(x_{cur}) = 0`; it is returned as the
solvers' warm start and the bar a move must beat.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from solvers import CardinalityQP

from icbs.derivatives import BlockEstimate

__all__ = ["build_block_problem", "keep_to_x", "x_to_keep", "acceptance_tolerance"]

logger = logging.getLogger(__name__)

# |E(x_cur)| above this fraction of the problem's energy scale means w is not w0 * keep.
_ZERO_ENERGY_RTOL = 1e-9
# Float64 round-off of an energy, relative to the problem's scale: improvements smaller than this are noise.
_ACCEPT_RTOL = 1e-12


def _energy_scale(problem: CardinalityQP) -> float:
    """``sum |Q| + |offset|``: the scale energies of ``problem`` are computed at."""
    return float(np.abs(problem.Q).sum()) + abs(problem.offset)


def acceptance_tolerance(problem: CardinalityQP) -> float:
    """How far below the current mask's energy an answer must be to count as strictly better.

    A move is accepted only when ``E(x) - E(x_cur) < -acceptance_tolerance(problem)``: equal or worse
    masks are never accepted, and neither are gains within float64 round-off of the energy.
    """
    return _ACCEPT_RTOL * (1.0 + _energy_scale(problem))


def _block_vector(value: Any, name: str, n: int) -> np.ndarray:
    """A (n,) float64 numpy copy of a tensor/array of block values."""
    if isinstance(value, Tensor):
        array = value.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        array = np.asarray(value, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(f"'{name}' should hold the block's {n} values, shape ({n},); got {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"'{name}' should be finite; got NaN/Inf entries")
    return array


def keep_to_x(keep_mask_block: Tensor | np.ndarray) -> np.ndarray:
    """Convert a block's keep-mask (True = kept) to the QUBO variable (1 = pruned), int8 numpy (n,)."""
    if isinstance(keep_mask_block, Tensor):
        keep = keep_mask_block.detach().cpu().numpy()
    else:
        keep = np.asarray(keep_mask_block)
    if keep.dtype != np.bool_:
        raise TypeError(f"'keep_mask_block' should be a bool mask (True = kept); got dtype {keep.dtype}")
    return (~keep.reshape(-1)).astype(np.int8)


def x_to_keep(x: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """Convert a solver's answer (1 = pruned) back to a keep-mask (True = kept), bool tensor (n,)."""
    return torch.as_tensor(np.asarray(x).reshape(-1) == 0, device=device)


def build_block_problem(
    estimate: BlockEstimate,
    w0: Tensor,
    w_current: Tensor,
    keep_mask_block: Tensor,
    groups: Sequence[tuple[np.ndarray | Sequence[int], int]] | None,
    *,
    alpha: float,
    ridge: float,
) -> tuple[CardinalityQP, np.ndarray]:
    """Build the cardinality-constrained QUBO of one block (see the module docstring).

    Args:
        estimate: g (n,) and H (n, n) of the block, from :func:`icbs.derivatives.estimate_blocks`.
        w0: (n,) original (dense) values of the block's weights, any device/float dtype.
        w_current: (n,) current values of the block's weights (``w0`` where kept, 0 where pruned).
        keep_mask_block: (n,) bool, True = kept now.
        groups: disjoint constraint groups as ``(positions within the block, k)``; ``None`` means one
            group over the whole block with ``k`` = the number of its weights pruned now.
        alpha: gradient multiplier α (``derivatives.grad_multiplier``).
        ridge: ridge λ >= 0 (``derivatives.ridge``).

    Returns:
        ``(problem, x_cur)``: the :class:`solvers.CardinalityQP` (with its continuous ``block`` data)
        and the current assignment, int8 (n,), 1 = pruned, feasible, energy ΔL = 0.

    Raises:
        ValueError: shapes disagree, values are not finite, or a group's ``k`` differs from the number
            of its weights pruned now (the current mask must stay feasible).
    """
    g = np.asarray(estimate.g, dtype=np.float64)
    H = np.asarray(estimate.H, dtype=np.float64)
    n = g.shape[0] if g.ndim == 1 else -1
    if g.ndim != 1 or H.shape != (n, n):
        raise ValueError(f"'estimate' should hold g of shape (n,) and H of shape (n, n); got {g.shape} and {H.shape}")
    w0_np = _block_vector(w0, "w0", n)
    w_np = _block_vector(w_current, "w_current", n)
    x_cur = keep_to_x(keep_mask_block)
    if x_cur.shape != (n,):
        raise ValueError(f"'keep_mask_block' should have shape ({n},); got {tuple(x_cur.shape)}")
    d = w_np - w0_np  # -w0 where pruned, 0 where kept (unless kept weights were refitted)
    if groups is None:
        constraints = [(np.arange(n, dtype=np.int64), int(x_cur.sum()))]
    else:
        constraints = []
        for position, item in enumerate(groups):
            try:
                members, k = item
            except (TypeError, ValueError) as err:
                raise ValueError(f"'groups[{position}]' should be a (positions, k) pair; got {item!r}") from err
            members = np.asarray(members, dtype=np.int64).reshape(-1)
            if members.size and (members.min() < 0 or members.max() >= n):
                raise ValueError(
                    f"'groups[{position}]' positions should be in [0, {n - 1}]; got {members.min()}..{members.max()}"
                )
            pruned_now = int(x_cur[members].sum())
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) != pruned_now:
                raise ValueError(
                    f"'groups[{position}]' k should equal the number of its weights pruned now ({pruned_now}) "
                    f"so the current mask stays feasible; got {k!r}"
                )
            constraints.append((members, int(k)))
    problem = CardinalityQP.from_block(H, g, w0_np, d, constraints, alpha=float(alpha), ridge=float(ridge))
    energy = problem.energy(x_cur)
    if abs(energy) > _ZERO_ENERGY_RTOL * (_energy_scale(problem) + 1e-300):
        logger.warning(
            "the current mask has energy %.3g, not 0: w_current is not w0 * keep_mask on this block, so moves "
            "are scored against resetting kept weights to w0",
            energy,
        )
    return problem, x_cur
