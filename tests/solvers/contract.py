"""Shared contract every registered solver must satisfy (like dimod's ``assert_sampler_api``).

:func:`check_solver_contract` runs every check on one solver name; the parametrized tests in
``test_contract.py`` apply it to each name in :func:`solvers.available_solvers`.
"""

from __future__ import annotations

import numpy as np

from solvers import CardinalityQP, Solution, get_solver, get_solver_class

__all__ = ["CONTRACT_PARAMS", "contract_problem", "make_solver"]

# Settings that keep the suite fast; each solver's defaults are exercised elsewhere.
CONTRACT_PARAMS: dict[str, dict] = {
    "anneal": {"num_sweeps": 200},
    "auto": {"anneal": {"num_sweeps": 200}},
    "neal": {"num_reads": 4, "num_sweeps": 200},
    "dimod": {"sampler": "dwave.samplers.TabuSampler", "sample_params": {"timeout": 20}},
    "cpsat": {"time_limit_s": 10.0},
}


def make_solver(name: str, **params):
    """Build ``name`` with the fast contract settings (plus ``params``)."""
    return get_solver(name, **{**CONTRACT_PARAMS.get(name, {}), **params})


def contract_problem(name: str, n: int, constraints, seed: int = 0) -> CardinalityQP:
    """A random problem the solver can take: from_block data when it needs it, else dense Gaussian."""
    rng = np.random.default_rng(seed)
    if get_solver_class(name).properties.get("needs_block"):
        G = rng.normal(size=(8, n))
        H = G.T @ G / 8 + 0.01 * np.eye(n)
        w0 = rng.normal(scale=0.5, size=n)
        d = -w0 * (rng.random(n) < 0.5)
        return CardinalityQP.from_block(H, 0.1 * rng.normal(size=n), w0, d, constraints, ridge=0.01)
    return CardinalityQP(rng.normal(size=(n, n)), constraints, offset=float(rng.normal()))


def assert_valid_solution(problem: CardinalityQP, solution: Solution) -> None:
    """The answer is a feasible 0/1 vector whose energy matches the problem's."""
    assert isinstance(solution, Solution)
    assert solution.x.shape == (problem.n,)
    assert set(np.unique(solution.x).tolist()) <= {0, 1}
    assert solution.feasible and problem.is_feasible(solution.x)
    expected = problem.energy(solution.x)
    assert abs(solution.energy - expected) <= 1e-9 * max(1.0, abs(expected))
    for key in ("solver", "wall_time_s", "status"):
        assert key in solution.info
