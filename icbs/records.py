"""The typed records of a run: one per step, one per evaluation, the driver's summary and report.json.

Each schema is written here once. The driver fills :class:`StepRecord` and :class:`EvalRecord` and hands
them to callbacks; :class:`PruneSummary` is :attr:`icbs.PruneResult.report`; :class:`RunReport` is what
``report.json`` holds (README, "Reading report.json"). Checkpoints and JSON files store them as plain
dicts (:func:`dataclasses.asdict`), and :meth:`StepRecord.from_dict` reads them back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from icbs.schedule import Cursor
from icbs.state import mask_densities

__all__ = ["StepRecord", "EvalRecord", "SolverStats", "LayerSummary", "PruneSummary", "RunReport", "RunLog", "RunHooks", "PruneResult", "TIMING_KEYS"]

# The driver's own timings (seconds): init, derivative passes, block selection, solves, refits, round checks.
TIMING_KEYS = ("init_s", "estimate_s", "select_s", "solve_s", "refit_s", "check_s")


@dataclasses.dataclass
class StepRecord:
    """One BCD step: a block tried in one layer.

    Attributes:
        step: step number (0-based, over the whole run).
        epoch: pass number.
        layer: layer name.
        block_size: weights in the block (0 when no block was left: all candidates tabu).
        k: pruned weights in the block (its cardinality).
        predicted_delta: ΔL of the solver's answer under the block's quadratic model (negative = better).
        energy: the answer's energy (``predicted_delta`` plus the problem's constant), NaN when skipped.
        solver: the solver's name.
        status: the solver's status (``OPTIMAL``, ``FEASIBLE``, ...) or ``SKIPPED``.
        solve_time_s: wall time of the solve.
        estimate_time_s: this step's share of the round's derivative pass.
        accepted: the move was applied and kept.
        undone: the move was applied, then undone by the round check.
        n_changed: weights whose state the kept move flipped.
        batch_loss: loss of the round's batch before the round (NaN when the pass did not measure it).
        elapsed_s: run time when the round ended.
    """

    event: ClassVar[str] = "step"

    step: int
    epoch: int
    layer: str
    block_size: int
    k: int = 0
    predicted_delta: float = 0.0
    energy: float = math.nan
    solver: str = ""
    status: str = "SKIPPED"
    solve_time_s: float = 0.0
    estimate_time_s: float = 0.0
    accepted: bool = False
    undone: bool = False
    n_changed: int = 0
    batch_loss: float = math.nan
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for checkpoints and report.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})


@dataclasses.dataclass
class EvalRecord:
    """One evaluation of the model during a run.

    Attributes:
        elapsed_s: run time of the evaluation (0 = right after the init).
        step: steps done by then.
        metrics: ``{metric: value}`` from the evaluate callable (e.g. accuracy and loss).
    """

    event: ClassVar[str] = "eval"

    elapsed_s: float
    step: int
    metrics: dict[str, float]

    def row(self) -> dict[str, Any]:
        """The flat row of ``metric_vs_time``: ``{elapsed_s, step, <metric>: value, ...}``."""
        return {"elapsed_s": self.elapsed_s, "step": self.step, **self.metrics}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EvalRecord:
        """Inverse of :meth:`row`."""
        metrics = {k: float(v) for k, v in row.items() if k not in ("elapsed_s", "step")}
        return cls(float(row["elapsed_s"]), int(row["step"]), metrics)


@dataclasses.dataclass
class SolverStats:
    """How the block solver was used: its name, calls, total solve time and a count per status."""

    name: str
    calls: int = 0
    time_s: float = 0.0
    status: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, status: str, seconds: float) -> None:
        """Count one solve."""
        self.calls += 1
        self.time_s += seconds
        self.status[status] = self.status.get(status, 0) + 1


@dataclasses.dataclass
class LayerSummary:
    """One pruned layer at the end of a run.

    Attributes:
        shape: ``[n_out, n_in]``.
        density: fraction kept.
        target_kept: weights the pattern requires to be kept.
        steps: steps taken in this layer.
        accepted: moves kept in this layer.
        free: weights that were candidates (neither fixed pruned nor fixed kept).
    """

    shape: list[int]
    density: float
    target_kept: int
    steps: int
    accepted: int
    free: int


@dataclasses.dataclass
class PruneSummary:
    """What the driver reports (:attr:`icbs.PruneResult.report`; ``report.json``'s ``prune`` entry).

    Attributes:
        density: ``{"target", "total", "pattern"}``.
        layers: :class:`LayerSummary` per layer.
        steps: steps done.
        epochs: passes started.
        accepted: moves kept.
        undone_rounds: rounds undone by the round check.
        stop_reason: ``time_budget``, ``max_steps``, ``max_epochs``, ``patience`` (``bcd.patience`` rounds
            in a row kept no move), ``no_improvement`` (a pass without an improving move) or ``None`` when
            the run did not stop by itself.
        elapsed_s: run time (evaluations and checkpoint writes excluded).
        timings: seconds per phase (:data:`TIMING_KEYS`).
        solver: :class:`SolverStats`.
        estimator: ``derivatives.estimator``.
        init_loss: calibration loss after the init (over the init's samples, ``scoring.init_n_samples``).
        final_loss: calibration loss at the end (over the same samples).
        init_metrics: the evaluation right after the init (``None`` without an evaluate callable).
        final_metrics: the evaluation at the end.
        evaluations: every evaluation as a ``metric_vs_time`` row.
    """

    density: dict[str, Any]
    layers: dict[str, LayerSummary]
    steps: int
    epochs: int
    accepted: int
    undone_rounds: int
    stop_reason: str | None
    elapsed_s: float
    timings: dict[str, float]
    solver: SolverStats
    estimator: str
    init_loss: float
    final_loss: float
    init_metrics: dict[str, float] | None
    final_metrics: dict[str, float] | None
    evaluations: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunReport:
    """The schema of ``report.json`` (written by ``icbs prune`` and ``icbs baseline``).

    Attributes:
        command: ``prune`` or ``baseline``.
        model: the model's name.
        metric: the headline metric (``accuracy`` or ``perplexity``).
        metrics: ``{"dense", "init", "final"}``, each ``{metric: value, "loss": value}`` or ``None``.
        density: ``{"target", "achieved", "per_layer"}`` (fraction kept).
        metric_vs_time: evaluation rows ``{elapsed_s, step, <metric>, loss}`` (time 0 = the init).
        steps: one :class:`StepRecord` dict per step.
        timings: seconds spent loading, building data, evaluating, pruning.
        seed: ``bcd.seed``.
        resumed: whether the run continued from a checkpoint.
        config: the effective config.
        versions: Python and package versions.
        prune: the driver's :class:`PruneSummary` (``None`` for baselines).
        method: the baseline's name (``None`` for ``prune``).
        lm_eval: lm-evaluation-harness results ``{task: {metric: value}}`` when ``eval.lm_eval_tasks`` is set.
    """

    command: str
    model: str
    metric: str
    metrics: dict[str, Any]
    density: dict[str, Any]
    metric_vs_time: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    timings: dict[str, float]
    seed: int
    resumed: bool
    config: dict[str, Any]
    versions: dict[str, str]
    prune: dict[str, Any] | None = None
    method: str | None = None
    lm_eval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``report.json``."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunLog:
    """The bookkeeping of a run that a checkpoint carries (besides the pruning state and the RNG states).

    Attributes:
        cursor: the position in the layer schedule and the move counters.
        history: one :class:`StepRecord` per step.
        evaluations: every :class:`EvalRecord`.
        init_loss: calibration loss after the init (over the init's samples, ``scoring.init_n_samples``).
        init_metrics: the evaluation right after the init.
        stop_reason: why the loop ended (``None`` while it runs).
        timings: seconds per phase (:data:`TIMING_KEYS`).
        solver: :class:`SolverStats`.
    """

    cursor: Cursor
    solver: SolverStats
    history: list[StepRecord] = dataclasses.field(default_factory=list)
    evaluations: list[EvalRecord] = dataclasses.field(default_factory=list)
    init_loss: float = math.nan
    init_metrics: dict[str, float] | None = None
    stop_reason: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))

    def to_payload(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            **dataclasses.asdict(self.cursor), "history": [r.to_dict() for r in self.history],
            "evaluations": [e.row() for e in self.evaluations], "init_loss": self.init_loss,
            "init_metrics": self.init_metrics, "stop_reason": self.stop_reason, "timings": dict(self.timings),
            "solver_stats": dataclasses.asdict(self.solver),
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], solver_name: str) -> RunLog:
        """Inverse of :meth:`to_payload`; the statistics carry ``solver_name`` (the solver of the resumed run)."""
        stats = data.get("solver_stats", {})
        return cls(
            # A checkpoint from before a counter existed resumes with the counter's default.
            cursor=Cursor(**{f.name: int(data.get(f.name, f.default)) for f in dataclasses.fields(Cursor)}),
            solver=SolverStats(solver_name, int(stats.get("calls", 0)), float(stats.get("time_s", 0.0)),
                               dict(stats.get("status", {}))),
            history=[StepRecord.from_dict(row) for row in data["history"]],
            evaluations=[EvalRecord.from_row(row) for row in data["evaluations"]],
            init_loss=float(data["init_loss"]), init_metrics=data.get("init_metrics"),
            stop_reason=data.get("stop_reason"), timings={**dict.fromkeys(TIMING_KEYS, 0.0), **data.get("timings", {})},
        )

    def summary(self, state: Any, elapsed_s: float, estimator: str, final_loss: float,
                final_metrics: dict[str, float] | None) -> PruneSummary:
        """The :class:`PruneSummary` of the run with the pruning ``state`` it ended with."""
        densities = mask_densities(state.masks())
        layers = {
            name: LayerSummary(list(state[name].shape), densities[name], state.target_kept(name), state[name].steps,
                               state[name].accepted, int(state[name].free_mask().sum()))
            for name in state
        }
        return PruneSummary(
            density={"target": state.pattern.density, "total": densities["total"], "pattern": str(state.pattern)},
            layers=layers, steps=self.cursor.step, epochs=self.cursor.epoch + (1 if self.cursor.pos else 0),
            accepted=self.cursor.n_accepted, undone_rounds=self.cursor.n_undone_rounds, stop_reason=self.stop_reason,
            elapsed_s=elapsed_s, timings=dict(self.timings), solver=self.solver, estimator=estimator,
            init_loss=self.init_loss, final_loss=final_loss, init_metrics=self.init_metrics,
            final_metrics=final_metrics, evaluations=[e.row() for e in self.evaluations],
        )


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        masks: ``{layer: (n_out, n_in) bool}`` keep-masks on the CPU, True = kept.
        report: the driver's :class:`~icbs.records.PruneSummary`.
        history: one :class:`~icbs.records.StepRecord` per step.
    """

    masks: dict[str, Any]
    report: PruneSummary
    history: list[StepRecord]


@dataclasses.dataclass
class RunHooks:
    """How a run talks to its caller: evaluation, callbacks, checkpoints, progress (see :func:`prune`)."""

    evaluate: Callable[[Any], Mapping[str, float]] | None = None
    eval_every_s: float | None = None
    callbacks: Sequence[Callable[[Any], None]] = ()
    checkpoint_path: Path | None = None
    progress: Callable[[float, float | None, int], None] | None = None
