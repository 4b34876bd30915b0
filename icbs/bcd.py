"""The block-coordinate-descent driver (paper Fig. 2; DESIGN.md §5) and :func:`prune`.

One run: validate everything before touching the model; score the weights and build the initial
mask (``scoring.init_method``); fix the extremes; then step until the time budget, ``max_steps``,
``max_epochs`` or a pass without an improving move. A step picks a layer from a seeded schedule
(steps per pass spread over layers in proportion to ``log(size)``), scores the free weights
(``scoring.selection_method``), selects a tabu-free block, estimates ``g`` and ``H``
(:func:`icbs.derivatives.estimate_blocks`), builds the cardinality-constrained QUBO
(:func:`icbs.subproblem.build_block_problem`), solves it and applies the answer only when its
predicted loss change is strictly negative. ``bcd.blocks_per_round`` blocks in different layers
share one derivative pass; a round whose moves raised the batch loss is undone (checked whenever the
estimate measured that loss, and always for multi-block rounds). Every random choice of a
step derives from ``(bcd.seed, step)``, so a resumed run repeats an uninterrupted one. On any error
the model gets its dense weights back before the error propagates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import solvers
from icbs import checkpoint as ckpt
from icbs.batching import batch_size, batch_to, concat_batches, index_batch
from icbs.blocks import check_block_size, select_block
from icbs.config import IcbsConfig
from icbs.exceptions import InfeasibleSolutionError, NonFiniteDerivativeError, PruningError
from icbs.layers import check_layers, find_prunable
from icbs.scoring import collect_activation_norms, collect_gradients, init_masks, score
from icbs.state import MaskPattern, PruningState

__all__ = ["PruneResult", "prune", "layer_schedule", "step_seed", "check_solution", "reconstruct_weights"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
# Sections whose values must not change between a checkpoint and its resumption.
_RESUME_KEYS = ("pruning", "scoring", "blocks", "derivatives")
_RESUME_BCD_KEYS = ("seed", "blocks_per_round", "min_steps_per_layer")


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        masks: ``{layer: (n_out, n_in) bool}`` keep-masks on the CPU, True = kept.
        report: per-layer densities, steps and accepted moves, timings, solver stats, calibration
            losses after init and at the end, evaluations, the stop reason.
        history: one dict per step (see :func:`prune`).
    """

    masks: dict[str, Tensor]
    report: dict[str, Any]
    history: list[dict[str, Any]]


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 31-bit seed derived from ``(seed, step, stream)`` only (reproducible across resumes)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(stream)]).generate_state(1)[0]) % (2**31 - 1)


def layer_schedule(sizes: Mapping[str, int], min_steps: int, seed: int, epoch: int) -> list[str]:
    """The layer visited at each step of one pass (epoch).

    Layer ``l`` gets ``max(min_steps, round(log(size_l) / log(size_min)))`` steps per pass (so steps
    grow with ``log(size)``, the smallest layer getting one), in an order shuffled from ``(seed, epoch)``.

    Args:
        sizes: ``{layer: number of weights}``.
        min_steps: ``bcd.min_steps_per_layer``.
        seed: ``bcd.seed``.
        epoch: pass number.

    Returns:
        Layer names, one per step of the pass.
    """
    logs = {name: math.log(max(size, 2)) for name, size in sizes.items()}
    smallest = min(logs.values())
    entries: list[str] = []
    for name, value in logs.items():
        entries += [name] * max(int(min_steps), int(math.floor(value / smallest + 0.5)))
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 7]).permutation(len(entries))
    return [entries[i] for i in order]


