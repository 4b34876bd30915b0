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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from solvers.base import Solver, check_positive_int, feasible_start
from solvers.local_search import GroupLayout, group_layout, swap_descent
from solvers.problems import CardinalityQP

__all__ = ["AnnealSolver", "beta_range"]

logger = logging.getLogger(__name__)


@numba.njit(cache=True, nogil=True)
def _anneal_kernel(
    Q, x, F, energy, betas, movable, group_of, ones, zeros, pos, start, ks, size, best_x, best_energy, seed
):  # pragma: no cover - compiled
    # numba's generator state is per thread; seed >= 0 re-seeds it for this run.
    if seed >= 0:
        np.random.seed(seed)
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


def _move_deltas(
    problem: CardinalityQP, layout: GroupLayout, x: np.ndarray, rng: np.random.Generator, count: int
) -> np.ndarray:
    """|dE| of ``count`` random moves from the feasible state ``x`` (nonzero ones only)."""
    Q = problem.Q
    field = Q @ x.astype(np.float64)
    diag = np.diag(Q)
    picks = layout.movable[rng.integers(0, layout.movable.size, size=count)]
    deltas = np.empty(count)
    free = layout.group_of[picks] < 0
    s = 1.0 - 2.0 * x[picks[free]]
    deltas[free] = 2.0 * s * field[picks[free]] + diag[picks[free]]
    for position in np.flatnonzero(~free):
        p = int(picks[position])
        lo = int(layout.start[layout.group_of[p]])
        group = layout.members[lo : lo + int(layout.size[layout.group_of[p]])]
        partners = group[x[group] != x[p]]
        q = int(partners[rng.integers(partners.size)])
        i, j = (p, q) if x[p] == 1 else (q, p)
        deltas[position] = 2.0 * (field[j] - field[i]) + diag[i] + diag[j] - 2.0 * Q[i, j]
    magnitudes = np.abs(deltas)
    return magnitudes[magnitudes > 1e-12 * max(float(magnitudes.max(initial=0.0)), 1e-300)]


def beta_range(
    problem: CardinalityQP, x: np.ndarray | None = None, *, seed: int = 0
) -> tuple[float, float]:
    """Pick ``(beta_hot, beta_cold)`` from the problem's scale around a state.

    Without ``x`` (a run from a random state): at ``beta_hot`` a median uphill move from a random
    feasible state is accepted with probability 1/2, at ``beta_cold`` a 5th-percentile one with
    probability 1/100. With ``x`` (a warm start, which should stay in its basin): at ``beta_hot`` a
    5th-percentile move from ``x`` is accepted with probability 1/1000, and ``beta_cold`` is thirty
    times colder.

    Args:
        problem: the problem (at least one movable variable).
        x: feasible warm start, or ``None``.
        seed: seed for the sampled moves.
    """
    layout = group_layout(problem)
    rng = np.random.default_rng(seed)
    state = feasible_start(problem, rng) if x is None else x
    count = int(min(4000, max(200, 4 * layout.movable.size)))
    magnitudes = _move_deltas(problem, layout, state, rng, count)
    if magnitudes.size == 0:
        return 1.0, 1.0
    small = float(np.quantile(magnitudes, 0.05))
    if x is not None:
        hot = math.log(1000.0) / small
        return hot, 30.0 * hot
    hot = math.log(2.0) / float(np.quantile(magnitudes, 0.5))
    return hot, max(math.log(100.0) / small, hot)


