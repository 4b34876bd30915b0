"""Swap descent: best-improvement local search that keeps every cardinality constraint.

A move is either a swap inside a group (one selected variable ``i`` leaves, one unselected ``j``
enters) or a single flip of a free variable. With the local field ``F = Q x`` (symmetric ``Q``)
the energy changes are

* flip ``i`` (``s = 1 - 2 x_i``): ``dE = 2 s F_i + Q_ii``;
* swap ``i -> j`` (``x_i = 1``, ``x_j = 0``): ``dE = 2 (F_j - F_i) + Q_ii + Q_jj - 2 Q_ij``;

and ``F`` is updated in O(n) per applied move. Used alone (registry name ``swap-descent``) and as
the polish step of the other solvers (:func:`swap_descent`, :class:`solvers.composites.PolishComposite`).
The kernel is compiled with numba; a first call compiles it (cached on disk afterwards).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from solvers.base import Solver, check_positive_int, feasible_start
from solvers.exceptions import SolverUnavailableError
from solvers.problems import CardinalityQP

try:
    import numba
except ImportError as _exc:  # pragma: no cover - numba is a hard dependency of the package
    raise SolverUnavailableError(
        "the compiled solvers need numba; install it with 'pip install numba'"
    ) from _exc

__all__ = ["GroupLayout", "SwapDescentSolver", "group_layout", "largest_coupling", "repair", "swap_descent"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Flat arrays describing the groups, as the compiled kernels want them.

    Attributes:
        group_of: (n,) int64, group of each variable, -1 if free.
        members: (n_grouped,) int64, the members of group 0, then group 1, ...
        start: (n_groups,) int64 offset of each group in ``members``.
        size: (n_groups,) int64 size of each group.
        ks: (n_groups,) int64 required counts.
        movable: int64 indices of variables that can change (free, or in a group with 0 < k < |G|).
    """

    group_of: np.ndarray
    members: np.ndarray
    start: np.ndarray
    size: np.ndarray
    ks: np.ndarray
    movable: np.ndarray


def group_layout(problem: CardinalityQP) -> GroupLayout:
    """Return the :class:`GroupLayout` of ``problem``."""
    groups = problem.groups
    sizes = np.array([group.size for group in groups], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if groups else np.zeros(0, np.int64)
    members = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)
    ks = np.asarray(problem.ks, dtype=np.int64)
    group_of = np.ascontiguousarray(problem.group_of, dtype=np.int64)
    movable_mask = group_of < 0
    for group, k in zip(groups, ks):
        if 0 < k < group.size:
            movable_mask[group] = True
    return GroupLayout(
        group_of=group_of, members=members, start=starts, size=sizes, ks=ks,
        movable=np.flatnonzero(movable_mask).astype(np.int64),
    )


@numba.njit(cache=True)
def _best_swap(Q, x, F, members, lo, hi, coupling, best, key, sel, r, uns, a):  # pragma: no cover - compiled
    # The best swap of the group at members[lo:hi] that beats ``best``: with r_i = Q_ii - 2 F_i (remove i)
    # and a_j = Q_jj + 2 F_j (add j), a swap costs r_i + a_j - 2 Q_ij >= r_i + a_j - 2 * coupling, so
    # scanning i and j in increasing r and a stops as soon as that bound passes ``best``. On near-separable
    # blocks (coupling << spread of r and a) only a few pairs are scored instead of k (|G| - k). Ties go
    # to the smallest (group, position of i, position of j), the order of an unsorted scan.
    # ``key`` holds (group, a, b, i, j) of the best move so far; -1 in key[3] means none, key[4] = -1 a flip.
    ns = 0
    nu = 0
    for pos in range(lo, hi):
        v = members[pos]
        if x[v] == 1:
            sel[ns] = pos
            r[ns] = Q[v, v] - 2.0 * F[v]
            ns += 1
        else:
            uns[nu] = pos
            a[nu] = 2.0 * F[v] + Q[v, v]
            nu += 1
    if ns == 0 or nu == 0:
        return best
    order_r = np.argsort(r[:ns])
    order_a = np.argsort(a[:nu])
    a_min = a[order_a[0]]
    group = key[0] if key[3] >= 0 else -1
    for p in range(ns):
        r_i = r[order_r[p]]
        bound = r_i + a_min - 2.0 * coupling
        if bound - best > 1e-12 * (abs(r_i) + abs(a_min) + 2.0 * coupling + abs(best)):
            break
        pos_i = sel[order_r[p]]
        i = members[pos_i]
        base = Q[i, i] - 2.0 * F[i]
        for q in range(nu):
            a_j = a[order_a[q]]
            bound = r_i + a_j - 2.0 * coupling
            if bound - best > 1e-12 * (abs(r_i) + abs(a_j) + 2.0 * coupling + abs(best)):
                break
            pos_j = uns[order_a[q]]
            j = members[pos_j]
            delta = base + 2.0 * F[j] + Q[j, j] - 2.0 * Q[i, j]
            better = delta < best
            if not better and delta == best and key[3] >= 0 and key[4] >= 0 and group == lo:
                better = pos_i < key[1] or (pos_i == key[1] and pos_j < key[2])
            if better:
                best = delta
                key[0] = lo
                key[1] = pos_i
                key[2] = pos_j
                key[3] = i
                key[4] = j
                group = lo
    return best


