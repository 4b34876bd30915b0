"""The adaptive default solver (registry name ``auto``): swap descent, and an anneal only where it can pay.

Blocks of a real network are near-separable: with a Fisher or layer-wise Hessian the coupling between two
weights (an off-diagonal entry of ``Q``) is tiny next to the spread of the single-weight costs, and a
best-improvement swap descent from the current mask already ends at the best energy known. Blocks with
strong coupling (dense random ``Q``, low-rank Hessians of synthetic problems) have many local minima, where
the population anneal of :mod:`solvers.anneal` is worth its cost. ``auto`` tells the two apart per block:

1. swap descent (:func:`solvers.local_search.swap_descent`) from the better of the warm start and the
   separable optimum (the cheapest diagonal entries of every group): on a near-separable block the latter
   is a few moves from the descent's end, the warm start a few hundred;
2. a separability score ``s`` of the answer ``x*`` (:func:`separability`), which proves ``x*`` optimal when
   ``s >= 1``;
3. otherwise, when the block's coupling ratio (:func:`coupling_ratio`: how far the other weights of the
   block can move one weight's cost, relative to that cost) is above ``max_coupling``, the anneal (its own
   settings under ``anneal``) runs on the call as it would alone, and the better of the two answers is
   returned.

The ratio is a property of ``Q`` alone and does not grow with ``n`` for a fixed per-entry coupling; it is
near 0.1 on real SmolLM2 Fisher blocks and above 5 on the synthetic and random problems where the descent
gets stuck (figures in docs/BENCHMARKS.md).

The score. For a feasible ``y = x* + u`` that changes the set ``C`` of variables (``u_i = -1`` removes a
selected ``i``, ``+1`` adds ``j``), with the local field ``F = Q x*``:

.. math::

    E(y) - E(x^*) = \\sum_{u_i = -1} r_i + \\sum_{u_j = +1} a_j + \\sum_{i \\ne j \\in C} Q_{ij} u_i u_j,
    \\qquad r_i = Q_{ii} - 2F_i, \\quad a_j = Q_{jj} + 2F_j,

and the last sum is at least ``-|C| (|C| - 1) q`` with ``q = max_{i != j} |Q_ij|``. A change of ``m`` swaps
(inside groups) and ``f`` flips (of free variables) costs at least ``S(m) + T(f)``: ``S(m)`` sums the ``m``
cheapest pair costs ``r_(t) + a_(t)`` (t-th cheapest removal and addition of one group, merged over groups)
and ``T(f)`` the ``f`` cheapest flips. With ``q* = min over (m, f) of (S(m) + T(f)) / (c (c - 1))``,
``c = 2m + f >= 2``, every move is non-improving when ``q <= q*``; the score is ``s = q* / q``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from solvers.anneal import AnnealSolver
from solvers.base import Solver, is_positive_number
from solvers.local_search import GroupLayout, group_layout, largest_coupling, swap_descent
from solvers.problems import CardinalityQP

__all__ = ["AutoSolver", "coupling_ratio", "separability", "separable_start"]

logger = logging.getLogger(__name__)


def separable_start(problem: CardinalityQP) -> np.ndarray:
    """The optimum of the diagonal part of ``problem``: per group its ``k`` smallest ``Q_ii``, free
    variables set where ``Q_ii < 0``; a feasible (n,) int8 vector."""
    diagonal = np.diag(problem.Q)
    x = (diagonal < 0).astype(np.int8)
    for group, k in zip(problem.groups, problem.ks):
        x[group] = 0
        x[group[np.argsort(diagonal[group], kind="stable")[: int(k)]]] = 1
    return x


def coupling_ratio(Q: np.ndarray) -> float:
    """``median_i sum_{j != i} |Q_ij|`` over ``median_i |Q_ii|``: how much the rest of the block can shift one
    variable's cost, relative to that cost (0 for a diagonal ``Q``; ``inf`` when the diagonal is mostly 0)."""
    if Q.shape[0] < 2:
        return 0.0
    diagonal = np.abs(np.diag(Q))
    off_diagonal = np.abs(Q).sum(axis=1) - diagonal
    scale = float(np.median(diagonal))
    spread = float(np.median(off_diagonal))
    if scale == 0.0:
        return 0.0 if spread == 0.0 else math.inf
    return spread / scale


