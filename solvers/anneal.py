"""Cardinality-preserving simulated annealing (registry name ``anneal``), the workhorse solver.

Every state is feasible: a move swaps a selected and an unselected variable inside one group, or
flips a free variable (energy changes as in :mod:`solvers.local_search`). The local field
``F = Q x`` is updated in O(n) per accepted move, so a proposal costs O(1). Moves are proposed by
picking a movable variable uniformly and, in a group, a random partner of the opposite value. The
inverse temperature follows a geometric schedule from ``beta_hot`` to ``beta_cold``, set from the
problem's own scale (quantiles of |dE| over random moves from a random state), which makes the run
invariant to rescaling ``Q`` (the same effect as rescaling to unit mean |entry|). Each restart ends
with a swap descent. The kernel is compiled with numba (``cache=True``); the first call in a fresh
environment pays the compile time once.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numba
import numpy as np

from solvers.base import Solver, check_positive_int, feasible_start
from solvers.local_search import GroupLayout, group_layout, swap_descent
from solvers.problems import CardinalityQP

__all__ = ["AnnealSolver", "beta_range"]

logger = logging.getLogger(__name__)


@numba.njit(cache=True)
def _seed_kernel(seed):  # pragma: no cover - compiled
    np.random.seed(seed)


@numba.njit(cache=True)
def _anneal_kernel(
    Q, x, F, energy, betas, movable, group_of, ones, zeros, pos, start, ks, size, best_x, best_energy
):  # pragma: no cover - compiled
    n = x.shape[0]
    n_movable = movable.shape[0]
    for sweep in range(betas.shape[0]):
        beta = betas[sweep]
        for _ in range(n_movable):
            p = movable[np.random.randint(n_movable)]
            g = group_of[p]
            if g < 0:
                s = 1.0 - 2.0 * x[p]
                delta = 2.0 * s * F[p] + Q[p, p]
                if delta <= 0.0 or np.random.random() < math.exp(-beta * delta):
                    x[p] = 1 - x[p]
                    for t in range(n):
                        F[t] += s * Q[p, t]
                    energy += delta
            else:
                if x[p] == 1:
                    i = p
                    a = pos[i]
                    b = start[g] + np.random.randint(size[g] - ks[g])
                    j = zeros[b]
                else:
                    j = p
                    b = pos[j]
                    a = start[g] + np.random.randint(ks[g])
                    i = ones[a]
                delta = 2.0 * (F[j] - F[i]) + Q[i, i] + Q[j, j] - 2.0 * Q[i, j]
                if delta <= 0.0 or np.random.random() < math.exp(-beta * delta):
                    x[i] = 0
                    x[j] = 1
                    ones[a] = j
                    zeros[b] = i
                    pos[j] = a
                    pos[i] = b
                    for t in range(n):
                        F[t] += Q[j, t] - Q[i, t]
                    energy += delta
        if energy < best_energy:
            best_energy = energy
            for t in range(n):
                best_x[t] = x[t]
    return energy, best_energy


def _move_deltas(problem: CardinalityQP, layout: GroupLayout, rng: np.random.Generator, count: int) -> np.ndarray:
    """|dE| of ``count`` random moves from a random feasible state (nonzero ones only)."""
    Q = problem.Q
    x = feasible_start(problem, rng)
    field = Q @ x.astype(np.float64)
    diag = np.diag(Q)
    picks = layout.movable[rng.integers(0, layout.movable.size, size=count)]
    deltas = np.empty(count)
    free = layout.group_of[picks] < 0
    s = 1.0 - 2.0 * x[picks[free]]
    deltas[free] = 2.0 * s * field[picks[free]] + diag[picks[free]]
    for position in np.flatnonzero(~free):
        p = int(picks[position])
        group = layout.members[layout.start[layout.group_of[p]] : layout.start[layout.group_of[p]] + layout.size[layout.group_of[p]]]
        partners = group[x[group] != x[p]]
        q = int(partners[rng.integers(partners.size)])
        i, j = (p, q) if x[p] == 1 else (q, p)
        deltas[position] = 2.0 * (field[j] - field[i]) + diag[i] + diag[j] - 2.0 * Q[i, j]
    magnitudes = np.abs(deltas)
    return magnitudes[magnitudes > 1e-12 * max(float(magnitudes.max(initial=0.0)), 1e-300)]


def beta_range(
    problem: CardinalityQP, *, seed: int = 0, hot_accept: float = 0.5, cold_accept: float = 0.01
) -> tuple[float, float]:
    """Pick ``(beta_hot, beta_cold)`` from the problem's scale.

    A median uphill move is accepted with probability ``hot_accept`` at ``beta_hot``, and a move
    at the 5th percentile of |dE| with probability ``cold_accept`` at ``beta_cold``.

    Args:
        problem: the problem (at least one movable variable).
        seed: seed for the sampled moves.
        hot_accept: acceptance probability of a median move at the start.
        cold_accept: acceptance probability of a small (5th percentile) move at the end.
    """
    layout = group_layout(problem)
    rng = np.random.default_rng(seed)
    magnitudes = _move_deltas(problem, layout, rng, int(min(4000, max(200, 4 * layout.movable.size))))
    if magnitudes.size == 0:
        return 1.0, 1.0
    hot = math.log(1.0 / hot_accept) / float(np.quantile(magnitudes, 0.5))
    cold = math.log(1.0 / cold_accept) / float(np.quantile(magnitudes, 0.05))
    return hot, max(cold, hot)


class AnnealSolver(Solver):
    """Simulated annealing with swap moves that keep every cardinality constraint.

    Settings:
        num_sweeps: sweeps per restart (one sweep = one proposal per movable variable).
        num_restarts: independent runs; the best is returned. With ``initial_state`` the first run
            starts from it.
        beta_range: ``(beta_hot, beta_cold)`` in units of 1/energy, or ``None`` to set it from the
            problem's scale (:func:`beta_range`).
        time_limit_s: wall-time cap (``None``: none); the current best is returned when it hits.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 1)])
        >>> get_solver("anneal").solve(qp, seed=0).x.tolist()
        [0, 1, 0]
    """

    name = "anneal"
    parameters = {"num_sweeps": 200, "num_restarts": 4, "beta_range": None, "time_limit_s": None}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("num_sweeps", params["num_sweeps"])
        check_positive_int("num_restarts", params["num_restarts"])
        betas = params["beta_range"]
        if betas is not None:
            valid = (
                isinstance(betas, (tuple, list))
                and len(betas) == 2
                and all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in betas)
                and betas[0] <= betas[1]
            )
            if not valid:
                raise ValueError(
                    f"'beta_range' should be None or a pair 0 < beta_hot <= beta_cold; got {betas!r}"
                )
            params["beta_range"] = (float(betas[0]), float(betas[1]))
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        start_time = time.perf_counter()
        deadline = None if time_limit_s is None else start_time + time_limit_s
        layout = group_layout(problem)
        rng = np.random.default_rng(seed)
        hot, cold = self.params["beta_range"] or beta_range(problem, seed=seed)
        betas = np.geomspace(hot, cold, self.params["num_sweeps"])
        # Time is checked between chunks of sweeps, never inside the compiled loop.
        sweeps_per_chunk = betas.size if deadline is None else max(1, int(2e5 // max(layout.movable.size, 1)))
        _seed_kernel(seed)
        Q = problem.Q
        best_x, best_energy, restarts_done, timed_out = None, np.inf, 0, False
        for restart in range(self.params["num_restarts"]):
            if best_x is not None and deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                break
            x = initial_state.copy() if (restart == 0 and initial_state is not None) else feasible_start(problem, rng)
            ones, zeros, pos = self._buffers(x, layout)
            field = Q @ x.astype(np.float64)
            energy = float(x @ field)
            run_best_x, run_best_energy = x.copy(), energy
            for offset in range(0, betas.size, sweeps_per_chunk):
                energy, run_best_energy = _anneal_kernel(
                    Q, x, field, energy, betas[offset : offset + sweeps_per_chunk], layout.movable,
                    layout.group_of, ones, zeros, pos, layout.start, layout.ks, layout.size,
                    run_best_x, run_best_energy,
                )
                if deadline is not None and time.perf_counter() > deadline:
                    timed_out = True
                    break
            polished, _ = swap_descent(problem, run_best_x, layout=layout)
            value = problem.energy(polished)
            restarts_done += 1
            if value < best_energy:
                best_x, best_energy = polished, value
            if timed_out:
                break
        info = {
            "status": "FEASIBLE", "restarts": restarts_done, "beta_range": (hot, cold),
            "timed_out": timed_out,
        }
        return best_x, info

    @staticmethod
    def _buffers(x: np.ndarray, layout: GroupLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-group lists of selected/unselected members and each variable's place in them."""
        total = layout.members.size
        ones = np.zeros(total, dtype=np.int64)
        zeros = np.zeros(total, dtype=np.int64)
        pos = np.zeros(x.size, dtype=np.int64)
        for g in range(layout.start.size):
            lo = int(layout.start[g])
            group = layout.members[lo : lo + int(layout.size[g])]
            selected, unselected = group[x[group] == 1], group[x[group] == 0]
            ones[lo : lo + selected.size] = selected
            zeros[lo : lo + unselected.size] = unselected
            pos[selected] = np.arange(lo, lo + selected.size)
            pos[unselected] = np.arange(lo, lo + unselected.size)
        return ones, zeros, pos
