"""The end-to-end pipelines behind the CLI: config -> model -> data -> evaluate -> prune -> evaluate -> save.

Each ``run_*`` function takes a validated :class:`~icbs.config.IcbsConfig` and plain arguments (never an
argparse namespace) and runs in two phases. The pre-flight checks everything it can before anything is
written: the output folder first (nothing expensive is done for a refused folder), then the device, the
model, the data, the layers and every setting that needs them (block sizes, pattern and density against the
layer shapes, samples per estimate). Only then is the output folder created and ``config.yaml`` written. A run
that fails before its first checkpoint leaves the folder as it was (absent if it did not exist). It returns
a small result object the CLI turns into a summary. Algorithm code lives elsewhere: :func:`icbs.prune` (the BCD driver),
:func:`icbs.baselines.run_baseline` (one-shot methods), :mod:`icbs.models` and :mod:`icbs.data`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import icbs
import solvers
from icbs import checkpoint, export
from icbs.allocation import allocate
from icbs.batching import batch_size
from icbs.blocks import check_block_size
from icbs.config import IcbsConfig, ModelConfig
from icbs.evaluation import check_lm_eval_tasks, run_lm_eval
from icbs.executors import check_ray_address
from icbs.initialise import REFITTING_INITS
from icbs.models import model_kind
from icbs.models.base import resolve_device
from icbs.records import EvalRecord, RunReport, StepRecord
from icbs.state import MaskPattern, PruningState, layer_patterns
from solvers.composites import RecordingComposite

__all__ = [
    "RunOutcome",
    "Interrupted",
    "ProgressReporter",
    "run_prune",
    "run_evaluate",
    "run_baseline",
    "run_export_blocks",
    "primary_metric",
    "BASELINE_METHODS",
]

logger = logging.getLogger(__name__)

BASELINE_METHODS = ("magnitude", "wanda", "sparsegpt", "random", "alps")


@dataclasses.dataclass
class RunOutcome:
    """What a pipeline produced, for the CLI's summary.

    Attributes:
        out_dir: the output folder (``None`` for ``evaluate``, which writes nothing).
        metric: name of the headline metric (``"accuracy"`` or ``"perplexity"``).
        dense: metrics of the dense model (``None`` when not evaluated).
        init: metrics of the one-shot initial mask (``None`` when unknown).
        final: metrics of the final (pruned) model.
        density: fraction of prunable weights kept.
        report: the full report (also in ``report.json``).
    """

    out_dir: Path | None
    metric: str
    dense: dict[str, float] | None
    init: dict[str, float] | None
    final: dict[str, float]
    density: float | None
    report: dict[str, Any]


def primary_metric(metrics: Mapping[str, float]) -> str:
    """The headline metric of an ``adapter.evaluate`` result: accuracy for classifiers, else perplexity/loss."""
    for name in ("accuracy", "perplexity", "loss"):
        if name in metrics:
            return name
    return next(iter(metrics), "loss")


class ProgressReporter:
    """Progress of a :func:`icbs.prune` run: a tqdm bar over the time budget (or step limit) plus log lines.

    Pass :meth:`progress` as ``prune(progress=...)`` and the object itself in ``callbacks``: it logs every
    evaluation and, at most every ``log_every_s`` seconds, a summary line of the steps since the last one.

    Args:
        time_budget_s: the run's time budget in seconds (the bar's total), or ``None``.
        max_steps: the step limit, used as the bar's total when there is no time budget.
        log_every_s: seconds between step summary lines.
        enabled: draw the bar (the log lines are written either way).
    """

    def __init__(self, time_budget_s: float | None, max_steps: int | None, *, log_every_s: float = 30.0,
                 enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self._by_time = time_budget_s is not None
        total = time_budget_s if self._by_time else max_steps
        fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
               if self._by_time else None)
        self._bar = tqdm(total=total, unit="s" if self._by_time else "step", desc="icbs", disable=not enabled,
                         dynamic_ncols=True, bar_format=fmt, leave=True)
        self._log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._window: list[StepRecord] = []
        self.n_steps = 0
        self.n_accepted = 0

    def progress(self, elapsed_s: float, budget_s: float | None, step: int) -> None:
        """Move the bar: ``elapsed_s`` of ``budget_s`` seconds (or ``step`` of the step limit)."""
        target = min(elapsed_s, self._bar.total) if self._by_time and self._bar.total else float(step)
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)
        self._bar.set_postfix({"step": step, "accepted": self.n_accepted}, refresh=False)

    def __call__(self, event: StepRecord | EvalRecord) -> None:
        """Receive a step or evaluation record from the driver."""
        if isinstance(event, EvalRecord):
            logger.info("eval at %.0f s (step %d): %s", event.elapsed_s, event.step, _fmt(event.metrics))
            return
        self.n_steps += 1
        self.n_accepted += event.accepted
        self._window.append(event)
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            accepted = [e for e in self._window if e.accepted]
            gain = sum(e.predicted_delta for e in accepted)
            logger.info(
                "step %d, %.0f s: %d/%d moves accepted since last line (predicted dL %.4g)%s",
                event.step, event.elapsed_s, len(accepted), len(self._window), gain,
                f", batch loss {event.batch_loss:.5g}" if math.isfinite(event.batch_loss) else "",
            )
            self._window = []

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()


def _load(model_cfg: ModelConfig, progress: bool = False) -> Any:
    from icbs.models import load_model

    return load_model(model_cfg, progress=progress)


def _data(cfg: IcbsConfig, loaded: Any, *, targets: bool = True, progress: bool = False
          ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    from icbs.data import build_data
    from icbs.targets import with_dense_targets

    calibration, evaluation = build_data(cfg.calibration, cfg.eval, loaded)
    logger.info("data: %d calibration batches, %d evaluation batches", len(calibration), len(evaluation))
    if targets and cfg.calibration.targets != "labels":  # the model is still dense here, also when resuming
        calibration = with_dense_targets(loaded.adapter, loaded.model, calibration, cfg.calibration.top_k,
                                         seed=cfg.calibration.seed, progress=progress)
    return calibration, evaluation


def _layers(cfg: IcbsConfig, loaded: Any) -> dict[str, nn.Module]:
    layers = loaded.adapter.prunable_layers(loaded.model, include=cfg.model.include, exclude=cfg.model.exclude)
    if not layers:
        raise ValueError("no prunable layers found; check 'model.include' and 'model.exclude'")
    n_weights = sum(module.weight.numel() for module in layers.values())
    logger.info("%d prunable layers, %d weights", len(layers), n_weights)
    return dict(layers)


def _evaluator(loaded: Any, batches: Sequence[dict[str, torch.Tensor]],
               progress: bool = False) -> Callable[[nn.Module], dict[str, float]]:
    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in loaded.adapter.evaluate(model, batches, progress=progress).items()}

    return evaluate


def _check_zeros(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Every pruned weight must be exactly zero in the model that gets saved."""
    for name, mask in masks.items():
        weight = layers[name].weight.detach()
        leaked = (weight[~mask.to(weight.device)] != 0).sum().item()
        if leaked:
            raise RuntimeError(f"layer {name!r} has {leaked} non-zero weights outside its mask after pruning")


