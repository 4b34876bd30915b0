"""Exhaustive enumeration of every feasible assignment (registry name ``exhaustive``).

The feasible set is a product: each group contributes its ``C(|G|, k_G)`` patterns, the free
variables their ``2^f`` patterns. Rows of the product are decoded from a mixed-radix counter in
chunks and scored with one matrix product per chunk, so there is no Python loop per assignment.
The test oracle; refuses problems above ``max_variables`` (default 24).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from solvers.base import Solver, check_positive_int
from solvers.problems import CardinalityQP

__all__ = ["ExhaustiveSolver", "enumerate_feasible", "feasible_count"]

_CHUNK_ROWS = 1 << 16


def _patterns(size: int, k: int | None) -> np.ndarray:
    """All 0/1 rows of length ``size`` with ``k`` ones (every row when ``k`` is None)."""
    if k is None:
        codes = np.arange(1 << size, dtype=np.int64)
        return ((codes[:, None] >> np.arange(size)) & 1).astype(np.float64)
    rows = np.zeros((math.comb(size, k), size))
    for row, chosen in enumerate(itertools.combinations(range(size), k)):
        rows[row, list(chosen)] = 1.0
    return rows


def _blocks(problem: CardinalityQP) -> list[tuple[np.ndarray, np.ndarray]]:
    blocks = [(group, _patterns(group.size, int(k))) for group, k in zip(problem.groups, problem.ks)]
    free = np.flatnonzero(problem.group_of < 0)
    if free.size:
        blocks.append((free, _patterns(free.size, None)))
    return blocks


def feasible_count(problem: CardinalityQP) -> int:
    """Number of feasible assignments of ``problem``."""
    count = 2 ** int(np.sum(problem.group_of < 0))
    for group, k in zip(problem.groups, problem.ks):
        count *= math.comb(group.size, int(k))
    return count


def enumerate_feasible(problem: CardinalityQP, chunk_rows: int = _CHUNK_ROWS):
    """Yield ``(X, energies)`` chunks covering every feasible assignment exactly once.

    Args:
        problem: the problem.
        chunk_rows: rows per chunk.

    Yields:
        ``X`` (m, n) float64 0/1 rows and their (m,) energies (offset included).
    """
    blocks = _blocks(problem)
    total = feasible_count(problem)
    for first in range(0, total, chunk_rows):
        codes = np.arange(first, min(total, first + chunk_rows), dtype=np.int64)
        X = np.zeros((codes.size, problem.n))
        for indices, patterns in blocks:
            count = patterns.shape[0]
            X[:, indices] = patterns[codes % count]
            codes //= count
        yield X, problem.energies(X)


class ExhaustiveSolver(Solver):
    """Enumerate all feasible assignments and return the best (ties: the first enumerated).

    Settings:
        max_variables: refuse problems with more variables than this.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 2)])
        >>> get_solver("exhaustive").solve(qp).x.tolist()
        [0, 1, 1]
    """

    name = "exhaustive"
    parameters = {"max_variables": 24}
    properties = {"exact": True, "native_cardinality": True, "max_variables": 24, "needs_block": False}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("max_variables", params["max_variables"])
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        limit = self.params["max_variables"]
        if problem.n > limit:
            raise ValueError(
                f"exhaustive solver refuses n={problem.n} variables (more than 'max_variables'={limit}); "
                "use 'cpsat' or 'anneal' for larger problems"
            )
        best_x, best_energy = None, np.inf
        for X, energies in enumerate_feasible(problem):
            row = int(np.argmin(energies))
            if energies[row] < best_energy:
                best_x, best_energy = X[row].astype(np.int8), float(energies[row])
        return best_x, {"status": "OPTIMAL", "bound": best_energy, "evaluated": feasible_count(problem)}
