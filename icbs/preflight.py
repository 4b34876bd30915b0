"""Checks of :func:`icbs.prune`'s arguments, made before the model is touched.

Everything a run can know to be wrong before its first forward pass is checked here: the argument
types, the config, the layers and the pattern, the block size against every layer's free weights,
the solver against the block size, and the checkpoint folder. Each error names the argument or the
config key that fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

import solvers
from icbs.blocks import check_block_size
from icbs.config import IcbsConfig
from icbs.layers import check_layers, find_prunable
from icbs.state import MaskPattern, PruningState

__all__ = ["check_arguments", "resolve_solver", "pruning_state"]


def check_arguments(model: Any, config: Any, loss_fn: Any, hooks: Any, resume: bool) -> None:
    """Raise ``TypeError``/``ValueError``/``FileNotFoundError`` naming the first bad argument of ``prune``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' should be an nn.Module; got {type(model).__name__}")
    if not isinstance(config, IcbsConfig):
        raise TypeError(f"'config' should be an IcbsConfig (see icbs.load_config); got {type(config).__name__}")
    config.validate()
    if not callable(loss_fn):
        raise TypeError("'loss_fn' should be callable as loss_fn(model, batch) -> (B,) per-sample losses")
    for callback in hooks.callbacks:
        if not callable(callback):
            raise TypeError(f"'callbacks' should hold callables; got {callback!r}")
    if hooks.progress is not None and not callable(hooks.progress):
        raise TypeError(f"'progress' should be callable(elapsed_s, budget_s, step); got {hooks.progress!r}")
    every = hooks.eval_every_s
    if every is not None and (not isinstance(every, (int, float)) or not every > 0):
        raise ValueError(f"'eval_every_s' should be a positive number of seconds or None; got {every!r}")
    if resume and hooks.checkpoint_path is None:
        raise ValueError("'resume' needs 'checkpoint_path'")
    if hooks.checkpoint_path is not None and not hooks.checkpoint_path.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(hooks.checkpoint_path.parent)!r} does not exist")


def resolve_solver(config: IcbsConfig, solver: solvers.Solver | None) -> solvers.Solver:
    """The configured solver (or the one given), checked against ``blocks.block_size``."""
    if solver is None:
        solver = solvers.get_solver(config.solver.name, **dict(config.solver.params))
    elif not isinstance(solver, solvers.Solver):
        raise TypeError(f"'solver' should be a solvers.Solver instance or None; got {type(solver).__name__}")
    limit = solver.params.get("max_variables", solver.properties.get("max_variables"))
    if limit is not None and config.blocks.block_size > int(limit):
        raise ValueError(
            f"'blocks.block_size' ({config.blocks.block_size}) exceeds the {limit} variables solver "
            f"{solver.name!r} accepts; lower blocks.block_size or pick another solver.name"
        )
    return solver




def pruning_state(model: nn.Module, config: IcbsConfig, layers: Mapping[str, nn.Module] | None) -> PruningState:
    """The run's layers (given, or found by ``model.include``/``exclude``) in a fresh state, block size checked."""
    chosen = find_prunable(model, config.model.include, config.model.exclude) if layers is None else check_layers(model, layers)
    state = PruningState(chosen, MaskPattern.from_config(config.pruning.density, config.pruning.pattern),
                         config.blocks.tabu_frac)
    check_block_size(config.blocks.block_size, config.blocks.k,
                     state.free_counts(config.scoring.fix_frac_prune, config.scoring.fix_frac_keep))
    return state