def _target_counts(cfg: IcbsConfig, masks: Mapping[str, torch.Tensor],
                   densities: Mapping[str, float] | None) -> dict[str, int]:
    """Each layer's kept count: the pattern's (:class:`~icbs.state.MaskPattern`, the driver's own rule) at the
    config's density, or at the layer's own from a non-uniform allocation."""
    patterns = layer_patterns(MaskPattern.from_config(cfg.pruning.density, cfg.pruning.pattern), masks, densities)
    return {name: patterns[name].layer_target((int(mask.shape[0]), int(mask.shape[1]))) for name, mask in masks.items()}


def _check_density(masks: Mapping[str, torch.Tensor], targets: Mapping[str, int]) -> None:
    """Each layer keeps exactly its target count."""
    for name, mask in masks.items():
        if int(mask.sum()) != targets[name]:
            logger.warning("layer %r keeps %d weights; the target is %d", name, int(mask.sum()), targets[name])


def _write_outputs(
    out_dir: Path,
    cfg: IcbsConfig,
    loaded: Any,
    masks: Mapping[str, torch.Tensor],
    report: dict[str, Any],
    progress: bool = False,
) -> None:
    if cfg.export.save_masks:
        export.save_masks(masks, out_dir / export.MASKS_NAME)
    if cfg.export.save_model:
        model_dir = export.save_model(loaded, out_dir, progress=progress)
        logger.info("pruned model saved to %s", model_dir)
    export.write_report(report, out_dir / export.REPORT_NAME)
    if cfg.export.plots:
        _plot(out_dir, report)


