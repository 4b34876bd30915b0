"""The end-to-end pipelines behind the CLI: config -> model -> data -> evaluate -> prune -> evaluate -> save.

Each ``run_*`` function takes a validated :class:`~icbs.config.IcbsConfig` and plain arguments (never an
argparse namespace), checks the output folder before anything expensive, and returns a small result object
the CLI turns into a summary. Algorithm code lives elsewhere: :func:`icbs.prune` (the BCD driver),
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
import yaml
from torch import nn

from icbs import export
from icbs.config import IcbsConfig, ModelConfig

__all__ = [
    "RunOutcome",
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
_DENSITY_TOL = 1e-9


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
        self._window: list[dict[str, Any]] = []
        self.n_steps = 0
        self.n_accepted = 0

    def progress(self, elapsed_s: float, budget_s: float | None, step: int) -> None:
        """Move the bar: ``elapsed_s`` of ``budget_s`` seconds (or ``step`` of the step limit)."""
        target = min(elapsed_s, self._bar.total) if self._by_time and self._bar.total else float(step)
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)
        self._bar.set_postfix({"step": step, "accepted": self.n_accepted}, refresh=False)

    def __call__(self, event: dict[str, Any]) -> None:
        """Receive a step or evaluation record from the driver."""
        if event.get("event") == "eval":
            metrics = event.get("metrics") or {}
            logger.info("eval at %.0f s (step %s): %s", event.get("elapsed_s", 0.0), event.get("step"), _fmt(metrics))
            return
        self.n_steps += 1
        self.n_accepted += bool(event.get("accepted"))
        self._window.append(event)
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            accepted = [e for e in self._window if e.get("accepted")]
            gain = sum(float(e.get("predicted_delta") or 0.0) for e in accepted)
            batch_loss = float(event.get("batch_loss") or float("nan"))
            logger.info(
                "step %s, %.0f s: %d/%d moves accepted since last line (predicted dL %.4g)%s",
                event.get("step"), float(event.get("elapsed_s") or 0.0), len(accepted), len(self._window), gain,
                f", batch loss {batch_loss:.5g}" if math.isfinite(batch_loss) else "",
            )
            self._window = []

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()


def _load(model_cfg: ModelConfig) -> Any:
    from icbs.models import load_model

    return load_model(model_cfg)


def _data(cfg: IcbsConfig, loaded: Any) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    from icbs.data import build_data

    calibration, evaluation = build_data(cfg.calibration, cfg.eval, loaded)
    logger.info("data: %d calibration batches, %d evaluation batches", len(calibration), len(evaluation))
    return calibration, evaluation


def _layers(cfg: IcbsConfig, loaded: Any) -> dict[str, nn.Module]:
    layers = loaded.adapter.prunable_layers(loaded.model, include=cfg.model.include, exclude=cfg.model.exclude)
    if not layers:
        raise ValueError("no prunable layers found; check 'model.include' and 'model.exclude'")
    n_weights = sum(module.weight.numel() for module in layers.values())
    logger.info("%d prunable layers, %d weights", len(layers), n_weights)
    return dict(layers)


def _evaluator(loaded: Any, batches: Sequence[dict[str, torch.Tensor]]) -> Callable[[nn.Module], dict[str, float]]:
    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in loaded.adapter.evaluate(model, batches).items()}

    return evaluate


def _check_zeros(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Every pruned weight must be exactly zero in the model that gets saved."""
    for name, mask in masks.items():
        weight = layers[name].weight.detach()
        leaked = (weight[~mask.to(weight.device)] != 0).sum().item()
        if leaked:
            raise RuntimeError(f"layer {name!r} has {leaked} non-zero weights outside its mask after pruning")


