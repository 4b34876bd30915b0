"""The block-coordinate-descent driver (paper Fig. 2; DESIGN.md §5) and :func:`prune`.

The driver orchestrates; each step it calls lives in the module of its concept. A run validates
everything before touching the model, initialises the masks (:mod:`icbs.initialise`), then repeats
rounds until the time budget, ``bcd.max_steps``, ``bcd.max_epochs`` or a pass without an improving move
(:mod:`icbs.schedule`). One round reads top to bottom:

1. estimate: pick a block in each of the round's layers and estimate ``g`` and ``H`` from one
   derivative pass (:mod:`icbs.selection`);
2. build: each block's cardinality-constrained QUBO (:func:`icbs.moves.build_job`);
3. solve: all of the round's blocks, on ``bcd.workers`` workers (:mod:`icbs.executors`);
4. accept: apply the answers that are strictly better under their block's model (:func:`icbs.moves.apply_answer`);
5. check: undo the round if the true loss rose (:mod:`icbs.round_check`);
6. record: one :class:`~icbs.records.StepRecord` per block, to the history and the callbacks.

Checkpoints (:mod:`icbs.checkpoint`) carry the state, the schedule's :class:`~icbs.schedule.Cursor`, the
records and the RNG states, so a resumed run repeats an uninterrupted one. On any error the model gets
its dense weights back; on Ctrl-C (KeyboardInterrupt) a checkpoint is written first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import solvers
from icbs import checkpoint as ckpt
from icbs.config import IcbsConfig
from icbs.executors import Executor, make_executor
from icbs.initialise import DenseStatistics, dense_start, initialise_masks
from icbs.models.base import model_device
from icbs.moves import Move, apply_answer, build_job, changed_entries, solve_jobs, undo_moves
from icbs.pool import SamplePool, check_calibration
from icbs.preflight import check_arguments, pruning_state, resolve_solver
from icbs.records import EvalRecord, PruneResult, RunHooks, RunLog, SolverStats, StepRecord
from icbs.refit import Refitter, RowRefit, refit_state
from icbs.round_check import RoundCheck
from icbs.schedule import Clock, Cursor, deferred_interrupts, layer_schedule, stop_reason
from icbs.selection import BlockChooser
from icbs.state import PruningState, mask_densities

__all__ = ["PruneResult", "prune", "RunHooks"]  # PruneResult and RunHooks live in icbs.records

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
Record = StepRecord | EvalRecord


class _Driver:
    """One run's loop and the bookkeeping a checkpoint carries."""

    def __init__(self, model: nn.Module, cfg: IcbsConfig, pool: SamplePool, loss_fn: LossFn,
                 layers: dict[str, nn.Module], state: PruningState, solver: solvers.Solver, hooks: RunHooks) -> None:
        self.model, self.cfg, self.pool, self.loss_fn = model, cfg, pool, loss_fn
        self.layers, self.state, self.solver, self.hooks = layers, state, solver, hooks
        self.sizes = {name: module.weight.numel() for name, module in layers.items()}
        self.log = RunLog(Cursor(), SolverStats(solver.name))
        self.clock = Clock()
        self.stats = DenseStatistics()
        self.check = RoundCheck(cfg.bcd.check, model, loss_fn, pool, cfg.bcd.check_z)
        self.executor: Executor = make_executor(cfg.bcd.executor, cfg.bcd.workers, cfg.bcd.ray_address)
        self.chooser: BlockChooser | None = None
        self.refitter: Refitter | None = None
        self.ready = False  # the masks hold an init or a checkpoint's state (a checkpoint may be written)

    # ------------------------------------------------------------------ start
    def start(self, saved: Mapping[str, Any] | None) -> bool:
        """Dense statistics and layer densities, then the init or the checkpoint's state; whether that run finished."""
        self.clock.start()
        mark = time.perf_counter()
        self.stats = dense_start(self.model, self.layers, self.state, self.pool, self.loss_fn, self.cfg)
        self.chooser = BlockChooser(
            self.model, self.layers, self.state, self.loss_fn, scoring=self.cfg.scoring, blocks=self.cfg.blocks,
            derivatives=self.cfg.derivatives, seed=self.cfg.bcd.seed, act_norms=self.stats.act_norms,
            layer_inputs=self.stats.layer_inputs,
        )
        if self.cfg.bcd.refit == "rounds":
            assert self.stats.layer_inputs is not None
            self.refitter = Refitter(self.stats.layer_inputs, self.cfg.bcd.refit_damping)
        if saved is not None:
            self.ready = True
            return self.load(saved)
        initialise_masks(self.model, self.layers, self.state, self.pool, self.loss_fn, self.cfg, self.stats)
        log = self.log
        log.init_loss = self.pool.reported_loss(self.model, self.loss_fn)
        if not math.isfinite(log.init_loss):
            logger.warning("calibration loss after init is %s; check loss_fn", log.init_loss)
        log.timings["init_s"] = time.perf_counter() - mark
        self.ready = True
        densities = mask_densities(self.state.masks())
        logger.info("init (%s, %s): calibration loss %.6g, density %.4f (layers %.4f..%.4f)",
                    self.cfg.scoring.init_method, self.state.pattern, log.init_loss, densities.pop("total"),
                    min(densities.values()), max(densities.values()))
        if self.hooks.evaluate is not None:
            log.init_metrics = self.evaluate(force=True)
        self.save()
        return False

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Rounds until a stop or a pass without a move; Ctrl-C/SIGTERM act between rounds (consistent checkpoints)."""
        bcd, cursor, log = self.cfg.bcd, self.log.cursor, self.log
        last_checkpoint = time.monotonic()
        schedule = layer_schedule(self.sizes, bcd.min_steps_per_layer, bcd.seed, cursor.epoch)
        with deferred_interrupts() as interrupted:
            while True:
                log.stop_reason = stop_reason(bcd, self.clock.elapsed(), cursor)
                if log.stop_reason is not None:
                    break
                if cursor.pos >= len(schedule):
                    if cursor.epoch_accepted == 0:
                        log.stop_reason = "no_improvement"
                        break
                    cursor.start_epoch()
                    schedule = layer_schedule(self.sizes, bcd.min_steps_per_layer, bcd.seed, cursor.epoch)
                    continue
                names = cursor.next_round(schedule, bcd.blocks_per_round, bcd.max_steps)
                self.round(names)
                cursor.pos += len(names)
                if interrupted():
                    raise KeyboardInterrupt
                if self.hooks.progress is not None:
                    self.hooks.progress(self.clock.elapsed(), bcd.time_budget, cursor.step)
                if bcd.checkpoint_every_s is not None and time.monotonic() - last_checkpoint >= bcd.checkpoint_every_s:
                    self.save()
                    last_checkpoint = time.monotonic()
                self.evaluate()
        logger.info("stopped (%s) after %d steps, %d accepted", log.stop_reason, cursor.step, cursor.n_accepted)

    def round(self, names: list[str]) -> None:
        """One derivative pass serving one block in each of ``names`` (distinct layers)."""
        assert self.chooser is not None
        log = self.log
        first_step = log.cursor.step
        batch = self.pool.step_batch(first_step)
        chosen = self.chooser.choose(names, batch, first_step)  # 1. estimate
        log.timings["select_s"] += chosen.select_s
        log.timings["estimate_s"] += chosen.estimate_s
        share = chosen.estimate_s / max(len(chosen.estimates), 1)
        records = [StepRecord(first_step + i, log.cursor.epoch, name, int(chosen.index[name].numel()),
                              solver=self.solver.name, estimate_time_s=share) for i, name in enumerate(names)]
        jobs = [build_job(self.state, name, chosen.index[name], chosen.estimates[name], first_step + i,  # 2. build
                          self.cfg.derivatives) for i, name in enumerate(names) if name in chosen.estimates]
        for i, name in enumerate(names):
            self.state[name].steps += 1
            if name not in chosen.estimates:
                logger.debug("step %d: no block left in layer %s (all candidates tabu)", first_step + i, name)
        # Every round is checked against the true loss when it can be: single-block rounds when the pass
        # measured the batch loss (not layerwise), multi-block rounds always (their models ignore each other).
        check = bool(jobs) and (math.isfinite(jobs[0].batch_loss) or len(names) > 1)
        mark = time.perf_counter()
        check_on, before = self.check.before(first_step, batch, jobs[0].batch_loss) if check else ([], math.nan)
        log.timings["check_s"] += time.perf_counter() - mark
        budget = self.cfg.bcd.time_budget
        remaining = None if budget is None else max(budget - self.clock.elapsed(), 1e-3)
        answers = solve_jobs(self.solver, jobs, self.cfg.bcd.seed, remaining, self.executor)  # 3. solve
        by_layer = {record.layer: record for record in records}
        moves: list[Move] = []
        for job, (solution, solve_s) in zip(jobs, answers):  # 4. accept
            log.timings["solve_s"] += solve_s
            log.solver.add(str(solution.info.get("status", "FEASIBLE")), solve_s)
            move = apply_answer(self.state, job, solution, solve_s, by_layer[job.layer])
            moves += [move] if move is not None else []
        refits = self._refit(moves)
        if moves and check:  # 5. check
            mark = time.perf_counter()
            self._check_round(check_on, before, moves, refits, records)
            log.timings["check_s"] += time.perf_counter() - mark
        elif moves:
            self.check.forget()
        log.cursor.step += len(names)
        for record in records:  # 6. record
            log.cursor.count_accepted(int(record.accepted))
            record.elapsed_s = self.clock.elapsed()
            log.history.append(record)
            self._emit(record)
        log.cursor.end_round(sum(int(record.accepted) for record in records))

    def _refit(self, moves: list[Move]) -> list[RowRefit]:
        """Refit the rows the round's moves touched (``bcd.refit: rounds``)."""
        if self.refitter is None or not moves:
            return []
        mark = time.perf_counter()
        refits = self.refitter.refit_moves(self.state, {move.layer: changed_entries(self.state, move) for move in moves})
        self.log.timings["refit_s"] += time.perf_counter() - mark
        return refits

    def _check_round(self, check_on: list[dict[str, Tensor]], before: float, moves: list[Move],
                     refits: list[RowRefit], records: list[StepRecord]) -> None:
        passed, after = self.check.passes(check_on, before)
        if passed:
            return
        undo_moves(self.state, moves)
        Refitter.undo(self.state, refits)
        self.log.cursor.n_undone_rounds += 1
        for record in records:
            record.undone, record.accepted = record.accepted, False
        logger.info("round at step %d undone: %s loss %.6g -> %.6g", records[0].step, self.check.mode,
                    before, after)

    # ------------------------------------------------------------------ evaluation and events
    def _emit(self, record: Record) -> None:
        for callback in self.hooks.callbacks:
            callback(record)

    def evaluate(self, force: bool = False) -> dict[str, float] | None:
        """Evaluate when forced or ``eval_every_s`` has passed since the last evaluation; returns the metrics."""
        evaluate, every = self.hooks.evaluate, self.hooks.eval_every_s
        if evaluate is None:
            return None
        now = self.clock.elapsed()
        evaluations = self.log.evaluations
        if not force and (every is None or (evaluations and now - evaluations[-1].elapsed_s < every)):
            return None
        metrics = self.clock.paused(lambda: {k: float(v) for k, v in evaluate(self.model).items()})
        record = EvalRecord(now, self.log.cursor.step, metrics)
        evaluations.append(record)
        self._emit(record)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self, finished: bool = False) -> None:
        """Write a checkpoint (when the run has a path); its time does not count against the budget."""
        path = self.hooks.checkpoint_path
        if path is None or not self.ready:
            return
        driver = {**self.log.to_payload(), "seed": self.cfg.bcd.seed, "elapsed_s": self.clock.elapsed(),
                  "finished": finished}
        payload = {"state": self.state.state_dict(), "driver": driver, "rng": ckpt.rng_states(),
                   "config": self.cfg.to_dict()}
        self.clock.paused(lambda: ckpt.save_checkpoint(path, payload))

    def load(self, data: Mapping[str, Any]) -> bool:
        """Take over a checkpoint's state, cursor and records; return whether that run had finished."""
        ckpt.check_resumable(data.get("config", {}), self.cfg.to_dict())
        self.state.load_state_dict(data["state"])
        driver = data["driver"]
        self.log = RunLog.from_payload(driver, self.solver.name)
        self.clock = Clock(float(driver["elapsed_s"]))
        ckpt.set_rng_states(data["rng"])
        self.state.apply()
        logger.info("resumed at step %d (epoch %d, %.1f s elapsed)", self.log.cursor.step, self.log.cursor.epoch,
                    self.clock.elapsed_before)
        return bool(driver.get("finished", False))

    # ------------------------------------------------------------------ whole run
    def execute(self, saved: Mapping[str, Any] | None) -> PruneResult:
        """Start, loop, finish and report; dense weights back on any error (after a checkpoint on Ctrl-C)."""
        try:
            if not self.start(saved):
                self.run()
                self.finish()
            final_loss = self.pool.reported_loss(self.model, self.loss_fn)
            final_metrics = self.evaluate(force=True)
            self.save(finished=True)
            log = self.log
            logger.info("done: calibration loss %.6g -> %.6g, %d/%d steps accepted", log.init_loss, final_loss,
                        log.cursor.n_accepted, log.cursor.step)
            summary = log.summary(self.state, self.clock.elapsed(), self.cfg.derivatives.estimator, final_loss,
                                  final_metrics)
            return PruneResult(self.state.masks(), summary, list(log.history))
        except KeyboardInterrupt:
            self.save()
            logger.warning("interrupted at step %d; checkpoint kept (resume with the same command and --resume)",
                           self.log.cursor.step)
            self.state.restore()
            raise
        except BaseException:
            self.state.restore()
            raise
        finally:
            self.executor.close()
            self.solver.close()

    # ------------------------------------------------------------------ finish
    def finish(self) -> None:
        """The least-squares refit of every layer's kept weights at the end (``bcd.refit: end``)."""
        if self.cfg.bcd.refit == "end":
            mark = time.perf_counter()
            assert self.stats.layer_inputs is not None
            refit_state(self.state, self.stats.layer_inputs, self.cfg.bcd.refit_damping)
            self.log.timings["refit_s"] += time.perf_counter() - mark
        self.state.check_invariants()


