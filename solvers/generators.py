"""Random problem generators for tests and benchmarks.

* :func:`random_dense`: Gaussian symmetric ``Q`` with one cardinality group or N:M groups.
* :func:`block_like`: a problem built with :meth:`CardinalityQP.from_block` from data shaped like a
  real pruning block: a low-rank-plus-diagonal empirical Fisher ``H = G^T G / N + mu I``,
  Gaussian weights ``w0 ~ N(0, 0.02^2)``, a small gradient, and the current deviation ``d`` from
  a magnitude mask that prunes half the block (so the current mask has energy 0).
"""

from __future__ import annotations

import numpy as np

from solvers.problems import CardinalityQP

__all__ = ["block_like", "magnitude_mask", "random_dense"]


def _constraints(n: int, k: int | None, structure: str) -> list[tuple[np.ndarray, int]]:
    if structure == "single":
        return [(np.arange(n), n // 2 if k is None else k)]
    if structure == "2:4":
        return [(np.arange(start, start + 4), 2) for start in range(0, n - n % 4, 4)]
    raise ValueError(f"'structure' should be 'single' or '2:4'; got {structure!r}")


def random_dense(
    n: int, *, k: int | None = None, structure: str = "single", seed: int = 0
) -> CardinalityQP:
    """Return a problem with a dense Gaussian ``Q`` (entries N(0, 1)) and a random offset.

    Args:
        n: number of variables.
        k: count for ``structure='single'`` (default ``n // 2``).
        structure: ``'single'`` (one group over everything) or ``'2:4'`` (groups of 4 with k=2;
            a remainder of ``n % 4`` variables stays free).
        seed: random seed.
    """
    rng = np.random.default_rng(seed)
    return CardinalityQP(rng.normal(size=(n, n)), _constraints(n, k, structure), offset=float(rng.normal()))


def magnitude_mask(w0: np.ndarray, constraints: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Return the 0/1 vector pruning the ``k`` smallest ``|w0|`` of every group (1 = pruned)."""
    x = np.zeros(w0.size, dtype=np.int8)
    for group, k in constraints:
        order = np.argsort(np.abs(w0[group]), kind="stable")
        x[np.asarray(group)[order[:k]]] = 1
    return x


def block_like(
    n: int,
    *,
    n_samples: int = 64,
    structure: str = "single",
    ridge: float = 1e-4,
    seed: int = 0,
) -> tuple[CardinalityQP, np.ndarray]:
    """Return a pruning-block problem and its current mask ``x_cur`` (energy 0, feasible).

    ``H = G^T G / n_samples + mu I`` with per-sample gradients ``G`` (n_samples, n) whose columns
    have log-normal scales, ``mu`` = 1e-3 of the mean diagonal; ``w0 ~ N(0, 0.02^2)``; ``g`` is
    the mean per-sample gradient times 0.1; ``d = -w0`` on the magnitude-pruned half.

    Args:
        n: block size.
        n_samples: rank of the Fisher part.
        structure: ``'single'`` (k = n // 2) or ``'2:4'``.
        ridge: ridge coefficient lambda.
        seed: random seed.

    Returns:
        ``(problem, x_cur)``.
    """
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(scale=0.5, size=n))
    G = rng.normal(size=(n_samples, n)) * scales
    H = G.T @ G / n_samples
    H += 1e-3 * float(np.mean(np.diag(H))) * np.eye(n)
    w0 = rng.normal(scale=0.02, size=n)
    g = 0.1 * G.mean(axis=0)
    constraints = _constraints(n, None, structure)
    x_cur = magnitude_mask(w0, constraints)
    d = -w0 * x_cur
    problem = CardinalityQP.from_block(H, g, w0, d, constraints, alpha=1.0, ridge=ridge)
    return problem, x_cur