def _check_density(cfg: IcbsConfig, layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Each layer keeps exactly ``round(density * size)`` weights (unstructured) or the pattern's count."""
    from icbs.config import parse_pattern

    kind, n, m = parse_pattern(cfg.pruning.pattern)
    for name, mask in masks.items():
        kept = int(mask.sum())
        if kind == "unstructured":
            expected = round(cfg.pruning.density * mask.numel())
        elif kind == "per_output":
            expected = round(cfg.pruning.density * mask.shape[1]) * mask.shape[0]
        else:
            expected = mask.numel() * n // m
        if kept != expected:
            logger.warning("layer %r keeps %d weights; the target is %d", name, kept, expected)


def _write_outputs(
    out_dir: Path,
    cfg: IcbsConfig,
    loaded: Any,
    masks: Mapping[str, torch.Tensor],
    report: dict[str, Any],
) -> None:
    if cfg.export.save_masks:
        export.save_masks(masks, out_dir / export.MASKS_NAME)
    if cfg.export.save_model:
        model_dir = export.save_model(loaded, out_dir)
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
    steps = [row for row in report.get("steps", []) if _predicted(row) is not None]
    if steps:
        plots.plot_delta_per_step(
            [row.get("step", i) for i, row in enumerate(steps)],
            [_predicted(row) for row in steps],
            out_dir / export.PLOT_NAMES[1],
            accepted=[bool(row.get("accepted", True)) for row in steps],
        )


def _predicted(row: Mapping[str, Any]) -> float | None:
    for key in ("predicted_delta", "predicted_dl", "delta_pred", "energy"):
        value = row.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _prepare(cfg: IcbsConfig, out_dir: str | Path | None, *, overwrite: bool, resume: bool) -> Path:
    target = Path(out_dir) if out_dir is not None else Path(cfg.export.dir)
    path = export.prepare_output_dir(target, overwrite=overwrite or cfg.export.overwrite and not resume,
                                     resume=resume)
    config_path = path / export.CONFIG_NAME
    if resume and config_path.is_file():
        saved = yaml.safe_load(config_path.read_text()) or {}
        if _comparable(saved) != _comparable(cfg.to_dict()):
            logger.warning("the config differs from the one the run started with (%s); continuing with the new one",
                           config_path)
    export.write_config(cfg, config_path)
    return path


def _comparable(data: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data.pop("export", None)
    bcd = dict(data.get("bcd") or {})
    for key in ("time_budget", "max_steps", "max_epochs", "checkpoint_every_s"):
        bcd.pop(key, None)
    data["bcd"] = bcd
    return data


def run_prune(
    cfg: IcbsConfig,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> RunOutcome:
    """Prune the configured model with icbs and write every output.

    Args:
        cfg: validated config.
        out_dir: output folder (default ``cfg.export.dir``).
        overwrite: replace the icbs outputs of an existing folder.
        resume: continue the run whose checkpoint is in the folder.
        progress: draw a progress bar.

    Returns:
        The dense, init and final metrics, the density and the report.

    Raises:
        OutputExistsError: the folder exists and neither ``overwrite`` nor ``resume`` is set.
        FileNotFoundError: ``resume`` without a checkpoint.
    """
    import icbs

    path = _prepare(cfg, out_dir, overwrite=overwrite, resume=resume)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = _load(cfg.model)
    timings["load_model_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    calibration, evaluation = _data(cfg, loaded)
    layers = _layers(cfg, loaded)
    evaluate = _evaluator(loaded, evaluation)
    timings["data_s"] = time.perf_counter() - mark
    dense = None
    if cfg.eval.before:
        mark = time.perf_counter()
        dense = evaluate(loaded.model)
        timings["eval_dense_s"] = time.perf_counter() - mark
        logger.info("dense model: %s", _fmt(dense))
    reporter = ProgressReporter(cfg.bcd.time_budget, cfg.bcd.max_steps,
                                log_every_s=min(cfg.eval.every_s or 30.0, 30.0), enabled=progress)
    mark = time.perf_counter()
    try:
        result = icbs.prune(
            loaded.model,
            cfg,
            calibration,
            loaded.adapter.per_sample_loss,
            layers=layers,
            evaluate=evaluate,
            callbacks=[reporter],
            checkpoint_path=path / export.CHECKPOINT_NAME,
            resume=resume,
            progress=reporter.progress,
        )
    finally:
        reporter.close()
    timings["prune_s"] = time.perf_counter() - mark
    masks = {name: mask.bool() for name, mask in result.masks.items()}
    # The driver leaves the model pruned; applying the masks again is a no-op then and a guarantee otherwise.
    export.apply_masks(layers, masks)
    _check_zeros(layers, masks)
    _check_density(cfg, layers, masks)
    core = dict(result.report or {})
    final = core.get("final_metrics")
    if not final:
        mark = time.perf_counter()
        final = evaluate(loaded.model)
        timings["eval_final_s"] = time.perf_counter() - mark
    init = core.get("init_metrics")
    metric = primary_metric(final)
    densities = export.mask_densities(masks)
    report: dict[str, Any] = {
        "command": "prune",
        "model": loaded.name,
        "metric": metric,
        "metrics": {"dense": dense, "init": init, "final": final},
        "density": {"target": cfg.pruning.density, "achieved": densities["total"], "per_layer": densities},
        "metric_vs_time": list(core.get("evaluations") or []),
        "steps": list(result.history),
        "timings": timings,
        "seed": cfg.bcd.seed,
        "resumed": resume,
        "config": cfg.to_dict(),
        "versions": export.collect_versions(),
        "prune": core,
    }
    timings["total_s"] = time.perf_counter() - started
    _write_outputs(path, cfg, loaded, masks, report)
    checkpoint = path / export.CHECKPOINT_NAME
    if checkpoint.exists():
        checkpoint.unlink()  # the run finished: its outputs replace the checkpoint
    return RunOutcome(path, metric, dense, init, final, densities["total"], report)


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

    loaded = _load(cfg.model) if model_dir is None else _load_saved(cfg, Path(model_dir))
    _calibration, evaluation = _data(cfg, loaded)
    layers = _layers(cfg, loaded)
    metrics = _evaluator(loaded, evaluation)(loaded.model)
    densities = density_report(loaded.model, layers)
    report = {"command": "evaluate", "model": loaded.name, "metric": primary_metric(metrics),
              "metrics": {"final": metrics}, "density_report": densities}
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
        ValueError: unknown method.
        OutputExistsError: the folder exists and ``overwrite`` is not set.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"'method' should be one of {', '.join(BASELINE_METHODS)}; got {method!r}")
    target = Path(out_dir) if out_dir is not None else Path(f"{cfg.export.dir.rstrip('/')}-{method}")
    path = _prepare(cfg, target, overwrite=overwrite, resume=False)
    from icbs.baselines import run_baseline as baseline

    started = time.perf_counter()
    loaded = _load(cfg.model)
    calibration, evaluation = _data(cfg, loaded)
    layers = _layers(cfg, loaded)
    evaluate = _evaluator(loaded, evaluation)
    dense = evaluate(loaded.model) if cfg.eval.before else None
    if dense is not None:
        logger.info("dense model: %s", _fmt(dense))
    mark = time.perf_counter()
    masks = baseline(method, loaded.model, layers, calibration, loaded.adapter.per_sample_loss,
                     density=cfg.pruning.density, pattern=cfg.pruning.pattern, seed=cfg.bcd.seed)
    prune_s = time.perf_counter() - mark
    masks = {name: mask.bool() for name, mask in masks.items()}
    export.apply_masks(layers, masks)
    _check_zeros(layers, masks)
    _check_density(cfg, layers, masks)
    final = evaluate(loaded.model)
    metric = primary_metric(final)
    densities = export.mask_densities(masks)
    report = {
        "command": "baseline",
        "method": method,
        "model": loaded.name,
        "metric": metric,
        "metrics": {"dense": dense, "final": final},
        "density": {"target": cfg.pruning.density, "achieved": densities["total"], "per_layer": densities},
        "timings": {"prune_s": prune_s, "total_s": time.perf_counter() - started},
        "seed": cfg.bcd.seed,
        "config": cfg.to_dict(),
        "versions": export.collect_versions(),
    }
    _write_outputs(path, dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, plots=False)),
                   loaded, masks, report)
    return RunOutcome(path, metric, dense, None, final, densities["total"], report)


def _recording_solver(child_name: str, sink: list[dict[str, Any]], limit: int) -> str:
    """Register a composite solver that records each (problem, warm start, answer) and delegates to ``child_name``.

    The driver builds its solver by name from the config, so recording needs a registered name; the class
    accepts exactly the child's parameters (the config's ``solver.params`` stay valid). Returns that name.
    """
    import solvers

    child_cls = solvers.get_solver_class(child_name)

    class _Recorder(solvers.Solver):
        name = f"record-{child_name}-{id(sink):x}"
        parameters = dict(child_cls.parameters)
        properties = dict(child_cls.properties)

        def __init__(self, **params: Any) -> None:
            super().__init__(**params)
            self.child = child_cls(**params)

        def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
            return params  # the child checks them

        def _solve(self, problem: Any, initial_state: Any, seed: int, time_limit_s: float | None) -> Any:
            solution = self.child.solve(problem, initial_state=initial_state, seed=seed, time_limit_s=time_limit_s)
            if len(sink) < limit:
                sink.append({"problem": problem, "x_cur": initial_state, "x": solution.x,
                             "energy": solution.energy, "info": dict(solution.info)})
            return solution.x, dict(solution.info)

        def close(self) -> None:
            self.child.close()

    _Recorder.__qualname__ = _Recorder.__name__ = f"Recorder_{child_cls.__name__}"
    solvers.register(_Recorder)
    return _Recorder.name


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
        ValueError: ``n_blocks`` is not a positive int.
        OutputExistsError: the folder exists and ``overwrite`` is not set.
    """
    import icbs

    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks <= 0:
        raise ValueError(f"'n_blocks' should be a positive int; got {n_blocks!r}")
    path = _prepare(cfg, out_dir, overwrite=overwrite, resume=False)
    loaded = _load(cfg.model)
    calibration, _evaluation = _data(cfg, loaded)
    layers = _layers(cfg, loaded)
    captured: list[dict[str, Any]] = []
    recorder = _recording_solver(cfg.solver.name, captured, n_blocks)
    short = cfg.replace(
        solver=dataclasses.replace(cfg.solver, name=recorder),
        bcd=dataclasses.replace(cfg.bcd, max_steps=n_blocks, checkpoint_every_s=None),
    )
    steps: list[dict[str, Any]] = []
    icbs.prune(loaded.model, short, calibration, loaded.adapter.per_sample_loss, layers=layers,
               callbacks=[lambda event: steps.append(event) if event.get("event") == "step" else None])
    solved = [row for row in steps if row.get("status") != "SKIPPED"]
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