def prune(
    model: nn.Module,
    config: IcbsConfig,
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    *,
    layers: Mapping[str, nn.Module] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every_s: float | None = None,
    callbacks: Sequence[Callable[[Record], None]] = (),
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[float, float | None, int], None] | None = None,
    solver: solvers.Solver | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``config.pruning.density`` by iterative combinatorial brain surgery.

    Everything is validated before the model is touched. The model is left pruned (zeros in the
    weights, re-fitted kept values where an init or ``bcd.refit`` set them) on success; on any
    error its dense weights are restored before the error propagates, after a checkpoint on Ctrl-C.

    Args:
        model: the model (eval mode), on its device.
        config: a validated :class:`~icbs.config.IcbsConfig`; reads ``pruning``, ``scoring``, ``blocks``,
            ``derivatives``, ``solver`` and ``bcd`` (and ``eval.every_s`` when ``eval_every_s`` is None).
        calibration: batches (``dict[str, Tensor]``, same keys); per-round samples are drawn from all of them.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses.
        layers: ``{name: nn.Linear}`` to prune; default :func:`icbs.layers.find_prunable` with
            ``config.model.include``/``exclude``.
        evaluate: ``evaluate(model) -> {metric: value}``, called after init, every ``eval_every_s``
            seconds and at the end (its time is not counted against the budget).
        eval_every_s: seconds between evaluations (default ``config.eval.every_s``).
        callbacks: called with each :class:`~icbs.records.StepRecord` and :class:`~icbs.records.EvalRecord`.
        checkpoint_path: file written atomically every ``bcd.checkpoint_every_s`` seconds and at the end.
        resume: continue the run saved at ``checkpoint_path`` (the model must hold its dense weights).
        progress: ``progress(elapsed_s, budget_s, step)`` after every round (e.g. a tqdm bar).
        solver: a constructed :class:`solvers.Solver` to use instead of ``config.solver`` (e.g. a composite
            that records every block problem); it is closed at the end like one built here.

    Returns:
        A :class:`PruneResult`.

    Raises:
        ConfigError: an invalid config value.
        ValueError / TypeError: bad arguments (unknown layer pattern, a non-prunable layer,
            ``blocks.block_size`` larger than a layer's free weights, a mismatching checkpoint).
        NonFiniteDerivativeError: a gradient or Hessian estimate holds NaN/Inf.
        InfeasibleSolutionError: a solver answer broke a cardinality constraint.
    """
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    hooks = RunHooks(evaluate, config.eval.every_s if eval_every_s is None and isinstance(config, IcbsConfig)
                     else eval_every_s, tuple(callbacks), path, progress)
    check_arguments(model, config, loss_fn, hooks, resume)
    batches = check_calibration(calibration, config.calibration.targets)
    state = pruning_state(model, config, layers)
    chosen = {name: state[name].module for name in state}
    solver = resolve_solver(config, solver)
    saved = ckpt.load_checkpoint(path) if resume and path is not None else None
    pool = SamplePool.from_config(batches, model_device(model), config)
    driver = _Driver(model, config, pool, loss_fn, chosen, state, solver, hooks)
    return driver.execute(saved)
