"""Fixtures for the solver tests (numpy only; no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from solvers import CardinalityQP


def _size_and_constraints(rng: np.random.Generator, seed: int) -> tuple[int, list]:
    """n in [12, 18]; even seeds one group with random k, odd seeds 2:4 groups (rest free)."""
    n = int(rng.integers(12, 19))
    if seed % 2 == 0:
        return n, [(np.arange(n), int(rng.integers(1, n)))]
    return n, [(np.arange(i, i + 4), 2) for i in range(0, n - n % 4, 4)]


def random_instance(seed: int) -> CardinalityQP:
    """n in [12, 18]; even seeds one group with random k, odd seeds 2:4 groups (rest free)."""
    rng = np.random.default_rng(seed)
    n, constraints = _size_and_constraints(rng, seed)
    return CardinalityQP(rng.normal(size=(n, n)), constraints, offset=float(rng.normal()))


def random_block_instance(seed: int) -> CardinalityQP:
    """Like :func:`random_instance` but built with from_block (for the OBS family)."""
    rng = np.random.default_rng(seed)
    n, constraints = _size_and_constraints(rng, seed)
    G = rng.normal(size=(16, n))
    w0 = rng.normal(scale=0.02, size=n)
    d = -w0 * (rng.random(n) < 0.5)
    return CardinalityQP.from_block(
        G.T @ G / 16 + 1e-3 * np.eye(n), 0.1 * G.mean(axis=0), w0, d, constraints, ridge=1e-4
    )


@pytest.fixture(scope="session")
def fifty_instances() -> list[CardinalityQP]:
    return [random_instance(seed) for seed in range(50)]


@pytest.fixture(scope="session")
def fifty_optima(fifty_instances) -> list[float]:
    from solvers import get_solver

    oracle = get_solver("exhaustive")
    return [oracle.solve(problem).energy for problem in fifty_instances]
