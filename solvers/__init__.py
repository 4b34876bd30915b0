"""Block solvers for cardinality-constrained QUBOs (the combinatorial side of icbs).

Depends on numpy/scipy/dimod (and optionally numba, dwave-neal, ortools); never imports torch or
icbs. Typical use::

    from solvers import CardinalityQP, get_solver
    qp = CardinalityQP(Q, [(range(n), k)])
    solution = get_solver("auto").solve(qp, seed=0)

Registered solvers: ``auto`` (the default of icbs), ``anneal``, ``neal``, ``dimod``, ``cpsat``, ``exhaustive``, ``obs``,
``iobs``, ``swap-descent``; see :func:`available_solvers`.
"""

from __future__ import annotations

from solvers.base import Solution, Solver
from solvers.exceptions import InfeasibleProblemError, SolverUnavailableError
from solvers.problems import BlockData, CardinalityQP
from solvers.registry import (
    available_solvers,
    get_solver,
    get_solver_class,
    register,
    solver_from_config,
    unregister,
)

__all__ = [
    "BlockData",
    "CardinalityQP",
    "InfeasibleProblemError",
    "Solution",
    "Solver",
    "SolverUnavailableError",
    "available_solvers",
    "get_solver",
    "get_solver_class",
    "register",
    "solver_from_config",
    "unregister",
]
