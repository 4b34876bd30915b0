"""Cardinality-preserving simulated annealing (registry name ``anneal``), for strongly coupled blocks.

Every state is feasible: a move swaps a selected and an unselected variable inside one group, or
flips a free variable (energy changes as in :mod:`solvers.local_search`). The local field
``F = Q x`` is updated in O(n) per accepted move, so a proposal costs O(1). A proposal picks a
movable variable uniformly; a free one is flipped, and in a group a (selected, unselected) pair of
that group is swapped. The inverse temperature follows a geometric schedule from ``beta_hot`` to
``beta_cold``, set from the problem's own scale (quantiles of |dE| over random moves), which makes
the run invariant to rescaling ``Q`` (the same effect as rescaling to unit mean |entry|).

Focused proposals (setting ``focus_window``). A swap ``i -> j`` costs ``r_i + a_j - 2 Q_ij`` with
``r_i`` the cost of removing ``i`` alone and ``a_j`` that of adding ``j``. On block-like problems
the coupling term is small at the temperatures that matter, so a swap can only be accepted when
``r_i`` and ``a_j`` are both near their group's minimum, and late in a plain run almost every
uniform proposal is rejected. Four times per sweep the run therefore keeps as candidates the
selected ``i`` with ``beta (r_i + min a) <= focus_window`` and the unselected ``j`` with
``beta (a_j + min r) <= focus_window``, and draws pairs among those only; every proposal still
gets the exact Metropolis test, so this changes which moves are tried, not which are accepted.
Hot, every variable is a candidate, so this is plain annealing.

The restarts run as a population: the schedule is cut into ``population_steps`` segments and after
each one the worst quarter of the runs continue from copies of the best (truncation selection,
the idea of population annealing), each with its own random stream, so the search effort goes to
the most promising basins. ``population_steps=1`` gives independent restarts. With a warm start
the schedule's temperature is first picked by a short pilot (setting ``warm_heats``), because the
scale measured around the warm start is too cold for small blocks and too hot for large ones. The
best state seen is polished with a swap descent. The kernel is compiled with numba
(``cache=True``); the first call in a fresh environment pays the compile time once.

The settings' defaults and the design choices above were measured on block-like problems; the
figures are in docs/BENCHMARKS.md ("Anneal design measurements").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from solvers.base import Solver, check_positive_int, feasible_start, is_positive_number
from solvers.local_search import GroupLayout, group_layout, swap_descent
from solvers.problems import CardinalityQP

__all__ = ["AnnealSolver", "beta_range"]

logger = logging.getLogger(__name__)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# The largest value _exponential can return (U >= 2**-53): a move with beta * dE above it is
# rejected without drawing, which is exact and skips most draws on a cold schedule.
_MAX_EXPONENTIAL = 53.0 * math.log(2.0)
# Share of the population replaced at each selection (a quarter beat a half and independent runs;
# docs/BENCHMARKS.md, "Anneal design measurements").
_REPLACED_FRACTION = 0.25
# Runs per heat in the warm-schedule pilot (AnnealSolver setting ``warm_heats``).
_PILOT_RUNS = 2
# Default pilot heats, and the size above which a colder one is tried too (AnnealSolver).
_WARM_HEATS = (1.0, 10.0, 30.0)
_COLD_HEAT_ABOVE = 1536
# Relative drop of the best energy that counts as progress for the ``patience`` stop.
_IMPROVEMENT = 1e-9
# Temperature stages per sweep; a focused run picks its candidates at the start of each stage.
_STAGES_PER_SWEEP = 4


@numba.njit(inline="always")
def _next_u64(state):  # pragma: no cover - compiled
    """splitmix64: advance ``state[0]`` and return 64 well-mixed bits."""
    z = state[0] + _GOLDEN
    state[0] = z
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _below(state, m):  # pragma: no cover - compiled
    """An int in [0, m) (multiply-shift on 32 bits; bias below m / 2**32)."""
    return np.int64(((_next_u64(state) >> np.uint64(32)) * np.uint64(m)) >> np.uint64(32))


@numba.njit(inline="always")
def _exponential(state):  # pragma: no cover - compiled
    """A standard exponential variate, -log(U) with U uniform on (0, 1]."""
    return -math.log(1.0 - np.float64(_next_u64(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0))


@numba.njit(inline="always")
def _accept(delta, inv_beta, state):  # pragma: no cover - compiled
    """Metropolis test at temperature ``inv_beta``; draws only when acceptance is possible."""
    return delta <= _MAX_EXPONENTIAL * inv_beta and delta <= _exponential(state) * inv_beta


@numba.njit(cache=True, nogil=True)
def _focus(F, diag, ones, zeros, start, ks, size, n_ones, n_zeros, limit):  # pragma: no cover - compiled
    # Moves the candidates of every group to the front of its buffers and counts them. A
    # selected i is a candidate when removing it plus the cheapest single addition in the group
    # costs at most ``limit`` (r_i + a_min <= limit, r_i = Q_ii - 2 F_i, a_j = Q_jj + 2 F_j);
    # an unselected j likewise when a_j + r_min <= limit. A swap costs r_i + a_j - 2 Q_ij.
    for g in range(start.shape[0]):
        lo = start[g]
        k = ks[g]
        m = size[g] - k
        r_min = np.inf
        for a in range(lo, lo + k):
            r_min = min(r_min, diag[ones[a]] - 2.0 * F[ones[a]])
        a_min = np.inf
        for b in range(lo, lo + m):
            a_min = min(a_min, diag[zeros[b]] + 2.0 * F[zeros[b]])
        count = 0
        for a in range(lo, lo + k):
            i = ones[a]
            if diag[i] - 2.0 * F[i] + a_min <= limit:
                ones[a] = ones[lo + count]
                ones[lo + count] = i
                count += 1
        n_ones[g] = count
        count = 0
        for b in range(lo, lo + m):
            j = zeros[b]
            if diag[j] + 2.0 * F[j] + r_min <= limit:
                zeros[b] = zeros[lo + count]
                zeros[lo + count] = j
                count += 1
        n_zeros[g] = count


@numba.njit(cache=True, nogil=True)
def _anneal_kernel(
    Q, diag, x, F, energy, betas, stage_moves, window, movable, group_of, ones, zeros, start, ks,
    size, n_ones, n_zeros, best_x, best_energy, state,
):  # pragma: no cover - compiled
    # One stage per entry of ``betas``: ``stage_moves`` proposals at that temperature. With a
    # finite ``window`` the candidates (see _focus) are picked at the start of each stage and a
    # group's pairs are drawn among them only; the lists go stale during the stage (an accepted
    # swap leaves i and j in the candidates' slots), which is cheap and, with the exact
    # Metropolis test on every proposal, harmless. With ``window = inf`` every pair is drawn.
    # The generator lives in ``state`` (one uint64 per run), so a run does not depend on which
    # thread executes it, and it continues across chunked calls. Metropolis acceptance
    # "u < exp(-beta dE)" is written as "dE <= E / beta" with E = -log(u) exponential, which also
    # accepts every downhill move.
    n = x.shape[0]
    n_movable = movable.shape[0]
    focused = np.isfinite(window)
    if not focused:
        n_ones[:] = ks
        n_zeros[:] = size - ks
    for stage in range(betas.shape[0]):
        inv_beta = 1.0 / betas[stage]
        if focused:
            _focus(F, diag, ones, zeros, start, ks, size, n_ones, n_zeros, window * inv_beta)
        for _ in range(stage_moves):
            p = movable[_below(state, n_movable)]
            g = group_of[p]
            if g < 0:
                s = 1.0 - 2.0 * x[p]
                delta = 2.0 * s * F[p] + diag[p]
                if _accept(delta, inv_beta, state):
                    x[p] = 1 - x[p]
                    for t in range(n):
                        F[t] += s * Q[p, t]
                    energy += delta
            elif n_ones[g] > 0 and n_zeros[g] > 0:
                # p only picks the group (with probability size/n_movable); the pair is uniform
                # over its (selected, unselected) candidates.
                a = start[g] + _below(state, n_ones[g])
                b = start[g] + _below(state, n_zeros[g])
                i = ones[a]
                j = zeros[b]
                delta = 2.0 * (F[j] - F[i]) + diag[i] + diag[j] - 2.0 * Q[i, j]
                if _accept(delta, inv_beta, state):
                    x[i] = 0
                    x[j] = 1
                    ones[a] = j
                    zeros[b] = i
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
    grouped = np.flatnonzero(~free)
    p = picks[grouped]
    g = layout.group_of[p]
    ones, zeros = _buffers(x, layout)
    selected = x[p] == 1
    # A random member of the opposite value in the same group (movable groups have 0 < k < size).
    counts = np.where(selected, layout.size[g] - layout.ks[g], layout.ks[g])
    slots = layout.start[g] + np.floor(rng.random(p.size) * counts).astype(np.int64)
    q = np.where(selected, zeros[slots], ones[slots])
    i, j = np.where(selected, p, q), np.where(selected, q, p)
    deltas[grouped] = 2.0 * (field[j] - field[i]) + diag[i] + diag[j] - 2.0 * Q[i, j]
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


@numba.njit(cache=True, nogil=True)
def _anneal_runs(
    runs, lo, hi, Q, diag, X, F, energy, betas, stage_moves, window, movable, group_of, ones,
    zeros, start, ks, size, n_ones, n_zeros, best_x, best_energy, states,
):  # pragma: no cover - compiled
    # Stages lo:hi of every run listed in ``runs`` (rows of the stacked arrays, see _Runs): one
    # compiled call per batch instead of one Python call per run and segment.
    for r in runs:
        energy[r], best_energy[r] = _anneal_kernel(
            Q, diag, X[r], F[r], energy[r], betas[r, lo:hi], stage_moves, window, movable,
            group_of, ones[r], zeros[r], start, ks, size, n_ones[r], n_zeros[r], best_x[r],
            best_energy[r], states[r : r + 1],
        )


@dataclasses.dataclass
class _Runs:
    """The population's runs, one row each: state, local field, group buffers, energies,
    schedule and random stream (one uint64)."""

    x: np.ndarray
    field: np.ndarray
    ones: np.ndarray
    zeros: np.ndarray
    energy: np.ndarray
    betas: np.ndarray
    states: np.ndarray
    best_x: np.ndarray
    best_energy: np.ndarray
    n_ones: np.ndarray
    n_zeros: np.ndarray

    def select(self) -> None:
        """Truncation selection: the worst quarter continue from copies of the best runs (each
        keeps its own random stream)."""
        order = np.argsort(self.energy, kind="stable")
        keep = self.energy.size - int(self.energy.size * _REPLACED_FRACTION)
        losers = order[keep:]
        winners = order[np.arange(losers.size) % keep]
        for array in (self.x, self.field, self.ones, self.zeros, self.energy, self.betas):
            array[losers] = array[winners]


class _Population:
    """Runs populations of annealing runs on one problem and keeps the best state any visits."""

    def __init__(
        self,
        problem: CardinalityQP,
        layout: GroupLayout,
        window: float,
        deadline: float | None,
        workers: int | None,
    ) -> None:
        self.problem, self.layout, self.window, self.deadline = problem, layout, window, deadline
        self.stage_moves = max(1, -(-layout.movable.size // _STAGES_PER_SWEEP))
        self.diag = np.ascontiguousarray(np.diag(problem.Q))
        self.best_x: np.ndarray | None = None
        self.best_energy = math.inf
        self.timed_out = False
        self.stopped_after: float | None = None
        self.workers = workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=self.workers) if self.workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def run(
        self,
        starts: list[tuple[np.ndarray, np.ndarray]],
        seeds: np.random.SeedSequence,
        steps: int,
        patience: int | None = None,
    ) -> float:
        """Anneal one run per ``(x, betas)`` (one stage per beta, the same count for all),
        selecting ``steps - 1`` times; return the best energy these runs reach. With
        ``patience``, stop once that many segments in a row have not lowered the best energy
        (``stopped_after`` records the share of the schedule that ran).

        Energies here leave out the problem's offset. The best state of every call is kept in
        ``best_x``/``best_energy``.
        """
        runs = self._start(starts, seeds)
        own_best = float(runs.energy.min())
        self._keep_best(runs.x, runs.energy)
        if self.timed_out:
            return own_best
        n_stages = runs.betas.shape[1]
        steps = min(steps, n_stages)
        bounds = np.linspace(0, n_stages, steps + 1).round().astype(np.int64)
        # A few batches per worker balance the load; time is checked between chunks of stages
        # (about 2e5 proposals per batch), never inside the compiled loop.
        batches = np.array_split(np.arange(len(starts)), min(len(starts), 2 * self.workers))
        layout = self.layout

        def advance(batch: np.ndarray, lo: int, hi: int) -> bool:
            runs.best_energy[batch] = math.inf
            chunk = hi - lo
            if self.deadline is not None:
                chunk = max(1, int(2e5 // (self.stage_moves * batch.size)))
            for offset in range(lo, hi, chunk):
                _anneal_runs(
                    batch, offset, min(offset + chunk, hi), self.problem.Q, self.diag, runs.x,
                    runs.field, runs.energy, runs.betas, self.stage_moves, self.window,
                    layout.movable, layout.group_of, runs.ones, runs.zeros, layout.start,
                    layout.ks, layout.size, runs.n_ones, runs.n_zeros, runs.best_x,
                    runs.best_energy, runs.states,
                )
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    return False
            return True

        stalled = 0
        for step in range(steps):
            lo, hi = int(bounds[step]), int(bounds[step + 1])
            previous = own_best
            if self.pool is None:
                finished = [advance(batch, lo, hi) for batch in batches]
            else:
                finished = list(self.pool.map(lambda batch: advance(batch, lo, hi), batches))
            own_best = min(own_best, float(runs.best_energy.min()))
            self._keep_best(runs.best_x, runs.best_energy)
            if not all(finished):
                self.timed_out = True
                break
            stalled = 0 if own_best < previous - _IMPROVEMENT * abs(previous) else stalled + 1
            if patience is not None and stalled >= patience and step < steps - 1:
                self.stopped_after = (step + 1) / steps
                break
            if step < steps - 1:
                runs.select()
        return own_best

    def _keep_best(self, states: np.ndarray, energies: np.ndarray) -> None:
        best = int(np.argmin(energies))
        if energies[best] < self.best_energy:
            self.best_x, self.best_energy = states[best].copy(), float(energies[best])

    def _start(self, starts: list[tuple[np.ndarray, np.ndarray]], seeds: np.random.SeedSequence) -> _Runs:
        """The runs at ``starts`` with random streams seeded from ``seeds``."""
        x = np.stack([state for state, _ in starts])
        # The runs mostly share one start (the warm start): one O(n^2) field per distinct state.
        fields: dict[bytes, np.ndarray] = {}
        field = np.empty(x.shape)
        for row, state in enumerate(x):
            key = state.tobytes()
            if key not in fields:
                fields[key] = self.problem.Q @ state.astype(np.float64)
            field[row] = fields[key]
        buffers = [_buffers(state, self.layout) for state in x]
        n_groups = self.layout.start.size
        return _Runs(
            x=x,
            field=field,
            ones=np.stack([ones for ones, _ in buffers]),
            zeros=np.stack([zeros for _, zeros in buffers]),
            energy=np.array([state @ row for state, row in zip(x, field)]),
            betas=np.stack([betas for _, betas in starts]),
            states=seeds.generate_state(len(starts), dtype=np.uint64),
            best_x=x.copy(),
            best_energy=np.full(len(starts), math.inf),
            n_ones=np.zeros((len(starts), n_groups), dtype=np.int64),
            n_zeros=np.zeros((len(starts), n_groups), dtype=np.int64),
        )


def _buffers(x: np.ndarray, layout: GroupLayout) -> tuple[np.ndarray, np.ndarray]:
    """Per-group lists of selected and unselected members (group g at ``layout.start[g]``)."""
    total = layout.members.size
    ones = np.zeros(total, dtype=np.int64)
    zeros = np.zeros(total, dtype=np.int64)
    for g in range(layout.start.size):
        lo = int(layout.start[g])
        group = layout.members[lo : lo + int(layout.size[g])]
        selected, unselected = group[x[group] == 1], group[x[group] == 0]
        ones[lo : lo + selected.size] = selected
        zeros[lo : lo + unselected.size] = unselected
    return ones, zeros


class AnnealSolver(Solver):
    """Simulated annealing with swap moves that keep every cardinality constraint.

    Without ``initial_state`` every run starts from a random feasible state on the schedule of
    :func:`beta_range`. With it, ``num_restarts - random_restarts`` runs start from
    ``initial_state`` on a cold schedule (they refine its basin; a hot start would throw the warm
    start away) and ``random_restarts`` start from random states. The default is no random
    starts with a warm start: from the current mask, random-start runs of the same length end
    higher and take longer (far more accepted moves while hot). The runs form a population (see
    the module docstring).

    Settings:
        num_sweeps: sweeps per run (one sweep = as many proposals as movable variables, in
            four temperature stages).
        num_restarts: runs in the population; the best state any of them visits is returned.
        random_restarts: how many runs start from a random state when ``initial_state`` is given
            (0 to ``num_restarts``).
        population_steps: segments of the schedule; after each but the last the worst quarter
            of the runs are replaced by copies of the best. 1: independent restarts.
        beta_range: ``(beta_hot, beta_cold)`` in units of 1/energy for the random-start runs, or
            ``None`` to set it from the problem's scale (:func:`beta_range`).
        warm_beta_range: the same for the warm-start runs (``None``: from the scale around
            ``initial_state``).
        warm_heats: temperature multipliers tried for the warm schedule when
            ``warm_beta_range`` is ``None``: a pilot of two short runs (a quarter of the schedule)
            per value picks the one whose runs end lowest, and the population uses it. The scale
            around the warm start suits n = 1024 Fisher blocks (heat 1), is too cold for small
            blocks and too hot for large ones. ``None`` (default): 1, 10 and 30, and also 0.3
            above 1536 movable variables (offering 0.3 at n = 1024 lets the short pilot pick it
            wrongly).
        focus_window: draw swaps only among candidates within this many kT of their group's
            cheapest move (module docstring); ``None``: uniform pairs (plain annealing). Smaller
            is greedier.
        patience: stop the population once this share of its segments in a row has not
            lowered the best energy (``None``: always run the whole schedule); ``stopped_after``
            in the info says which share of the schedule ran. Blocks whose best energy keeps
            dropping until late run the whole schedule; near-separable ones, which a swap
            descent solves, stop early.
        num_workers: threads running the population (the kernel releases the GIL); ``None``: one
            per CPU. Results do not depend on it.
        time_limit_s: wall-time cap (``None``: none); the best state so far is returned when it
            hits (checked between segments and chunks of stages).

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 1)])
        >>> get_solver("anneal").solve(qp, seed=0).x.tolist()
        [0, 1, 0]
    """

    name = "anneal"
    parameters = {
        "num_sweeps": 80,
        "num_restarts": 96,
        "random_restarts": 0,
        "population_steps": 60,
        "warm_heats": None,
        "focus_window": 6.0,
        "patience": 0.25,
        "beta_range": None,
        "warm_beta_range": None,
        "num_workers": None,
        "time_limit_s": None,
    }

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("num_sweeps", params["num_sweeps"])
        check_positive_int("num_restarts", params["num_restarts"])
        check_positive_int("population_steps", params["population_steps"])
        check_positive_int("random_restarts", params["random_restarts"], allow_zero=True)
        if params["random_restarts"] > params["num_restarts"]:
            raise ValueError(
                f"'random_restarts' should be at most num_restarts={params['num_restarts']}; "
                f"got {params['random_restarts']}"
            )
        if params["num_workers"] is not None:
            check_positive_int("num_workers", params["num_workers"])
        patience = params["patience"]
        if patience is not None and not (is_positive_number(patience) and patience <= 1):
            raise ValueError(f"'patience' should be None or a number in (0, 1]; got {patience!r}")
        window = params["focus_window"]
        if window is not None and not (is_positive_number(window) or window == math.inf):
            raise ValueError(f"'focus_window' should be None or a positive number; got {window!r}")
        heats = params["warm_heats"]
        if heats is not None:
            if not (isinstance(heats, (tuple, list)) and heats and all(is_positive_number(h) for h in heats)):
                raise ValueError(
                    f"'warm_heats' should be None or a non-empty list of positive numbers; got {heats!r}"
                )
            params["warm_heats"] = tuple(float(h) for h in heats)
        for key in ("beta_range", "warm_beta_range"):
            betas = params[key]
            if betas is None:
                continue
            valid = (
                isinstance(betas, (tuple, list))
                and len(betas) == 2
                and all(is_positive_number(b) for b in betas)
                and betas[0] <= betas[1]
            )
            if not valid:
                raise ValueError(
                    f"'{key}' should be None or a pair 0 < beta_hot <= beta_cold; got {betas!r}"
                )
            params[key] = (float(betas[0]), float(betas[1]))
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
        layout = group_layout(problem)
        n_runs = self.params["num_restarts"]
        n_warm = 0 if initial_state is None else n_runs - self.params["random_restarts"]
        n_stages = self.params["num_sweeps"] * _STAGES_PER_SWEEP
        window = self.params["focus_window"]
        window = math.inf if window is None else float(window)
        schedules = {}
        if n_warm < n_runs:
            schedules["random"] = self.params["beta_range"] or beta_range(problem, seed=seed)
        if n_warm:
            schedules["warm"] = self.params["warm_beta_range"] or beta_range(
                problem, initial_state, seed=seed
            )
        seeds = np.random.SeedSequence(seed)
        population = _Population(problem, layout, window, deadline, self.params["num_workers"])
        heats = self.params["warm_heats"] or (
            _WARM_HEATS if layout.movable.size <= _COLD_HEAT_ABOVE else (0.3, *_WARM_HEATS)
        )
        chosen = heats[0] if self.params["warm_beta_range"] is None else 1.0
        pilot: dict[float, float] = {}
        try:
            if n_warm and len(heats) > 1 and self.params["warm_beta_range"] is None:
                # Pilot: a few short independent runs per heat; the full population then uses the
                # heat whose pilot reached the lowest energy (ties go to the first listed).
                hot, cold = schedules["warm"]
                pilot_stages = max(1, n_stages // 4)
                for heat in heats:
                    betas = np.geomspace(hot / heat, cold / heat, pilot_stages)
                    starts = [(initial_state.copy(), betas) for _ in range(_PILOT_RUNS)]
                    pilot[heat] = population.run(starts, seeds.spawn(1)[0], 1)
                chosen = min(heats, key=lambda heat: pilot[heat])
            starts = []
            run_seeds = seeds.spawn(1)[0]
            rngs = [np.random.default_rng(child) for child in run_seeds.spawn(n_runs)]
            betas = {key: np.geomspace(hot, cold, n_stages) for key, (hot, cold) in schedules.items()}
            for index in range(n_runs):
                if index < n_warm:
                    starts.append((initial_state.copy(), betas["warm"] / chosen))
                else:
                    starts.append((feasible_start(problem, rngs[index]), betas["random"]))
            steps, patience = self.params["population_steps"], self.params["patience"]
            patience_steps = None if patience is None else max(1, math.ceil(patience * steps))
            population.run(starts, run_seeds, steps, patience_steps)
        finally:
            population.close()
        polished, _ = swap_descent(problem, population.best_x, layout=layout)
        info = {
            "status": "FEASIBLE",
            "restarts": n_runs,
            "warm_restarts": n_warm,
            "beta_range": schedules.get("random"),
            "warm_beta_range": schedules.get("warm"),
            "warm_heat": chosen if n_warm else None,
            "pilot_energies": {heat: energy + problem.offset for heat, energy in pilot.items()},
            "timed_out": population.timed_out,
            "stopped_after": population.stopped_after,
        }
        return polished, info