def _plot(out_dir: Path, report: Mapping[str, Any]) -> None:
    from icbs import plots

    metric = report.get("metric")
    timeline = [row for row in report.get("metric_vs_time", []) if metric in row and row[metric] is not None]
    if metric and timeline:
        plots.plot_metric_vs_time(
            [row["elapsed_s"] for row in timeline],
            [row[metric] for row in timeline],
            out_dir / export.PLOT_NAMES[0],
            metric=metric,
            init_value=(report.get("metrics", {}).get("init") or {}).get(metric),
            dense_value=(report.get("metrics", {}).get("dense") or {}).get(metric),
        )
    steps = [row for row in report.get("steps", []) if row["status"] != "SKIPPED"]
    if steps:
        plots.plot_delta_per_step(
            [row["step"] for row in steps],
            [row["predicted_delta"] for row in steps],
            out_dir / export.PLOT_NAMES[1],
            accepted=[row["accepted"] for row in steps],
        )


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after its output folder was created.

    Attributes:
        out_dir: the output folder.
        checkpoint: the run's checkpoint, kept for ``--resume``; ``None`` when the run had written none
            (its folder was then left as it was before the run).
    """

    def __init__(self, out_dir: Path, checkpoint: Path | None) -> None:
        super().__init__(str(out_dir))
        self.out_dir = out_dir
        self.checkpoint = checkpoint


@dataclasses.dataclass
class _Prepared:
    """What the pre-flight checked and built; nothing is written before it exists.

    Attributes:
        cfg: the config, with ``export.dir`` set to the folder actually used (what ``config.yaml`` records).
        plan: the output folder's plan (:func:`icbs.export.check_output_dir`).
        loaded, calibration, evaluation, layers: the model, its data and the layers to prune.
        timings: seconds spent loading the model and building the data.
    """

    cfg: IcbsConfig
    plan: export.OutputPlan
    loaded: Any
    calibration: list[dict[str, torch.Tensor]]
    evaluation: list[dict[str, torch.Tensor]]
    layers: dict[str, nn.Module]
    timings: dict[str, float]


def _preflight(cfg: IcbsConfig, target: Path, *, overwrite: bool, resume: bool, can_resume: bool,
               progress: bool = False) -> _Prepared:
    """Every check a run can make before it writes anything, cheapest first.

    The output folder (may it be written, is its checkpoint readable and made with the same settings),
    the device, the solver's size limit; then the model loads, the data is built, the layers are chosen
    and checked against the settings (:func:`_check_fit`). Raises on the first failure.
    """
    plan = export.check_output_dir(target, overwrite=overwrite or cfg.export.overwrite and not resume,
                                   resume=resume, can_resume=can_resume)
    if plan.resume_checkpoint is not None:
        checkpoint.check_resumable(checkpoint.load_checkpoint(plan.resume_checkpoint)["config"], cfg.to_dict())
    resolve_device(cfg.model.device)
    check_lm_eval_tasks(cfg.eval, model_kind(cfg.model))
    if cfg.bcd.executor == "ray":
        check_ray_address(cfg.bcd.ray_address, cfg.bcd.workers)
    limit = cfg.solver.max_variables()
    if limit is not None and cfg.blocks.block_size > limit:
        raise ValueError(f"'blocks.block_size' ({cfg.blocks.block_size}) exceeds the {limit} variables solver "
                         f"{cfg.solver.name!r} accepts; lower blocks.block_size or pick another solver.name")
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    loaded = _load(cfg.model, progress)
    timings["load_model_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    calibration, evaluation = _data(cfg, loaded, progress=progress)
    layers = _layers(cfg, loaded)
    _check_fit(cfg, layers, calibration)
    timings["data_s"] = time.perf_counter() - mark
    cfg = cfg.replace(export=dataclasses.replace(cfg.export, dir=str(plan.path)))
    return _Prepared(cfg, plan, loaded, calibration, evaluation, layers, timings)


def _check_fit(cfg: IcbsConfig, layers: Mapping[str, nn.Module], calibration: Sequence[dict[str, torch.Tensor]]) -> None:
    """The checks that need the model: pattern and density against every layer's shape, block size against
    every layer's free weights (the driver's own rules, run on shape-only stand-ins), samples per estimate
    against the calibration set.

    Raises:
        ValueError: names the setting and the layer.
    """
    pattern = MaskPattern.from_config(cfg.pruning.density, cfg.pruning.pattern)
    stand_ins = {name: _ShapeOnly(module.weight) for name, module in layers.items()}
    state = PruningState(stand_ins, pattern, cfg.blocks.tabu_frac)
    pruning = cfg.pruning
    # The owl allocation is known only after a forward pass: the densities at both ends of its range must fit.
    ends = (pruning.density - pruning.owl_lambda, pruning.density + pruning.owl_lambda)
    for density in [None, *(ends if pruning.allocation == "owl" else ())]:
        if density is not None:
            state.set_densities(dict.fromkeys(layers, density))
        free = state.free_counts(cfg.scoring.fix_frac_prune, cfg.scoring.fix_frac_keep)
        check_block_size(cfg.blocks.block_size, cfg.blocks.k, free)
    n_calibration = sum(batch_size(batch) for batch in calibration)
    if cfg.derivatives.n_samples > n_calibration:
        raise ValueError(f"'derivatives.n_samples' should be at most the {n_calibration} calibration samples "
                         f"(calibration.n_samples); got {cfg.derivatives.n_samples}")


class _ShapeOnly:
    """A layer stand-in whose weight has the real shape and dtype but no storage (``meta`` device)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")


