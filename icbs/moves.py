"""From a round's estimates to applied moves: build each block problem, solve, accept, and undo.

A round's blocks sit in distinct layers, so their problems are built first, solved together (one after
another, or at the same time on ``bcd.workers`` workers: :mod:`icbs.executors`) and then applied; the
answers are the same in every case because each solve is seeded from its own step. A move is applied
only when the solver's answer is strictly better than the current mask under the block's model
(:func:`icbs.subproblem.acceptance_tolerance`), and every answer is checked against the block's
constraints first: the driver does not trust solvers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

import solvers
from icbs.config import DerivativesConfig
from icbs.derivatives import BlockEstimate
from icbs.exceptions import InfeasibleSolutionError, NonFiniteDerivativeError
from icbs.executors import Executor
from icbs.records import StepRecord
from icbs.schedule import Stream, step_seed
from icbs.state import PruningState
from icbs.subproblem import acceptance_tolerance, build_block_problem, x_to_keep

__all__ = ["BlockJob", "Move", "build_job", "solve_jobs", "apply_answer", "undo_moves", "changed_entries", "check_solution"]


@dataclasses.dataclass
class BlockJob:
    """One block problem of a round, ready for a solver."""

    layer: str
    index: Tensor  # (n,) long flat indices into the layer's weight
    step: int
    problem: solvers.CardinalityQP
    x_cur: np.ndarray  # (n,) int8, 1 = pruned now
    batch_loss: float


@dataclasses.dataclass
class Move:
    """An applied move: what to write back to undo it."""

    layer: str
    index: Tensor
    old_keep: Tensor  # (n,) bool keep values before the move


def changed_entries(state: PruningState, move: Move) -> Tensor:
    """The flat indices of ``move``'s block whose keep value the move flipped (the rows a refit must revisit)."""
    now = state[move.layer].keep_mask.view(-1)[move.index.to(state[move.layer].keep_mask.device)]
    return move.index[(now != move.old_keep.to(now.device)).to(move.index.device)]


def check_solution(x: Any, constraints: Sequence[tuple[np.ndarray, int]], n: int, layer: str, solver_name: str) -> np.ndarray:
    """Check a solver's answer against the block's constraints.

    Returns:
        ``(n,)`` int8 0/1 array.

    Raises:
        InfeasibleSolutionError: wrong shape, values other than 0/1, or a group count that is off.
    """
    array = np.asarray(x)
    if array.shape != (n,) or not np.all((array == 0) | (array == 1)):
        raise InfeasibleSolutionError(
            f"solver {solver_name!r} returned a malformed answer for a block of layer {layer!r} "
            f"(shape {array.shape}, expected ({n},) of 0/1)"
        )
    array = array.astype(np.int8)
    for positions, k in constraints:
        if int(array[positions].sum()) != int(k):
            raise InfeasibleSolutionError(
                f"solver {solver_name!r} broke a cardinality constraint in layer {layer!r}: "
                f"{int(array[positions].sum())} of {positions.size} weights pruned, {k} required; try another 'solver.name'"
            )
    return array


def build_job(state: PruningState, layer_name: str, index: Tensor, estimate: BlockEstimate, step: int,
              derivatives: DerivativesConfig) -> BlockJob:
    """The block problem of ``index`` in layer ``layer_name`` from its estimate (DESIGN.md §3).

    Raises:
        NonFiniteDerivativeError: the estimate holds NaN/Inf.
    """
    if not (np.all(np.isfinite(estimate.g)) and np.all(np.isfinite(estimate.H))):
        raise NonFiniteDerivativeError(
            f"the gradient/Hessian estimate of layer {layer_name!r} holds NaN/Inf; check loss_fn and the data "
            "(a NaN/Inf loss, input or weight)"
        )
    layer = state[layer_name]
    device_index = index.to(layer.keep_mask.device)
    # The problem's w0 is each weight's value-if-kept: the original weight, or the value an init such as
    # SparseGPT (or a refit) gave it (DESIGN.md §3 with w0 := the kept value).
    w0_block = layer.value_if_kept().view(-1)[device_index]
    w_block = layer.module.weight.detach().view(-1)[device_index]
    problem, x_cur = build_block_problem(
        estimate, w0_block, w_block, layer.keep_mask.view(-1)[device_index], state.block_groups(layer_name, index),
        alpha=derivatives.grad_multiplier, ridge=derivatives.ridge,
    )
    return BlockJob(layer_name, index, step, problem, x_cur, float(estimate.loss))


def _solve_one(solver: solvers.Solver, job: BlockJob, seed: int, time_limit_s: float | None) -> tuple[solvers.Solution, float]:
    mark = time.perf_counter()
    try:
        solution = solver.solve(job.problem, initial_state=job.x_cur, seed=step_seed(seed, job.step, stream=Stream.SOLVE),
                                time_limit_s=time_limit_s)
    except solvers.InfeasibleProblemError as err:
        raise InfeasibleSolutionError(f"solver {solver.name!r} failed on a block of layer {job.layer!r}: {err}") from err
    return solution, time.perf_counter() - mark


def solve_jobs(solver: solvers.Solver, jobs: list[BlockJob], seed: int, time_limit_s: float | None,
               executor: Executor) -> list[tuple[solvers.Solution, float]]:
    """Solve every job (seeded from its step) on ``executor``; answers in job order with their wall times."""
    return executor.map(lambda job: _solve_one(solver, job, seed, time_limit_s), jobs)


def apply_answer(state: PruningState, job: BlockJob, solution: solvers.Solution, solve_s: float,
                 record: StepRecord) -> Move | None:
    """Apply the answer when it is strictly better than the current mask; fill ``record``; return the move."""
    problem = job.problem
    x_new = check_solution(solution.x, problem.constraints, problem.n, job.layer, record.solver)
    predicted = float(problem.energy(x_new) - problem.energy(job.x_cur))
    changed = int(np.sum(x_new != job.x_cur))
    accept = changed > 0 and predicted < -acceptance_tolerance(problem)
    move = None
    if accept:
        old = state.apply_move(job.layer, job.index, x_to_keep(x_new))
        state.check_invariants(job.layer)
        state[job.layer].accepted += 1
        move = Move(job.layer, job.index, old)
    state.push_tabu(job.layer, job.index)
    record.k = int(sum(k for _, k in problem.constraints))
    record.predicted_delta = predicted
    record.energy = float(solution.energy)
    record.status = str(solution.info.get("status", "FEASIBLE"))
    record.solve_time_s = solve_s
    record.accepted = accept
    record.n_changed = changed if accept else 0
    record.batch_loss = job.batch_loss
    return move


def undo_moves(state: PruningState, moves: Sequence[Move]) -> None:
    """Put every move's old keep values back, newest first."""
    for move in reversed(moves):
        state.apply_move(move.layer, move.index, move.old_keep)
        state.check_invariants(move.layer)
        state[move.layer].accepted -= 1