class AnnealSolver(Solver):
    """Simulated annealing with swap moves that keep every cardinality constraint.

    Without ``initial_state`` every restart starts from a random feasible state on the schedule
    of :func:`beta_range`. With it, ``num_restarts - num_restarts // 4`` restarts start from
    ``initial_state`` on a cold schedule (they refine its basin; a hot start would throw the warm
    start away) and the others start from random states.

    Settings:
        num_sweeps: sweeps per restart (one sweep = one proposal per movable variable).
        num_restarts: independent runs; the best is returned.
        beta_range: ``(beta_hot, beta_cold)`` in units of 1/energy for the random-start runs, or
            ``None`` to set it from the problem's scale (:func:`beta_range`).
        warm_beta_range: the same for the warm-start runs (``None``: from the scale around
            ``initial_state``).
        num_workers: threads running restarts in parallel (the kernel releases the GIL);
            ``None``: one per CPU. Results do not depend on it.
        time_limit_s: wall-time cap (``None``: none); the current best is returned when it hits.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 1)])
        >>> get_solver("anneal").solve(qp, seed=0).x.tolist()
        [0, 1, 0]
    """

    name = "anneal"
    parameters = {
        "num_sweeps": 1000,
        "num_restarts": 4,
        "beta_range": None,
        "warm_beta_range": None,
        "num_workers": None,
        "time_limit_s": None,
    }

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("num_sweeps", params["num_sweeps"])
        check_positive_int("num_restarts", params["num_restarts"])
        if params["num_workers"] is not None:
            check_positive_int("num_workers", params["num_workers"])
        for key in ("beta_range", "warm_beta_range"):
            betas = params[key]
            if betas is None:
                continue
            valid = (
                isinstance(betas, (tuple, list))
                and len(betas) == 2
                and all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in betas)
                and betas[0] <= betas[1]
            )
            if not valid:
                raise ValueError(
                    f"'{key}' should be None or a pair 0 < beta_hot <= beta_cold; got {betas!r}"
                )
            params[key] = (float(betas[0]), float(betas[1]))
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        start_time = time.perf_counter()
        deadline = None if time_limit_s is None else start_time + time_limit_s
        layout = group_layout(problem)
        n_restarts = self.params["num_restarts"]
        n_warm = 0 if initial_state is None else n_restarts - n_restarts // 4
        schedules = {"random": self.params["beta_range"] or beta_range(problem, seed=seed)}
        if n_warm:
            schedules["warm"] = self.params["warm_beta_range"] or beta_range(problem, initial_state, seed=seed)
        n_sweeps = self.params["num_sweeps"]
        betas = {key: np.geomspace(hot, cold, n_sweeps) for key, (hot, cold) in schedules.items()}
        # Time is checked between chunks of sweeps, never inside the compiled loop.
        chunk = n_sweeps if deadline is None else max(1, int(2e5 // max(layout.movable.size, 1)))
        run_seeds = np.random.SeedSequence(seed).generate_state(n_restarts)

        def run(restart: int) -> tuple[np.ndarray, float, bool] | None:
            if restart > 0 and deadline is not None and time.perf_counter() > deadline:
                return None
            warm = restart < n_warm
            rng = np.random.default_rng(int(run_seeds[restart]))
            x = initial_state.copy() if warm else feasible_start(problem, rng)
            return self._run(problem, layout, x, betas["warm" if warm else "random"], chunk, deadline,
                             int(run_seeds[restart]) % (2**31 - 1))

        workers = min(self.params["num_workers"] or os.cpu_count() or 1, n_restarts)
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(run, range(n_restarts)))
        else:
            results = [run(restart) for restart in range(n_restarts)]
        done = [result for result in results if result is not None]
        best_x, best_energy, _ = min(done, key=lambda item: item[1])
        info = {
            "status": "FEASIBLE",
            "restarts": len(done),
            "warm_restarts": sum(1 for restart, r in enumerate(results) if r is not None and restart < n_warm),
            "beta_range": schedules["random"],
            "warm_beta_range": schedules.get("warm"),
            "timed_out": any(result[2] for result in done) or len(done) < n_restarts,
        }
        return best_x, info

    @staticmethod
    def _run(
        problem: CardinalityQP,
        layout: GroupLayout,
        x: np.ndarray,
        schedule: np.ndarray,
        chunk: int,
        deadline: float | None,
        seed: int,
    ) -> tuple[np.ndarray, float, bool]:
        """One annealing run from ``x`` then a swap descent; returns (x, energy, timed_out)."""
        Q = problem.Q
        ones, zeros, pos = AnnealSolver._buffers(x, layout)
        field = Q @ x.astype(np.float64)
        energy = float(x @ field)
        best_x, best_energy = x.copy(), energy
        timed_out = False
        for offset in range(0, schedule.size, chunk):
            energy, best_energy = _anneal_kernel(
                Q, x, field, energy, schedule[offset : offset + chunk], layout.movable,
                layout.group_of, ones, zeros, pos, layout.start, layout.ks, layout.size,
                best_x, best_energy, seed if offset == 0 else -1,
            )
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                break
        polished, _ = swap_descent(problem, best_x, layout=layout)
        return polished, problem.energy(polished), timed_out

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