def _start(prep: _Prepared) -> Path:
    """Create (or clear) the output folder and write ``config.yaml``: the first writes of a run."""
    path = export.prepare_output_dir(prep.plan)
    try:
        export.write_config(prep.cfg, path / export.CONFIG_NAME)
    except BaseException:
        _discard(prep.plan)
        raise
    return path


def _discard(plan: export.OutputPlan) -> None:
    """Remove what a run that failed before its first checkpoint wrote; a folder it created goes too."""
    try:
        export.discard_outputs(plan)
    except OSError as err:
        logger.warning("could not remove the outputs of the failed run in %s: %s", plan.path, err)


def _target(cfg: IcbsConfig, out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path(cfg.export.dir)


def _report(command: str, prep: _Prepared, masks: Mapping[str, torch.Tensor], metrics: dict[str, Any],
            timings: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The ``report.json`` of a pipeline (:class:`~icbs.records.RunReport`): shared fields, then the command's ``extra``."""
    densities = export.mask_densities(masks)
    return RunReport(
        command=command, model=prep.loaded.name, metric=primary_metric(metrics["final"]), metrics=metrics,
        density={"target": prep.cfg.pruning.density, "achieved": densities["total"], "per_layer": densities},
        metric_vs_time=extra.pop("metric_vs_time", []), steps=extra.pop("steps", []), timings=timings,
        seed=prep.cfg.bcd.seed, resumed=extra.pop("resumed", False), config=prep.cfg.to_dict(),
        versions=export.collect_versions(), **extra,
    ).to_dict()


def _finish(prep: _Prepared, masks: Mapping[str, torch.Tensor], targets: Mapping[str, int]) -> None:
    """Zero the pruned weights in the model and check the result: exact zeros, the target counts."""
    export.apply_masks(prep.layers, masks)
    _check_zeros(prep.layers, masks)
    _check_density(masks, targets)


def run_prune(
    cfg: IcbsConfig,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> RunOutcome:
    """Prune the configured model with icbs and write every output.

    Everything that can be checked is checked before the output folder is created (:func:`_preflight`).
    A run that fails or is interrupted keeps its checkpoint for ``--resume``; one that fails before its
    first checkpoint leaves the folder as it was.

    Args:
        cfg: validated config.
        out_dir: output folder (default ``cfg.export.dir``).
        overwrite: replace the icbs outputs of an existing folder.
        resume: continue the run whose checkpoint is in the folder (a folder whose run stopped before its
            first checkpoint starts that run again).
        progress: draw a progress bar.

    Returns:
        The dense, init and final metrics, the density and the report.

    Raises:
        OutputExistsError: the folder exists and neither ``overwrite`` nor ``resume`` is set.
        FileNotFoundError: ``resume`` without a run to continue.
        ValueError: a setting that does not fit the model, data or checkpoint (names the key).
        Interrupted: Ctrl-C or SIGTERM after the folder was created.
    """
    prep = _preflight(cfg, _target(cfg, out_dir), overwrite=overwrite, resume=resume, can_resume=True,
                      progress=progress)
    started = time.perf_counter()
    path = _start(prep)
    checkpoint_file = path / export.CHECKPOINT_NAME
    try:
        return _prune(prep, path, progress, started)
    except BaseException as err:
        if not checkpoint_file.is_file():
            _discard(prep.plan)
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(path, checkpoint_file if checkpoint_file.is_file() else None) from err
        raise


def _prune(prep: _Prepared, path: Path, progress: bool, started: float) -> RunOutcome:
    cfg, loaded = prep.cfg, prep.loaded
    timings = dict(prep.timings)
    evaluate = _evaluator(loaded, prep.evaluation, progress)
    dense = lm_eval_dense = None
    if cfg.eval.before:
        mark = time.perf_counter()
        dense = evaluate(loaded.model)
        timings["eval_dense_s"] = time.perf_counter() - mark
        logger.info("dense model: %s", _fmt(dense))
        lm_eval_dense = run_lm_eval(cfg.eval, loaded.model, loaded.tokenizer, "dense")
    reporter = ProgressReporter(cfg.bcd.time_budget, cfg.bcd.max_steps,
                                log_every_s=min(cfg.eval.every_s or 30.0, 30.0), enabled=progress)
    resumed = prep.plan.resume_checkpoint is not None
    mark = time.perf_counter()
    try:
        result = icbs.prune(loaded.model, cfg, prep.calibration, loaded.adapter.per_sample_loss, layers=prep.layers,
                            evaluate=evaluate, callbacks=[reporter], checkpoint_path=path / export.CHECKPOINT_NAME,
                            resume=resumed, progress=reporter.progress)
    finally:
        reporter.close()
    timings["prune_s"] = time.perf_counter() - mark
    masks = {name: mask.bool() for name, mask in result.masks.items()}
    # The driver leaves the model pruned; applying the masks again is a no-op then and a guarantee otherwise.
    _finish(prep, masks, {name: layer.target_kept for name, layer in result.report.layers.items()})
    core = result.report.to_dict()
    final = core.get("final_metrics")
    if not final:
        mark = time.perf_counter()
        final = evaluate(loaded.model)
        timings["eval_final_s"] = time.perf_counter() - mark
    init = core.get("init_metrics")
    metrics = {"dense": dense, "init": init, "final": final}
    timings["total_s"] = prep.timings["load_model_s"] + prep.timings["data_s"] + time.perf_counter() - started
    report = _report("prune", prep, masks, metrics, timings, metric_vs_time=list(core.get("evaluations") or []),
                     steps=[record.to_dict() for record in result.history], resumed=resumed, prune=core,
                     lm_eval={"dense": lm_eval_dense, "final": run_lm_eval(cfg.eval, loaded.model, loaded.tokenizer)})
    _write_outputs(path, cfg, loaded, masks, report, progress)
    (path / export.CHECKPOINT_NAME).unlink(missing_ok=True)  # the run finished: its outputs replace the checkpoint
    export.remove_temp_files(path)
    return RunOutcome(path, report["metric"], dense, init, final, report["density"]["achieved"], report)


def _fmt(metrics: Mapping[str, float] | None) -> str:
    if not metrics:
        return "n/a"
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _load_saved(cfg: IcbsConfig, model_dir: Path) -> Any:
    """Load a model written by :func:`export.save_model` (a run's output folder or its ``model/`` subfolder)."""
    if (model_dir / export.MODEL_DIR_NAME).is_dir():
        model_dir = model_dir / export.MODEL_DIR_NAME
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist")
    # Saved folders load like any local model folder (HF save_pretrained or icbs's classifier format).
    return _load(dataclasses.replace(cfg.model, builtin=None, path=str(model_dir), gguf_file=None))


def run_evaluate(cfg: IcbsConfig, *, model_dir: str | Path | None = None) -> RunOutcome:
    """Evaluate the configured model, or a saved pruned model, and report its density.

    Args:
        cfg: validated config (model and data sections are used).
        model_dir: a run's output folder or its ``model/`` subfolder; ``None`` evaluates ``cfg.model``.

    Returns:
        The metrics (in ``final``) and the density report (in ``report["density_report"]``).
    """
    from icbs.evaluation import density_report

    check_lm_eval_tasks(cfg.eval, model_kind(cfg.model))
    loaded = _load(cfg.model) if model_dir is None else _load_saved(cfg, Path(model_dir))
    _calibration, evaluation = _data(cfg, loaded, targets=False)  # evaluation only: no calibration loss
    layers = _layers(cfg, loaded)
    metrics = _evaluator(loaded, evaluation)(loaded.model)
    densities = density_report(loaded.model, layers)
    report = {"command": "evaluate", "model": loaded.name, "metric": primary_metric(metrics),
              "metrics": {"final": metrics}, "density_report": densities,
              "lm_eval": {"dense": None, "final": run_lm_eval(cfg.eval, loaded.model, loaded.tokenizer)}}
    return RunOutcome(None, primary_metric(metrics), None, None, metrics, _total_density(densities), report)


def _total_density(densities: Any) -> float | None:
    if isinstance(densities, Mapping):
        for key in ("global", "total", "density"):
            value = densities.get(key)
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, Mapping) and isinstance(value.get("density"), (int, float)):
                return float(value["density"])
    return None


def run_baseline(
    method: str,
    cfg: IcbsConfig,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> RunOutcome:
    """Prune with a one-shot baseline at the config's density and pattern, on the same data; write the outputs.

    Args:
        method: one of :data:`BASELINE_METHODS`.
        cfg: validated config.
        out_dir: output folder (default ``cfg.export.dir + "-" + method``).
        overwrite: replace the icbs outputs of an existing folder.

    Raises:
        ValueError: unknown method, or a setting that does not fit the model or data (names the key).
        OutputExistsError: the folder exists and ``overwrite`` is not set.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"'method' should be one of {', '.join(BASELINE_METHODS)}; got {method!r}")
    target = Path(out_dir) if out_dir is not None else Path(f"{cfg.export.dir.rstrip('/')}-{method}")
    prep = _preflight(cfg, target, overwrite=overwrite, resume=False, can_resume=False)
    started = time.perf_counter()
    path = _start(prep)
    try:
        return _baseline(method, prep, path, started)
    except BaseException:
        _discard(prep.plan)
        raise


def _baseline(method: str, prep: _Prepared, path: Path, started: float) -> RunOutcome:
    from icbs.baselines import run_baseline as baseline

    cfg, loaded = prep.cfg, prep.loaded
    evaluate = _evaluator(loaded, prep.evaluation)
    dense = evaluate(loaded.model) if cfg.eval.before else None
    if dense is not None:
        logger.info("dense model: %s", _fmt(dense))
    lm_eval_dense = run_lm_eval(cfg.eval, loaded.model, loaded.tokenizer, "dense") if cfg.eval.before else None
    mark = time.perf_counter()
    options = {"damping_frac": cfg.scoring.init_damping_frac} if method in REFITTING_INITS else {}
    loss_fn = loaded.adapter.per_sample_loss
    densities = allocate(cfg.pruning, loaded.model, prep.layers, batches=prep.calibration, loss_fn=loss_fn)
    masks = baseline(method, loaded.model, prep.layers, prep.calibration, loss_fn, density=cfg.pruning.density,
                     pattern=cfg.pruning.pattern, seed=cfg.bcd.seed, layer_densities=densities, **options)
    timings = {**prep.timings, "prune_s": time.perf_counter() - mark}
    masks = {name: mask.bool() for name, mask in masks.items()}
    _finish(prep, masks, _target_counts(cfg, masks, densities))
    final = evaluate(loaded.model)
    timings["total_s"] = prep.timings["load_model_s"] + prep.timings["data_s"] + time.perf_counter() - started
    report = _report("baseline", prep, masks, {"dense": dense, "final": final}, timings, method=method,
                     lm_eval={"dense": lm_eval_dense, "final": run_lm_eval(cfg.eval, loaded.model, loaded.tokenizer)})
    _write_outputs(path, dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, plots=False)),
                   loaded, masks, report)
    return RunOutcome(path, report["metric"], dense, None, final, report["density"]["achieved"], report)


def run_export_blocks(
    cfg: IcbsConfig,
    *,
    out_dir: str | Path,
    n_blocks: int = 8,
    overwrite: bool = False,
) -> list[Path]:
    """Run icbs until ``n_blocks`` block problems were solved and write them as files.

    Each block goes to ``blocks/block_NNNN.qp`` (plain text with the continuous data H, g, w0, d) and
    ``blocks/block_NNNN.cqm`` (dimod's CQM serialisation: ``dimod.ConstrainedQuadraticModel.from_file``);
    both read back with :meth:`solvers.CardinalityQP.read`. ``blocks/index.json`` lists, per block, the layer,
    step, warm start ``x_cur`` (the current mask, 1 = pruned), the configured solver's answer and energies.

    Args:
        cfg: validated config; the run stops after ``n_blocks`` steps (``bcd.max_steps``).
        out_dir: output folder.
        n_blocks: how many block problems to write.
        overwrite: replace the icbs outputs of an existing folder.

    Returns:
        The written problem files (``.qp`` then ``.cqm`` of each block).

    Raises:
        ValueError: ``n_blocks`` is not a positive int, or a setting does not fit the model or data.
        OutputExistsError: the folder exists and ``overwrite`` is not set.
    """
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks <= 0:
        raise ValueError(f"'n_blocks' should be a positive int; got {n_blocks!r}")
    prep = _preflight(cfg, Path(out_dir), overwrite=overwrite, resume=False, can_resume=False)
    path = _start(prep)
    try:
        return _export_blocks(prep, path, n_blocks)
    except BaseException:
        _discard(prep.plan)
        raise


def _export_blocks(prep: _Prepared, path: Path, n_blocks: int) -> list[Path]:
    cfg, loaded = prep.cfg, prep.loaded
    captured: list[dict[str, Any]] = []
    def keep(call: int, problem: Any, x_cur: Any, solution: Any) -> None:
        if call < n_blocks:
            captured.append({"problem": problem, "x_cur": x_cur, "x": solution.x, "energy": solution.energy,
                             "info": dict(solution.info)})

    recorder = RecordingComposite(solvers.get_solver(cfg.solver.name, **dict(cfg.solver.params)), keep)
    short = cfg.replace(bcd=dataclasses.replace(cfg.bcd, max_steps=n_blocks, checkpoint_every_s=None))
    result = icbs.prune(loaded.model, short, prep.calibration, loaded.adapter.per_sample_loss, layers=prep.layers,
                        solver=recorder)
    solved = [record.to_dict() for record in result.history if record.status != "SKIPPED"]
    blocks_dir = path / export.BLOCKS_DIR_NAME
    blocks_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    index = []
    for i, item in enumerate(captured):
        problem = item["problem"]
        stem = blocks_dir / f"block_{i:04d}"
        for suffix in (".qp", ".cqm"):
            problem.write(stem.with_suffix(suffix))
            written.append(stem.with_suffix(suffix))
        row = solved[i] if i < len(solved) else {}
        x_cur = item["x_cur"]
        index.append({
            "file": stem.with_suffix(".qp").name, "layer": row.get("layer"), "step": row.get("step"),
            "n": problem.n, "constraints": [[int(k), int(len(g))] for g, k in problem.constraints],
            "x_cur": x_cur, "energy_x_cur": problem.energy(x_cur) if x_cur is not None else None,
            "x_solver": item["x"], "energy_solver": item["energy"], "solver": cfg.solver.name,
            "status": item["info"].get("status"),
        })
    export.write_report({"config": cfg.to_dict(), "blocks": index}, blocks_dir / "index.json")
    logger.info("wrote %d block problems to %s", len(captured), blocks_dir)
    return written