@numba.njit(cache=True)
def _swap_descent_kernel(Q, x, F, group_of, members, start, size, max_iters, tol, coupling):  # pragma: no cover
    n = x.shape[0]
    n_groups = start.shape[0]
    largest = 1
    for g in range(n_groups):
        largest = max(largest, size[g])
    sel = np.empty(largest, dtype=np.int64)
    uns = np.empty(largest, dtype=np.int64)
    r = np.empty(largest)
    a = np.empty(largest)
    key = np.empty(5, dtype=np.int64)
    moves = 0
    for _ in range(max_iters):
        best = -tol
        key[3] = -1
        for i in range(n):
            if group_of[i] < 0:
                s = 1.0 - 2.0 * x[i]
                delta = 2.0 * s * F[i] + Q[i, i]
                if delta < best:
                    best = delta
                    key[3] = i
                    key[4] = -1
        for g in range(n_groups):
            best = _best_swap(Q, x, F, members, start[g], start[g] + size[g], coupling, best, key, sel, r, uns, a)
        if key[3] < 0:
            break
        moves += 1
        best_i, best_j = key[3], key[4]
        if best_j < 0:
            s = 1.0 - 2.0 * x[best_i]
            x[best_i] = 1 - x[best_i]
            for t in range(n):
                F[t] += s * Q[best_i, t]
        else:
            x[best_i] = 0
            x[best_j] = 1
            for t in range(n):
                F[t] += Q[best_j, t] - Q[best_i, t]
    return moves


@numba.njit(cache=True)
def _largest_off_diagonal(Q, absolute):  # pragma: no cover - compiled
    largest = 0.0
    for i in range(Q.shape[0]):
        for j in range(Q.shape[1]):
            value = abs(Q[i, j]) if absolute else Q[i, j]
            if i != j and value > largest:
                largest = value
    return largest


def largest_coupling(Q: np.ndarray, *, absolute: bool = False) -> float:
    """The largest off-diagonal entry of ``Q`` (of ``|Q|`` with ``absolute``), or 0 if none is positive.

    Swap costs ``r_i + a_j - 2 Q_ij`` are bounded below with it (the descent's pruning, and the
    separability score of :mod:`solvers.auto`).
    """
    return float(_largest_off_diagonal(np.ascontiguousarray(Q, dtype=np.float64), bool(absolute)))


def _tolerance(Q: np.ndarray) -> float:
    scale = float(np.abs(Q).max()) if Q.size else 0.0
    return 1e-12 * scale if scale > 0 else 1e-300


def swap_descent(
    problem: CardinalityQP,
    x: np.ndarray,
    *,
    max_iters: int = 100_000,
    layout: GroupLayout | None = None,
) -> tuple[np.ndarray, int]:
    """Run best-improvement swap/flip descent from a feasible ``x``.

    Args:
        problem: the problem.
        x: feasible (n,) 0/1 start (not modified).
        max_iters: most moves to apply.
        layout: precomputed :func:`group_layout` (optional).

    Returns:
        The local minimum (n,) int8 and the number of moves applied.
    """
    layout = layout or group_layout(problem)
    Q = problem.Q
    state = np.array(x, dtype=np.int8)
    field = Q @ state.astype(np.float64)
    moves = _swap_descent_kernel(
        Q, state, field, layout.group_of, layout.members, layout.start, layout.size,
        int(max_iters), _tolerance(Q), largest_coupling(Q),
    )
    return state, int(moves)


def repair(problem: CardinalityQP, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Make ``x`` feasible greedily: in each violated group add or remove, one at a time, the
    variable whose change costs the least energy.

    Args:
        problem: the problem.
        x: (n,) 0/1 vector, possibly infeasible (not modified).

    Returns:
        A feasible (n,) int8 vector and the number of flips made.
    """
    Q = problem.Q
    state = np.array(x, dtype=np.int8)
    field = Q @ state.astype(np.float64)
    diag = np.diag(Q)
    flips = 0
    for group, k in zip(problem.groups, problem.ks):
        excess = int(state[group].sum()) - int(k)
        while excess != 0:
            wanted = 1 if excess > 0 else 0  # the value of the variables we flip
            candidates = group[state[group] == wanted]
            sign = 1.0 - 2.0 * wanted
            deltas = 2.0 * sign * field[candidates] + diag[candidates]
            chosen = int(candidates[int(np.argmin(deltas))])
            state[chosen] = 1 - wanted
            field += sign * Q[chosen]
            excess += -1 if excess > 0 else 1
            flips += 1
    return state, flips


class SwapDescentSolver(Solver):
    """Best-improvement swap descent from ``initial_state`` and random feasible starts.

    Settings:
        num_restarts: random feasible starts (in addition to ``initial_state`` when given).
        max_iters: most moves per descent.
        time_limit_s: stop starting new descents after this many seconds (``None``: no limit).

    Example:
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP([[1.0, 0.0], [0.0, -1.0]], [([0, 1], 1)])
        >>> get_solver("swap-descent").solve(qp, seed=0).x.tolist()
        [0, 1]
    """

    name = "swap-descent"
    parameters = {"num_restarts": 4, "max_iters": 100_000, "time_limit_s": None}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("num_restarts", params["num_restarts"], allow_zero=True)
        check_positive_int("max_iters", params["max_iters"])
        return params

    def _solve(self, problem, initial_state, seed, time_limit_s):
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        layout = group_layout(problem)
        starts = [] if initial_state is None else [initial_state]
        best_x, best_energy, descents, moves = None, np.inf, 0, 0
        for restart in range(max(1, self.params["num_restarts"] + len(starts))):
            if best_x is not None and time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                break
            x0 = starts[restart] if restart < len(starts) else feasible_start(problem, rng)
            x, used = swap_descent(problem, x0, max_iters=self.params["max_iters"], layout=layout)
            descents += 1
            moves += used
            energy = problem.energy(x)
            if energy < best_energy:
                best_x, best_energy = x, energy
        return best_x, {"status": "FEASIBLE", "descents": descents, "moves": moves}
