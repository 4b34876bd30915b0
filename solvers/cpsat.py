"""OR-Tools CP-SAT on an exact integer model of the problem (registry name ``cpsat``).

Model: one Boolean ``x_i`` per variable; cardinality constraints are native linear equalities.
The objective :math:`\\sum_i Q_{ii} x_i + \\sum_{i<j} 2 Q_{ij} x_i x_j` is rescaled to unit mean |entry|
then to integers with the largest coefficient at ``2**precision_bits``, and rounded. Each product
``y_ij = x_i x_j`` with a nonzero coefficient is linearised with only the side that binds at an
optimum: ``y >= x_i + x_j - 1`` for a positive coefficient, ``y <= x_i, y <= x_j`` for a negative
one. The answer is re-scored in float64; ``OPTIMAL`` means optimal for the rounded model, which
equals the true optimum unless two energies differ by less than the rounding error
(``info['rounding_error_bound']``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from solvers.base import Solver, check_positive_int
from solvers.exceptions import InfeasibleProblemError, SolverUnavailableError
from solvers.local_search import repair

try:
    from ortools.sat.python import cp_model
except ImportError:  # reported when a CpSatSolver is built, so only users of 'cpsat' need OR-Tools
    cp_model = None

__all__ = ["CpSatSolver"]

logger = logging.getLogger(__name__)


class CpSatSolver(Solver):
    """Exact solver on OR-Tools CP-SAT; hint from ``initial_state``, time limit, workers.

    Settings:
        time_limit_s: wall-time cap (``None``: solve to optimality).
        num_workers: CP-SAT search workers.
        precision_bits: the largest integer coefficient is ``2**precision_bits``.
        log_search: let CP-SAT log its search (to stdout; for debugging).

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 1)])
        >>> solution = get_solver("cpsat").solve(qp)
        >>> solution.x.tolist(), solution.info["status"]
        ([0, 1, 0], 'OPTIMAL')
    """

    name = "cpsat"
    parameters = {"time_limit_s": None, "num_workers": 2, "precision_bits": 30, "log_search": False}
    properties = {"exact": True, "native_cardinality": True, "max_variables": None, "needs_block": False}

    def __init__(self, **params: Any) -> None:
        if cp_model is None:
            raise SolverUnavailableError("solver 'cpsat' needs OR-Tools; install it with 'pip install ortools'")
        super().__init__(**params)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("num_workers", params["num_workers"])
        bits = check_positive_int("precision_bits", params["precision_bits"])
        if bits > 40:
            raise ValueError(f"'precision_bits' should be an int in [1, 40]; got {bits}")
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        n = problem.n
        Q = problem.Q
        linear = np.diag(Q).copy()
        rows, cols = np.triu_indices(n, 1)
        quadratic = 2.0 * Q[rows, cols]
        largest = max(float(np.abs(linear).max(initial=0.0)), float(np.abs(quadratic).max(initial=0.0)))
        factor = (2.0 ** self.params["precision_bits"]) / largest if largest > 0 else 1.0
        linear_int = np.rint(linear * factor).astype(np.int64)
        quadratic_int = np.rint(quadratic * factor).astype(np.int64)

        model = cp_model.CpModel()
        x = [model.NewBoolVar(f"x{i}") for i in range(n)]
        terms = [(int(c), x[i]) for i, c in enumerate(linear_int) if c]
        for i, j, c in zip(rows[quadratic_int != 0], cols[quadratic_int != 0], quadratic_int[quadratic_int != 0]):
            y = model.NewBoolVar(f"y{i}_{j}")
            if c > 0:
                model.AddBoolOr([x[i].Not(), x[j].Not(), y])  # y >= x_i + x_j - 1
            else:
                model.AddImplication(y, x[i])  # y <= x_i
                model.AddImplication(y, x[j])  # y <= x_j
            terms.append((int(c), y))
        for group, k in zip(problem.groups, problem.ks):
            model.Add(sum(x[int(i)] for i in group) == int(k))
        model.Minimize(sum(c * v for c, v in terms))
        if initial_state is not None:
            for i in range(n):
                model.AddHint(x[i], int(initial_state[i]))

        solver = cp_model.CpSolver()
        solver.parameters.num_workers = self.params["num_workers"]
        solver.parameters.random_seed = int(seed)
        solver.parameters.log_search_progress = bool(self.params["log_search"])
        if time_limit_s is not None:
            solver.parameters.max_time_in_seconds = float(time_limit_s)
        status = solver.Solve(model)
        name = solver.StatusName(status)
        info: dict[str, Any] = {
            "status": "OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE",
            "cpsat_status": name,
            "n_products": len(terms) - int(np.count_nonzero(linear_int)),
            "scale_factor": factor,
            "rounding_error_bound": 0.5 * (len(terms)) / factor,
        }
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            answer = np.array([solver.Value(v) for v in x], dtype=np.int8)
            info["bound"] = solver.BestObjectiveBound() / factor + problem.offset - info["rounding_error_bound"]
            return answer, info
        if status == cp_model.INFEASIBLE:
            raise InfeasibleProblemError(f"CP-SAT reports the model infeasible (status {name})")
        # No solution within the time limit: fall back, and say so.
        logger.warning("CP-SAT found no solution (status %s); returning a greedy feasible answer", name)
        info["fallback"] = "initial_state" if initial_state is not None else "greedy repair"
        answer = initial_state if initial_state is not None else repair(problem, np.zeros(n, dtype=np.int8))[0]
        return answer, info
