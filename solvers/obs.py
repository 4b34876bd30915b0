"""The OBS family on the block's continuous model: greedy OBS (``obs``) and I-OBS (``iobs``).

Both see only :class:`solvers.problems.BlockData`: the quadratic model
:math:`m(w') = \\alpha g^\\top (w' - w) + \\tfrac12 (w' - w)^\\top H_\\lambda (w' - w)` around the
current weights ``w = w0 + d``, with :math:`H_\\lambda = H + 2\\lambda I` (plus a small damping when
it is singular). Its unconstrained minimiser is :math:`w_c = w - \\alpha H_\\lambda^{-1} g`. The mask
they return is scored with the problem's ``Q`` (``energy = problem.energy(x)``): in the block
problem kept weights stay at ``w0``, while OBS reasons with re-optimised weights.

* ``obs`` (Hassibi & Stork's Optimal Brain Surgeon, greedy): from ``w_c``, repeatedly remove the
  weight ``q`` of least saliency :math:`w_q^2 / (2 [H^{-1}]_{qq})` among groups that still need
  removals, move the others by :math:`-w_q H^{-1} e_q / [H^{-1}]_{qq}`, and downdate
  :math:`H^{-1} \\leftarrow H^{-1} - H^{-1} e_q e_q^\\top H^{-1} / [H^{-1}]_{qq}`.
* ``iobs`` (iterative OBS): from a mask ``x_t`` (kept weights at ``w0``), take a damped Newton step
  :math:`u = w_t + \\eta (w_c - w_t)` and project back onto feasible masks, iterated until the
  mask repeats. ``variant='practical'`` projects per group with a diagonal metric
  (prune the ``k_G`` weights with the least :math:`H_{ii} (u_i^2 - (u_i - w0_i)^2)`);
  ``variant='optimal'`` projects exactly in the :math:`H_\\lambda` metric by enumeration (tiny blocks).

Free variables (in no group) are set afterwards by single-flip descent on ``Q``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from solvers.base import Solver, check_positive_float, check_positive_int
from solvers.problems import BlockData, CardinalityQP

__all__ = ["IObsSolver", "ObsSolver"]

logger = logging.getLogger(__name__)


def _require_block(problem: CardinalityQP, solver_name: str) -> BlockData:
    if problem.block is None:
        raise ValueError(
            f"solver '{solver_name}' needs the block's continuous data (H, g, w0, d); "
            "build the problem with CardinalityQP.from_block (a plain QUBO has none)"
        )
    return problem.block


def _inverse_hessian(block: BlockData, damping: float) -> tuple[np.ndarray, float]:
    """Return ``(H_lambda + mu I)^{-1}`` and the damping ``mu`` used (0 when not needed)."""
    h_reg = block.regularised_hessian()
    mean_diag = float(np.mean(np.abs(np.diag(h_reg)))) or 1.0
    mu = 0.0
    for attempt in range(8):
        try:
            chol = np.linalg.cholesky(h_reg + mu * np.eye(block.n))
            inverse = np.linalg.inv(chol)
            return inverse.T @ inverse, mu
        except np.linalg.LinAlgError:
            mu = damping * mean_diag * (10.0**attempt)
    raise ValueError(
        "Hessian block is not positive definite even with damping; increase the ridge or 'damping'"
    )


def _continuous_minimiser(block: BlockData, h_inv: np.ndarray) -> np.ndarray:
    """``w_c = w - alpha H^{-1} g`` with ``w = w0 + d``."""
    return block.w0 + block.d - block.alpha * (h_inv @ block.g)


def _set_free_variables(problem: CardinalityQP, x: np.ndarray) -> np.ndarray:
    """Single-flip descent on the free variables only."""
    free = np.flatnonzero(problem.group_of < 0)
    if free.size == 0:
        return x
    Q = problem.Q
    x = x.copy()
    field = Q @ x.astype(np.float64)
    for _ in range(10 * free.size):
        sign = 1.0 - 2.0 * x[free]
        deltas = 2.0 * sign * field[free] + np.diag(Q)[free]
        best = int(np.argmin(deltas))
        if deltas[best] >= 0:
            break
        i = int(free[best])
        field += sign[best] * Q[i]
        x[i] = 1 - x[i]
    return x


class ObsSolver(Solver):
    """Greedy Optimal Brain Surgeon on the block's continuous data.

    Settings:
        damping: relative damping added to ``H_lambda`` if it is not positive definite.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP.from_block(np.eye(3), np.zeros(3), np.array([0.1, 0.3, 0.2]),
        ...                               np.zeros(3), [([0, 1, 2], 1)])
        >>> get_solver("obs").solve(qp).x.tolist()
        [1, 0, 0]
    """

    name = "obs"
    parameters = {"damping": 1e-6}
    properties = {"exact": False, "native_cardinality": True, "max_variables": None, "needs_block": True}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_float("damping", params["damping"])
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        block = _require_block(problem, self.name)
        h_inv, mu = _inverse_hessian(block, self.params["damping"])
        if mu:
            logger.warning("obs: H + 2*ridge*I is singular; added damping %.3g", mu)
        w = _continuous_minimiser(block, h_inv)
        x = np.zeros(problem.n, dtype=np.int8)
        remaining = np.array(problem.ks, dtype=np.int64)
        group_of = problem.group_of
        candidate = np.zeros(problem.n, dtype=bool)
        for group, k in zip(problem.groups, problem.ks):
            candidate[group] = k > 0
        for _ in range(int(remaining.sum())):
            diag = np.diag(h_inv)
            saliency = np.where(candidate, w**2 / (2.0 * np.maximum(diag, 1e-300)), np.inf)
            q = int(np.argmin(saliency))
            column = h_inv[:, q].copy()
            w -= (w[q] / column[q]) * column
            w[q] = 0.0
            h_inv -= np.outer(column, column) / column[q]
            x[q] = 1
            group = group_of[q]
            remaining[group] -= 1
            candidate[q] = False
            if remaining[group] == 0:
                candidate[group_of == group] = False
        x = _set_free_variables(problem, x)
        return x, {"status": "FEASIBLE", "damping": mu}


class IObsSolver(Solver):
    """I-OBS: damped Newton step on the quadratic model, then projection to a feasible mask,
    iterated to a fixed point; the best mask by ``Q`` energy is returned.

    Settings:
        variant: ``'practical'`` (per-group top-k with a diagonal metric) or ``'optimal'`` (exact
            projection in the ``H_lambda`` metric by enumeration; ``n <= max_exact_variables``).
        step_size: Newton step ``eta`` in (0, 1].
        max_iters: most iterations.
        max_exact_variables: size limit of the ``'optimal'`` variant.
        damping: relative damping added to ``H_lambda`` if it is not positive definite.
    """

    name = "iobs"
    parameters = {
        "variant": "practical",
        "step_size": 0.5,
        "max_iters": 50,
        "max_exact_variables": 20,
        "damping": 1e-6,
    }
    properties = {"exact": False, "native_cardinality": True, "max_variables": None, "needs_block": True}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        if params["variant"] not in ("practical", "optimal"):
            raise ValueError(f"'variant' should be 'practical' or 'optimal'; got {params['variant']!r}")
        step = check_positive_float("step_size", params["step_size"])
        if step > 1.0:
            raise ValueError(f"'step_size' should be a float in (0, 1]; got {step!r}")
        check_positive_int("max_iters", params["max_iters"])
        check_positive_int("max_exact_variables", params["max_exact_variables"])
        check_positive_float("damping", params["damping"])
        return params

    def _project_practical(self, problem: CardinalityQP, u: np.ndarray, h_diag: np.ndarray) -> np.ndarray:
        w0 = problem.block.w0
        # Cost of pruning i relative to keeping it, in the diagonal metric.
        cost = h_diag * (u**2 - (u - w0) ** 2)
        x = np.zeros(problem.n, dtype=np.int8)
        for group, k in zip(problem.groups, problem.ks):
            order = np.argsort(cost[group], kind="stable")
            x[group[order[:k]]] = 1
        free = problem.group_of < 0
        x[free & (cost < 0)] = 1
        return x

    def _project_optimal(self, problem: CardinalityQP, u: np.ndarray, h_reg: np.ndarray) -> np.ndarray:
        from solvers.exact import ExhaustiveSolver

        block = problem.block
        # min_x 1/2 (w' - u)^T H (w' - u) with w' = w0 - D x: from_block with g = 0 and d = u - w0,
        # since then Delta = -(d + D x) = w' - u.
        projection = CardinalityQP.from_block(
            h_reg, np.zeros(problem.n), block.w0, u - block.w0, problem.constraints
        )
        limit = self.params["max_exact_variables"]
        return ExhaustiveSolver(max_variables=limit).solve(projection).x

    def _solve(self, problem, initial_state, seed, time_limit_s):
        block = _require_block(problem, self.name)
        variant = self.params["variant"]
        limit = self.params["max_exact_variables"]
        if variant == "optimal" and problem.n > limit:
            raise ValueError(
                f"iobs variant 'optimal' enumerates masks and refuses n={problem.n} "
                f"(more than 'max_exact_variables'={limit}); use variant='practical'"
            )
        h_inv, mu = _inverse_hessian(block, self.params["damping"])
        h_reg = block.regularised_hessian() + mu * np.eye(problem.n)
        w_c = _continuous_minimiser(block, h_inv)
        h_diag = np.diag(h_reg)

        def project(u: np.ndarray) -> np.ndarray:
            x = self._project_optimal(problem, u, h_reg) if variant == "optimal" else self._project_practical(problem, u, h_diag)
            return _set_free_variables(problem, x)

        eta = self.params["step_size"]
        x = initial_state.copy() if initial_state is not None else project(w_c)
        best_x, best_energy = x, problem.energy(x)
        seen = {x.tobytes()}
        iterations = 0
        converged = False
        for iterations in range(1, self.params["max_iters"] + 1):
            w_t = (1 - x) * block.w0
            x = project(w_t + eta * (w_c - w_t))
            energy = problem.energy(x)
            if energy < best_energy:
                best_x, best_energy = x, energy
            key = x.tobytes()
            if key in seen:
                converged = True
                break
            seen.add(key)
        return best_x, {"status": "FEASIBLE", "iterations": iterations, "converged": converged, "damping": mu}