def check_solution(x: Any, constraints: Sequence[tuple[np.ndarray, int]], n: int, layer: str, solver_name: str) -> np.ndarray:
    """Check a solver's answer against the block's constraints (the driver does not trust solvers).

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


@torch.no_grad()
def reconstruct_weights(w0: Tensor, keep_mask: Tensor, covariance: Tensor, damping: float) -> Tensor:
    """Refit the kept weights of one layer by damped least squares on the layer-wise objective.

    For every output row ``r`` with kept columns ``S``: minimise ``(w - w0_r) C (w - w0_r)^T`` over
    ``w`` supported on ``S``, i.e. ``(C_SS + lambda I) w_S = (C w0_r)_S`` with
    ``lambda = damping * mean(diag C)`` and ``C = X X^T / N`` the input second moment.

    Args:
        w0: ``(n_out, n_in)`` dense original weight.
        keep_mask: ``(n_out, n_in)`` bool.
        covariance: ``(n_in, n_in)`` ``C``.
        damping: ``bcd.reconstruct_damping``.

    Returns:
        ``(n_out, n_in)`` new weight (zeros where pruned), dtype of ``w0``.

    Raises:
        PruningError: a system is singular (raise ``bcd.reconstruct_damping``).
    """
    C = covariance.double().to(w0.device)
    lam = damping * float(torch.diagonal(C).mean())
    target = w0.double() @ C  # row r: (C w0_r)^T, C symmetric
    out = torch.zeros_like(w0, dtype=torch.float64)
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    for r in range(w0.shape[0]):
        cols = torch.nonzero(keep_mask[r]).squeeze(1)
        if cols.numel() == 0:
            continue
        A = C[cols][:, cols] + lam * eye[: cols.numel(), : cols.numel()]
        try:
            out[r, cols] = torch.linalg.solve(A, target[r, cols])
        except RuntimeError as err:
            raise PruningError(f"reconstruction system is singular; increase bcd.reconstruct_damping ({err})") from err
    if not bool(torch.isfinite(out).all()):
        raise PruningError("reconstruction gave non-finite weights; increase bcd.reconstruct_damping")
    return out.to(w0.dtype)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _check_calibration(calibration: Any) -> list[dict[str, Tensor]]:
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise ValueError("'calibration' should be a non-empty list of batches (dict[str, Tensor])")
    for i, batch in enumerate(calibration):
        if not isinstance(batch, Mapping):
            raise TypeError(f"'calibration[{i}]' should be a dict[str, Tensor]; got {type(batch).__name__}")
        batch_size(batch)
    return [dict(b) for b in calibration]


def _calibration_loss(model: nn.Module, batches: Sequence[dict[str, Tensor]], loss_fn: LossFn, device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            losses = loss_fn(model, batch_to(batch, device))
            total += float(losses.double().sum())
            count += int(losses.shape[0])
    return total / max(count, 1)


class _Driver:
    """One run's mutable bookkeeping; see :func:`prune` for the contract."""

    def __init__(
        self,
        model: nn.Module,
        config: IcbsConfig,
        calibration: list[dict[str, Tensor]],
        loss_fn: LossFn,
        layers: dict[str, nn.Module],
        state: PruningState,
        solver: solvers.Solver,
        *,
        evaluate: Callable[[nn.Module], Mapping[str, float]] | None,
        eval_every_s: float | None,
        callbacks: Sequence[Callable[[dict[str, Any]], None]],
        checkpoint_path: Path | None,
        progress: Callable[[float, float | None, int], None] | None,
    ) -> None:
        self.model = model
        self.cfg = config
        self.calibration = calibration
        self.loss_fn = loss_fn
        self.layers = layers
        self.state = state
        self.solver = solver
        self.evaluate = evaluate
        self.eval_every_s = eval_every_s
        self.callbacks = list(callbacks)
        self.checkpoint_path = checkpoint_path
        self.progress = progress
        self.device = _model_device(model)
        self.seed = int(config.bcd.seed)
        self.budget = config.bcd.time_budget
        self.all_samples = concat_batches(calibration)
        self.n_all = batch_size(self.all_samples)
        self.sizes = {name: module.weight.numel() for name, module in layers.items()}
        # Counters and logs that a checkpoint carries.
        self.step = 0
        self.epoch = 0
        self.pos = 0
        self.epoch_accepted = 0
        self.n_accepted = 0
        self.n_undone_rounds = 0
        # The calibration loss at the current masks (bcd.check='calibration'), None when unknown.
        self._check_loss: float | None = None
        self.elapsed_before = 0.0
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.init_loss = float("nan")
        self.init_metrics: dict[str, float] | None = None
        self.stop_reason: str | None = None
        self.timings = {"init_s": 0.0, "estimate_s": 0.0, "solve_s": 0.0, "select_s": 0.0, "reconstruct_s": 0.0}
        self.solver_stats: dict[str, Any] = {"name": solver.name, "calls": 0, "status": {}, "time_s": 0.0}
        self._clock_start = 0.0
        self._act_norms: dict[str, Tensor] | None = None
        self._layer_inputs: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ time
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._clock_start)

    def _paused(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` without counting its time against the budget (evaluation, checkpoints)."""
        mark = time.monotonic()
        try:
            return fn()
        finally:
            self._clock_start += time.monotonic() - mark

    # ------------------------------------------------------------------ setup
    def _dense_statistics(self) -> None:
        """Statistics of the dense model needed later: activation norms (wanda), layer input moments."""
        scoring = self.cfg.scoring
        if "wanda" in (scoring.init_method, scoring.selection_method):
            self._act_norms = collect_activation_norms(self.model, self.layers, self._device_batches(), self.loss_fn)
        if self.cfg.derivatives.estimator == "layerwise" or self.cfg.bcd.reconstruct:
            from icbs.derivatives import collect_layer_inputs

            self._layer_inputs = collect_layer_inputs(self.model, self.layers, self._device_batches(), self.loss_fn)

    def _device_batches(self) -> list[dict[str, Tensor]]:
        return [batch_to(b, self.device) for b in self.calibration]

    def _init_scores(self, method: str) -> dict[str, Tensor]:
        grads = None
        if method == "gradient":
            grads = collect_gradients(self.model, self.layers, self._device_batches(), self.loss_fn)
        generator = torch.Generator().manual_seed(step_seed(self.seed, 0, stream=3))
        return {
            name: score(
                method,
                self.cfg.scoring.init_scope,
                self.state[name].w0,
                act_norm=None if self._act_norms is None else self._act_norms.get(name),
                grad=None if grads is None else grads[name],
                generator=generator,
            )
            for name in self.layers
        }

    def _sparsegpt_init(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Init from ``icbs.baselines.run_baseline('sparsegpt', ...)``: its masks and its updated weights.

        SparseGPT's worth is in both: the mask and the OBS updates of the kept weights. The updated
        values become each layer's value-if-kept (``LayerState.values``); weights SparseGPT pruned keep
        their original value as the value they return with if a move keeps them again.
        """
        try:
            from icbs.baselines import run_baseline
        except ImportError as err:
            raise ValueError(
                "'scoring.init_method' 'sparsegpt' needs icbs.baselines.run_baseline, which is not available here"
            ) from err
        masks = run_baseline(
            "sparsegpt", self.model, self.layers, self.calibration, self.loss_fn,
            density=self.state.pattern.density, pattern=self.cfg.pruning.pattern, seed=self.seed,
            damping_frac=self.cfg.derivatives.damping_frac,
        )
        masks = {name: masks[name].bool() for name in self.layers}
        values = {}
        for name, module in self.layers.items():
            keep = masks[name].to(module.weight.device)
            values[name] = torch.where(keep, module.weight.detach(), self.state[name].w0)
        self.state.restore()
        return masks, values

    def initialise(self) -> None:
        """Init scoring, masks, fixed extremes (paper Fig. 2, steps 1-2); writes the pruned weights."""
        mark = time.perf_counter()
        scoring = self.cfg.scoring
        values: dict[str, Tensor] = {}
        if scoring.init_method == "sparsegpt":
            masks, values = self._sparsegpt_init()
            scores = self._init_scores("magnitude")
        else:
            scores = self._init_scores(scoring.init_method)
            masks = init_masks(scores, self.state.pattern, scoring.init_scope)
        self.state.set_masks(masks)
        for name, layer_values in values.items():
            self.state.set_values(name, layer_values)
        self.state.fix_extremes(scores, scoring.fix_frac_prune, scoring.fix_frac_keep)
        self.state.apply()
        self.state.check_invariants()
        self.init_loss = _calibration_loss(self.model, self.calibration, self.loss_fn, self.device)
        if not math.isfinite(self.init_loss):
            logger.warning("calibration loss after init is %s; check loss_fn", self.init_loss)
        self.timings["init_s"] = time.perf_counter() - mark
        logger.info(
            "init (%s, %s): calibration loss %.6g, densities %s", scoring.init_method, self.state.pattern,
            self.init_loss, {k: round(v, 4) for k, v in self.state.densities().items()},
        )

    # ------------------------------------------------------------------ checkpoints
    def payload(self, finished: bool) -> dict[str, Any]:
        return {
            "state": self.state.state_dict(),
            "driver": {
                "seed": self.seed,
                "step": self.step,
                "epoch": self.epoch,
                "pos": self.pos,
                "epoch_accepted": self.epoch_accepted,
                "n_accepted": self.n_accepted,
                "n_undone_rounds": self.n_undone_rounds,
                "elapsed_s": self.elapsed(),
                "history": self.history,
                "evaluations": self.evaluations,
                "init_loss": self.init_loss,
                "init_metrics": self.init_metrics,
                "stop_reason": self.stop_reason,
                "finished": finished,
                "timings": self.timings,
                "solver_stats": self.solver_stats,
            },
            "rng": ckpt.rng_states(),
            "config": self.cfg.to_dict(),
        }

    def save(self, finished: bool = False) -> None:
        if self.checkpoint_path is not None:
            self._paused(lambda: ckpt.save_checkpoint(self.checkpoint_path, self.payload(finished)))

    def load(self, data: Mapping[str, Any]) -> bool:
        """Take over a checkpoint's state and counters; return whether that run had finished."""
        saved_cfg = data.get("config", {})
        current = self.cfg.to_dict()
        for section in _RESUME_KEYS:
            if saved_cfg.get(section) != current[section]:
                key = next((f"{section}.{k}" for k in current[section] if saved_cfg.get(section, {}).get(k) != current[section][k]), section)
                raise ValueError(f"'{key}' differs from the checkpoint's; resume needs the same setting")
        for key in _RESUME_BCD_KEYS:
            if saved_cfg.get("bcd", {}).get(key) != current["bcd"][key]:
                raise ValueError(f"'bcd.{key}' differs from the checkpoint's; resume needs the same setting")
        self.state.load_state_dict(data["state"])
        driver = data["driver"]
        for key in ("step", "epoch", "pos", "epoch_accepted", "n_accepted", "n_undone_rounds"):
            setattr(self, key, int(driver[key]))
        self.elapsed_before = float(driver["elapsed_s"])
        self.history = list(driver["history"])
        self.evaluations = list(driver["evaluations"])
        self.init_loss = float(driver["init_loss"])
        self.init_metrics = driver.get("init_metrics")
        self.stop_reason = driver.get("stop_reason")
        self.timings.update(driver.get("timings", {}))
        self.solver_stats.update(driver.get("solver_stats", {}))
        self.solver_stats["name"] = self.solver.name
        ckpt.set_rng_states(data["rng"])
        self.state.apply()
        logger.info("resumed at step %d (epoch %d, %.1f s elapsed)", self.step, self.epoch, self.elapsed_before)
        return bool(driver.get("finished", False))

    # ------------------------------------------------------------------ events
    def _emit(self, event: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(event)

    def _maybe_evaluate(self, force: bool = False) -> None:
        if self.evaluate is None:
            return
        last = self.evaluations[-1]["elapsed_s"] if self.evaluations else None
        now = self.elapsed()
        if not force and (self.eval_every_s is None or (last is not None and now - last < self.eval_every_s)):
            return
        metrics = self._paused(lambda: {k: float(v) for k, v in self.evaluate(self.model).items()})
        row = {"elapsed_s": now, "step": self.step, **metrics}
        self.evaluations.append(row)
        self._emit({"event": "eval", "elapsed_s": now, "step": self.step, "metrics": metrics})

    # ------------------------------------------------------------------ the loop
    def _stop_reason(self) -> str | None:
        bcd = self.cfg.bcd
        if self.budget is not None and self.elapsed() >= self.budget:
            return "time_budget"
        if bcd.max_steps is not None and self.step >= bcd.max_steps:
            return "max_steps"
        if bcd.max_epochs is not None and self.epoch >= bcd.max_epochs:
            return "max_epochs"
        return None

    def run(self) -> None:
        bcd = self.cfg.bcd
        last_checkpoint = time.monotonic()
        schedule = layer_schedule(self.sizes, bcd.min_steps_per_layer, self.seed, self.epoch)
        while True:
            reason = self._stop_reason()
            if reason is not None:
                self.stop_reason = reason
                break
            if self.pos >= len(schedule):
                if self.epoch_accepted == 0:
                    self.stop_reason = "no_improvement"
                    break
                self.epoch += 1
                self.pos = 0
                self.epoch_accepted = 0
                schedule = layer_schedule(self.sizes, bcd.min_steps_per_layer, self.seed, self.epoch)
                continue
            round_layers: list[str] = []
            limit = bcd.blocks_per_round
            if bcd.max_steps is not None:
                limit = min(limit, bcd.max_steps - self.step)
            while self.pos + len(round_layers) < len(schedule) and len(round_layers) < limit:
                name = schedule[self.pos + len(round_layers)]
                if name in round_layers:
                    break
                round_layers.append(name)
            self._round(round_layers)
            self.pos += len(round_layers)
            if self.progress is not None:
                self.progress(self.elapsed(), self.budget, self.step)
            if bcd.checkpoint_every_s is not None and time.monotonic() - last_checkpoint >= bcd.checkpoint_every_s:
                self.save()
                last_checkpoint = time.monotonic()
            self._maybe_evaluate()
        logger.info("stopped (%s) after %d steps, %d accepted", self.stop_reason, self.step, self.n_accepted)

    def _step_indices(self, first_step: int) -> np.ndarray:
        n = min(self.cfg.derivatives.n_samples, self.n_all)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, first_step, 2])
        return np.sort(rng.choice(self.n_all, size=n, replace=False))

    def _samples(self, idx: np.ndarray) -> dict[str, Tensor]:
        return batch_to(index_batch(self.all_samples, torch.as_tensor(idx, dtype=torch.long)), self.device)

    def _step_batch(self, first_step: int) -> dict[str, Tensor]:
        return self._samples(self._step_indices(first_step))

    def _check_batches(
        self, first_step: int, batch: dict[str, Tensor], batch_loss: float
    ) -> tuple[Sequence[dict[str, Tensor]], float]:
        """The samples a round is checked on (``bcd.check``) and the loss there before the round.

        ``calibration``: every calibration sample (the loss is cached between rounds); ``fresh``: a
        batch of the step batch's size drawn from the other calibration samples (from all when too
        few are left); ``batch``: the step batch, whose loss ``batch_loss`` the estimating pass
        measured (NaN when it did not).
        """
        mode = self.cfg.bcd.check
        if mode == "calibration":
            if self._check_loss is None:
                self._check_loss = _calibration_loss(self.model, self.calibration, self.loss_fn, self.device)
            return self.calibration, self._check_loss
        if mode == "fresh":
            fitted = self._step_indices(first_step)
            others = np.setdiff1d(np.arange(self.n_all), fitted)
            pool = others if others.size >= fitted.size else np.arange(self.n_all)
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, first_step, 3])
            check_on = [self._samples(np.sort(rng.choice(pool, size=fitted.size, replace=False)))]
            return check_on, _calibration_loss(self.model, check_on, self.loss_fn, self.device)
        if math.isfinite(batch_loss):
            return [batch], batch_loss
        return [batch], _calibration_loss(self.model, [batch], self.loss_fn, self.device)

    def _selection_scores(self, names: list[str], batch: dict[str, Tensor], first_step: int) -> dict[str, Tensor]:
        method = self.cfg.scoring.selection_method
        grads = None
        if method == "gradient":
            grads = collect_gradients(self.model, {n: self.layers[n] for n in names}, [batch], self.loss_fn)
        generator = torch.Generator().manual_seed(step_seed(self.seed, first_step, stream=4))
        return {
            name: score(
                method,
                self.cfg.scoring.selection_scope,
                self.state[name].w0,
                act_norm=None if self._act_norms is None else self._act_norms.get(name),
                grad=None if grads is None else grads[name],
                generator=generator,
            )
            for name in names
        }

    def _select_in_pass(self, names: list[str]) -> bool:
        """Whether block selection can use the gradient of the estimating pass (no extra backward)."""
        return (
            self.cfg.scoring.selection_method == "gradient"
            and self.cfg.derivatives.estimator in ("fisher", "gradient_mean")
            and all(isinstance(self.layers[name], nn.Linear) for name in names)
        )

    def _estimate_with_selection(
        self, names: list[str], batch: dict[str, Tensor], first_step: int, blocks: dict[str, Tensor]
    ) -> tuple[dict[str, Any], float]:
        """One forward+backward: each layer's block is chosen from the pass's own mean gradient, then estimated.

        Equivalent to scoring with ``selection_method='gradient'`` on the step's batch and estimating
        afterwards, without the second pass.
        """
        from icbs.derivatives import estimate_blocks

        cfg = self.cfg
        mark = time.perf_counter()
        score_generator = torch.Generator().manual_seed(step_seed(self.seed, first_step, stream=4))

        def chooser(name: str, i: int) -> Callable[[Tensor], Tensor]:
            def choose(mean_grad: Tensor) -> Tensor:
                scores = score("gradient", cfg.scoring.selection_scope, self.state[name].w0, grad=mean_grad,
                               generator=score_generator)
                generator = torch.Generator().manual_seed(step_seed(self.seed, first_step + i, stream=5))
                index = select_block(self.state, name, scores, cfg.blocks.block_size, cfg.blocks.k, generator)
                blocks[name] = index
                return index if index.numel() >= 2 else index[:0]

            return choose

        for name in names:
            blocks[name] = torch.empty(0, dtype=torch.long)
        estimates = estimate_blocks(
            cfg.derivatives.estimator, self.model,
            {name: (self.layers[name], chooser(name, i)) for i, name in enumerate(names)}, batch, self.loss_fn,
        )
        return estimates, time.perf_counter() - mark

    def _select_then_estimate(
        self, names: list[str], batch: dict[str, Tensor], first_step: int, blocks: dict[str, Tensor]
    ) -> tuple[dict[str, Any], float]:
        """Score and select every layer's block, then one estimating pass for all of them."""
        from icbs.derivatives import estimate_blocks

        cfg = self.cfg
        mark = time.perf_counter()
        scores = self._selection_scores(names, batch, first_step)
        for i, name in enumerate(names):
            generator = torch.Generator().manual_seed(step_seed(self.seed, first_step + i, stream=5))
            blocks[name] = select_block(self.state, name, scores[name], cfg.blocks.block_size, cfg.blocks.k, generator)
        self.timings["select_s"] += time.perf_counter() - mark
        active = [name for name in names if blocks[name].numel() >= 2]
        mark = time.perf_counter()
        if not active:
            return {}, 0.0
        reference = None
        if cfg.derivatives.estimator == "layerwise":
            reference = {name: self.state[name].w0 for name in active}
        estimates = estimate_blocks(
            cfg.derivatives.estimator,
            self.model,
            {name: (self.layers[name], blocks[name].to(self.device)) for name in active},
            batch,
            self.loss_fn,
            layer_inputs=self._layer_inputs,
            reference_weights=reference,
        )
        return estimates, time.perf_counter() - mark

    def _round(self, names: list[str]) -> None:
        """One derivative pass serving one block in each of ``names`` (distinct layers)."""
        from icbs.subproblem import build_block_problem

        first_step = self.step
        batch = self._step_batch(first_step)
        blocks: dict[str, Tensor] = {}
        if self._select_in_pass(names):
            estimates, estimate_s = self._estimate_with_selection(names, batch, first_step, blocks)
        else:
            estimates, estimate_s = self._select_then_estimate(names, batch, first_step, blocks)
        self.timings["estimate_s"] += estimate_s
        active = list(estimates)
        # Every round (one block or many) is checked against the true loss (on the samples bcd.check
        # names), not only the quadratic model. Single-block rounds are checked when the estimating pass
        # measured the batch loss (not for layerwise); multi-block rounds always (their blocks' models
        # ignore each other).
        batch_loss = next(iter(estimates.values())).loss if estimates else float("nan")
        check = bool(estimates) and (math.isfinite(batch_loss) or len(names) > 1)
        if check:
            check_on, before = self._check_batches(first_step, batch, batch_loss)
        moves: list[tuple[str, Tensor, Tensor]] = []
        records: list[dict[str, Any]] = []
        for i, name in enumerate(names):
            record = self._solve_block(name, blocks[name], estimates.get(name), first_step + i, estimate_s / max(len(active), 1),
                                       build_block_problem, moves)
            records.append(record)
            self.step += 1
        if check and moves:
            self._check_round(before, check_on, moves, records)
        elif moves:
            self._check_loss = None  # unchecked moves: the cached calibration loss is stale
        for record in records:
            if record["accepted"]:
                self.n_accepted += 1
                self.epoch_accepted += 1
            record["elapsed_s"] = self.elapsed()
            self.history.append(record)
            self._emit(record)

    def _solve_block(
        self,
        name: str,
        flat_index: Tensor,
        estimate: Any,
        step: int,
        estimate_s: float,
        build_block_problem: Callable[..., Any],
        moves: list[tuple[str, Tensor, Tensor]],
    ) -> dict[str, Any]:
        cfg = self.cfg
        layer = self.state[name]
        record: dict[str, Any] = {
            "event": "step", "step": step, "epoch": self.epoch, "layer": name, "block_size": int(flat_index.numel()),
            "k": 0, "predicted_delta": 0.0, "solver": self.solver.name, "status": "SKIPPED", "solve_time_s": 0.0,
            "estimate_time_s": estimate_s, "accepted": False, "undone": False, "n_changed": 0,
            "batch_loss": float("nan"),
        }
        layer.steps += 1
        if estimate is None:
            logger.debug("step %d: no block left in layer %s (all candidates tabu)", step, name)
            return record
        if not (np.all(np.isfinite(estimate.g)) and np.all(np.isfinite(estimate.H))):
            raise NonFiniteDerivativeError(
                f"the gradient/Hessian estimate of layer {name!r} holds NaN/Inf; check loss_fn and the data "
                "(or raise derivatives.damping_frac)"
            )
        device_index = flat_index.to(layer.keep_mask.device)
        constraints = self.state.block_groups(name, flat_index)
        keep_block = layer.keep_mask.view(-1)[device_index]
        # The block problem's w0 is each weight's value-if-kept: the original weight, or the value an
        # init such as SparseGPT gave it (DESIGN.md §3 with w0 := the kept value).
        w0_block = (layer.w0 if layer.values is None else layer.values).view(-1)[device_index]
        w_block = layer.module.weight.detach().view(-1)[device_index]
        qp, x_cur = build_block_problem(
            estimate, w0_block, w_block, keep_block, constraints,
            alpha=cfg.derivatives.grad_multiplier, ridge=cfg.derivatives.ridge,
        )
        remaining = None if self.budget is None else max(self.budget - self.elapsed(), 1e-3)
        mark = time.perf_counter()
        try:
            solution = self.solver.solve(qp, initial_state=x_cur, seed=step_seed(self.seed, step, stream=1),
                                         time_limit_s=remaining)
        except solvers.InfeasibleProblemError as err:
            raise InfeasibleSolutionError(f"solver {self.solver.name!r} failed on a block of layer {name!r}: {err}") from err
        solve_s = time.perf_counter() - mark
        self.timings["solve_s"] += solve_s
        x_new = check_solution(solution.x, constraints, qp.n, name, self.solver.name)
        x_cur = np.asarray(x_cur, dtype=np.int8)
        predicted = float(qp.energy(x_new) - qp.energy(x_cur))
        # Strict improvement beyond float64 round-off of the energy (never accept a worse or equal mask).
        tolerance = 1e-12 * (1.0 + float(np.abs(qp.Q).sum()) + abs(qp.offset))
        changed = int(np.sum(x_new != x_cur))
        accept = changed > 0 and predicted < -tolerance
        status = str(solution.info.get("status", "FEASIBLE"))
        stats = self.solver_stats
        stats["calls"] += 1
        stats["time_s"] += solve_s
        stats["status"][status] = stats["status"].get(status, 0) + 1
        if accept:
            old = self.state.apply_move(name, flat_index, torch.from_numpy(x_new == 0))
            self.state.check_invariants(name)
            moves.append((name, flat_index, old))
            layer.accepted += 1
        self.state.push_tabu(name, flat_index)
        record.update(
            k=int(sum(k for _, k in constraints)), predicted_delta=predicted, energy=float(solution.energy),
            status=status, solve_time_s=solve_s, accepted=accept, n_changed=changed if accept else 0,
            batch_loss=float(estimate.loss),
        )
        return record

    def _check_round(self, before: float, check_on: Sequence[dict[str, Tensor]], moves: list[tuple[str, Tensor, Tensor]],
                     records: list[dict[str, Any]]) -> None:
        """Undo a round whose moves raised the loss on ``check_on`` (DESIGN.md §4): the quadratic model is only local."""
        after = _calibration_loss(self.model, check_on, self.loss_fn, self.device)
        if after <= before:
            if self.cfg.bcd.check == "calibration":
                self._check_loss = after
            return
        for name, flat_index, old in reversed(moves):
            self.state.apply_move(name, flat_index, old)
            self.state.check_invariants(name)
            self.state[name].accepted -= 1
        self.n_undone_rounds += 1
        for record in records:
            if record["accepted"]:
                record["accepted"] = False
                record["undone"] = True
        logger.info("round at step %d undone: %s loss rose from %.6g to %.6g", records[0]["step"],
                    self.cfg.bcd.check, before, after)

    # ------------------------------------------------------------------ finish
    def finish(self) -> None:
        bcd = self.cfg.bcd
        if bcd.reconstruct:
            mark = time.perf_counter()
            assert self._layer_inputs is not None
            for name in self.layers:
                layer = self.state[name]
                values = reconstruct_weights(layer.w0, layer.keep_mask, self._layer_inputs[name], bcd.reconstruct_damping)
                self.state.set_values(name, values)
            self.state.apply()
            self.timings["reconstruct_s"] = time.perf_counter() - mark
        self.state.check_invariants()

    def report(self, final_loss: float, final_metrics: Mapping[str, float] | None) -> dict[str, Any]:
        per_layer = {}
        for name in self.layers:
            layer = self.state[name]
            per_layer[name] = {
                "shape": list(layer.shape),
                "density": float(layer.keep_mask.float().mean()),
                "target_kept": self.state.target_kept(name),
                "steps": layer.steps,
                "accepted": layer.accepted,
                "free": int(layer.free_mask().sum()),
            }
        total = sum(self.sizes.values())
        kept = sum(int(self.state[name].keep_mask.sum()) for name in self.layers)
        return {
            "density": {"target": self.state.pattern.density, "total": kept / total, "pattern": str(self.state.pattern)},
            "layers": per_layer,
            "steps": self.step,
            "epochs": self.epoch + (1 if self.pos else 0),
            "accepted": self.n_accepted,
            "undone_rounds": self.n_undone_rounds,
            "stop_reason": self.stop_reason,
            "elapsed_s": self.elapsed(),
            "timings": dict(self.timings),
            "solver": dict(self.solver_stats),
            "estimator": self.cfg.derivatives.estimator,
            "init_loss": self.init_loss,
            "final_loss": final_loss,
            "init_metrics": self.init_metrics,
            "final_metrics": dict(final_metrics) if final_metrics is not None else None,
            "evaluations": list(self.evaluations),
        }


def _validate(
    model: Any, config: Any, loss_fn: Any, callbacks: Any, eval_every_s: Any, progress: Any, resume: bool, checkpoint_path: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' should be an nn.Module; got {type(model).__name__}")
    if not isinstance(config, IcbsConfig):
        raise TypeError(f"'config' should be an IcbsConfig (see icbs.load_config); got {type(config).__name__}")
    config.validate()
    if not callable(loss_fn):
        raise TypeError("'loss_fn' should be callable as loss_fn(model, batch) -> (B,) per-sample losses")
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"'callbacks' should hold callables; got {callback!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"'progress' should be callable(elapsed_s, budget_s, step); got {progress!r}")
    if eval_every_s is not None and (not isinstance(eval_every_s, (int, float)) or not eval_every_s > 0):
        raise ValueError(f"'eval_every_s' should be a positive number of seconds or None; got {eval_every_s!r}")
    if resume and checkpoint_path is None:
        raise ValueError("'resume' needs 'checkpoint_path'")


def prune(
    model: nn.Module,
    config: IcbsConfig,
    calibration: Sequence[dict[str, Tensor]],
    loss_fn: LossFn,
    *,
    layers: Mapping[str, nn.Module] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every_s: float | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[float, float | None, int], None] | None = None,
    solver: solvers.Solver | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``config.pruning.density`` by iterative combinatorial brain surgery.

    Everything is validated before the model is touched. The model is left pruned (zeros in the
    weights, reconstructed kept values with ``bcd.reconstruct``) on success; on any error its dense
    weights are restored before the error propagates.

    Args:
        model: the model (eval mode), on its device.
        config: a validated :class:`~icbs.config.IcbsConfig`; reads ``pruning``, ``scoring``, ``blocks``,
            ``derivatives``, ``solver`` and ``bcd`` (and ``eval.every_s`` when ``eval_every_s`` is None).
        calibration: batches (``dict[str, Tensor]``, same keys); per-step samples are drawn from all of them.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses.
        layers: ``{name: nn.Linear}`` to prune; default :func:`icbs.layers.find_prunable` with
            ``config.model.include``/``exclude``.
        evaluate: ``evaluate(model) -> {metric: value}``, called after init, every ``eval_every_s``
            seconds and at the end (its time is not counted against the budget).
        eval_every_s: seconds between evaluations (default ``config.eval.every_s``).
        callbacks: called with each step record (``event='step'``: step, epoch, layer, block_size, k,
            predicted_delta, energy, solver, status, solve_time_s, estimate_time_s, accepted, undone,
            n_changed, batch_loss, elapsed_s) and each evaluation (``event='eval'``, ``metrics``).
        checkpoint_path: file written atomically every ``bcd.checkpoint_every_s`` seconds and at the end.
        resume: continue the run saved at ``checkpoint_path`` (the model must hold its dense weights).
        progress: ``progress(elapsed_s, budget_s, step)`` after every round (e.g. a tqdm bar).
        solver: a constructed :class:`solvers.Solver` to use instead of ``config.solver`` (e.g. a composite that
            records every block problem); ``prune`` closes it at the end like one it built.

    Returns:
        A :class:`PruneResult`.

    Raises:
        ConfigError: an invalid config value.
        ValueError / TypeError: bad arguments (unknown layer pattern, a non-prunable layer,
            ``blocks.block_size`` larger than a layer's free weights, a mismatching checkpoint).
        NonFiniteDerivativeError: a gradient or Hessian estimate holds NaN/Inf.
        InfeasibleSolutionError: a solver answer broke a cardinality constraint.
    """
    _validate(model, config, loss_fn, callbacks, eval_every_s, progress, resume, checkpoint_path)
    batches = _check_calibration(calibration)
    if layers is None:
        chosen = find_prunable(model, config.model.include, config.model.exclude)
    else:
        chosen = check_layers(model, layers)
    pattern = MaskPattern.from_config(config.pruning.density, config.pruning.pattern)
    state = PruningState(chosen, pattern, config.blocks.tabu_frac)
    check_block_size(
        config.blocks.block_size, config.blocks.k, state.free_counts(config.scoring.fix_frac_prune, config.scoring.fix_frac_keep)
    )
    if solver is None:
        solver = solvers.get_solver(config.solver.name, **dict(config.solver.params))
    elif not isinstance(solver, solvers.Solver):
        raise TypeError(f"'solver' should be a solvers.Solver instance or None; got {type(solver).__name__}")
    limit = solver.properties.get("max_variables") if hasattr(solver, "properties") else None
    limit = solver.params.get("max_variables", limit) if hasattr(solver, "params") else limit
    if limit is not None and config.blocks.block_size > int(limit):
        raise ValueError(
            f"'blocks.block_size' ({config.blocks.block_size}) exceeds the {limit} variables solver "
            f"{config.solver.name!r} accepts; lower blocks.block_size or pick another solver.name"
        )
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    saved = ckpt.load_checkpoint(path) if resume and path is not None else None
    if path is not None and not path.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path.parent)!r} does not exist")
    if eval_every_s is None:
        eval_every_s = config.eval.every_s
    driver = _Driver(
        model, config, batches, loss_fn, chosen, state, solver, evaluate=evaluate, eval_every_s=eval_every_s,
        callbacks=callbacks, checkpoint_path=path, progress=progress,
    )
    try:
        driver._clock_start = time.monotonic()
        driver._dense_statistics()
        finished = False
        if saved is not None:
            finished = driver.load(saved)
        else:
            driver.initialise()
            if evaluate is not None:
                driver._maybe_evaluate(force=True)
                driver.init_metrics = {k: v for k, v in driver.evaluations[-1].items() if k not in ("elapsed_s", "step")}
            driver.save()
        if not finished:
            driver.run()
            driver.finish()
        final_loss = _calibration_loss(model, batches, loss_fn, driver.device)
        final_metrics = None
        if evaluate is not None:
            driver._maybe_evaluate(force=True)
            final_metrics = {k: v for k, v in driver.evaluations[-1].items() if k not in ("elapsed_s", "step")}
        driver.save(finished=True)
        report = driver.report(final_loss, final_metrics)
        logger.info("done: calibration loss %.6g -> %.6g, %d/%d steps accepted", driver.init_loss, final_loss,
                    driver.n_accepted, driver.step)
        return PruneResult(masks=state.masks(), report=report, history=list(driver.history))
    except BaseException:
        state.restore()
        raise
    finally:
        solver.close()
