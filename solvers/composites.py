"""Composite solvers: wrappers that hold a child solver and post-process its answer, like dimod
composites. Pre/post-processing lives here instead of as flags on every solver.
"""

from __future__ import annotations

from typing import Any

from solvers.base import Solver, check_positive_int
from solvers.local_search import swap_descent

__all__ = ["PolishComposite"]


class PolishComposite(Solver):
    """Run ``child`` then a best-improvement swap descent from its answer.

    Args:
        child: the wrapped solver.
        **params: settings (``max_iters``: most descent moves).

    Example:
        >>> from solvers import get_solver
        >>> solver = PolishComposite(get_solver("obs"))
    """

    name = "polish"
    parameters = {"max_iters": 100_000}

    def __init__(self, child: Solver, **params: Any) -> None:
        if not isinstance(child, Solver):
            raise TypeError(f"'child' should be a Solver; got {type(child).__name__}")
        self.child = child
        super().__init__(**params)

    @property
    def properties(self):  # type: ignore[override]
        """The child's properties (polishing never loses feasibility)."""
        return self.child.properties

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("max_iters", params["max_iters"])
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        answer = self.child.solve(problem, initial_state=initial_state, seed=seed, time_limit_s=time_limit_s)
        polished, moves = swap_descent(problem, answer.x, max_iters=self.params["max_iters"])
        info = {**answer.info, "child": self.child.name, "polish_moves": moves}
        if moves:
            info["status"] = "FEASIBLE"
        return polished, info

    def close(self) -> None:
        self.child.close()