def separability(problem: CardinalityQP, x: np.ndarray, layout: GroupLayout | None = None) -> float:
    """The score ``s = q* / q`` of the module docstring for the feasible ``x`` (``inf`` without coupling).

    ``s >= 1`` proves that no feasible state has a lower energy than ``x``; a large ``s`` below 1 says the
    coupling is small next to the cost of leaving ``x``.

    Args:
        problem: the problem.
        x: feasible (n,) 0/1 state, usually a swap-descent local minimum.
        layout: precomputed :func:`solvers.local_search.group_layout` (optional).
    """
    layout = layout or group_layout(problem)
    Q = problem.Q
    coupling = largest_coupling(Q, absolute=True)
    field = Q @ x.astype(np.float64)
    diagonal = np.diag(Q)
    removal = diagonal - 2.0 * field
    addition = diagonal + 2.0 * field
    pairs = []
    for group in problem.groups:
        selected, unselected = group[x[group] == 1], group[x[group] == 0]
        m = min(selected.size, unselected.size)
        pairs.append(np.sort(removal[selected])[:m] + np.sort(addition[unselected])[:m])
    free = layout.group_of < 0
    flips = np.where(x[free] == 1, removal[free], addition[free])
    pair_sums = np.concatenate([[0.0], np.cumsum(np.sort(np.concatenate(pairs)) if pairs else [])])
    flip_sums = np.concatenate([[0.0], np.cumsum(np.sort(flips))])
    swaps, flipped = np.meshgrid(np.arange(pair_sums.size), np.arange(flip_sums.size), indexing="ij")
    changed = 2 * swaps + flipped
    movable = changed >= 2
    if not movable.any():
        return math.inf
    cost = (pair_sums[:, None] + flip_sums[None, :])[movable]
    q_star = float(np.min(cost / (changed[movable] * (changed[movable] - 1.0))))
    if coupling == 0.0:
        return math.inf if q_star >= 0.0 else 0.0
    return max(q_star, 0.0) / coupling


class AutoSolver(Solver):
    """Swap descent from the warm start; the population anneal only on strongly coupled blocks.

    Settings:
        max_coupling: run the anneal when the answer is not proven optimal and the block's
            :func:`coupling_ratio` is above this. ``inf``: never anneal; 0: anneal unless proven optimal.
        anneal: settings of the :class:`solvers.anneal.AnnealSolver` that runs on the other blocks
            (checked at construction).
        time_limit_s: wall-time cap (``None``: none); the anneal gets what the descent left.

    ``info`` reports ``separability``, ``coupling_ratio``, ``annealed`` and ``descent_moves``, and the
    anneal's own entries under ``anneal`` when it ran. ``status`` is ``OPTIMAL`` when the separability score
    proves the answer optimal.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 1)])
        >>> solution = get_solver("auto").solve(qp, seed=0)
        >>> solution.x.tolist(), solution.info["status"]
        ([0, 1, 0], 'OPTIMAL')
    """

    name = "auto"
    parameters = {"max_coupling": 1.0, "anneal": None, "time_limit_s": None}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.annealer = AnnealSolver(**(self.params["anneal"] or {}))

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        threshold = params["max_coupling"]
        if not (threshold == 0 or threshold == math.inf or is_positive_number(threshold)):
            raise ValueError(f"'max_coupling' should be a number >= 0 (or inf); got {threshold!r}")
        if params["anneal"] is not None and not isinstance(params["anneal"], dict):
            raise ValueError(f"'anneal' should be a dict of anneal settings or None; got {params['anneal']!r}")
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        start = time.perf_counter()
        layout = group_layout(problem)
        first = separable_start(problem)
        if initial_state is not None and problem.energy(initial_state) <= problem.energy(first):
            first = initial_state
        x, moves = swap_descent(problem, first, layout=layout)
        score = separability(problem, x, layout)
        ratio = coupling_ratio(problem.Q)
        info: dict[str, Any] = {"separability": score, "coupling_ratio": ratio, "descent_moves": moves,
                                "annealed": False, "status": "OPTIMAL" if score >= 1.0 else "FEASIBLE"}
        if score >= 1.0 or ratio <= self.params["max_coupling"]:
            return x, info
        left = None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - start), 1e-3)
        # The anneal gets the call exactly as it would alone (same warm start and seed), so on these blocks
        # auto is never worse than the anneal: refining the descent's local minimum instead ended clearly
        # higher on strongly coupled blocks (a deep, narrow basin).
        annealed = self.annealer.solve(problem, initial_state=initial_state, seed=seed, time_limit_s=left)
        info.update(annealed=True, anneal={key: value for key, value in annealed.info.items() if key != "solver"})
        if annealed.energy < problem.energy(x):
            x = annealed.x
        return x, info

    def close(self) -> None:
        self.annealer.close()
