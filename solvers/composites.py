"""Composite solvers: wrappers that hold a child solver and pre/post-process its calls, like dimod
composites. Pre/post-processing lives here instead of as flags on every solver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from solvers.base import Solution, Solver, check_positive_int
from solvers.local_search import swap_descent
from solvers.problems import CardinalityQP

__all__ = ["PolishComposite", "RecordingComposite"]

Recorder = Callable[[int, CardinalityQP, "np.ndarray | None", Solution], None]


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


class RecordingComposite(Solver):
    """Delegate to ``child`` and hand every call to ``record`` (to export the block problems of a run).

    ``record(call, problem, initial_state, solution)`` gets the 0-based index of the call, the problem,
    the warm start (``None`` if none) and the child's solution; it may write files, keep some of the
    calls, or ignore them. The instance carries the child's name and properties, so a driver's records
    and statistics read as if the child ran alone. Nothing is registered: build it and hand the object to
    the driver (``icbs.prune(..., solver=RecordingComposite(child, record))``).

    Args:
        child: the wrapped solver.
        record: the callback, called after each solve.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> seen = []
        >>> solver = RecordingComposite(get_solver("swap-descent"), lambda i, p, x0, s: seen.append(i))
        >>> _ = solver.solve(CardinalityQP(np.eye(3), [(range(3), 1)]), seed=0)
        >>> seen
        [0]
    """

    name = "record"
    parameters: dict[str, Any] = {}

    def __init__(self, child: Solver, record: Recorder) -> None:
        if not isinstance(child, Solver):
            raise TypeError(f"'child' should be a Solver; got {type(child).__name__}")
        if not callable(record):
            raise TypeError(f"'record' should be callable; got {type(record).__name__}")
        super().__init__()
        self.name = child.name
        self.child, self.record, self.calls = child, record, 0

    @property
    def properties(self):  # type: ignore[override]
        """The child's properties."""
        return self.child.properties

    def _solve(self, problem, initial_state, seed, time_limit_s):
        solution = self.child.solve(problem, initial_state=initial_state, seed=seed, time_limit_s=time_limit_s)
        call, self.calls = self.calls, self.calls + 1
        self.record(call, problem, initial_state, solution)
        return solution.x, dict(solution.info)

    def close(self) -> None:
        self.child.close()
