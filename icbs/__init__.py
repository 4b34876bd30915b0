"""icbs: prune neural networks with the iterative Combinatorial Brain Surgeon.

The main entry point is :func:`prune`; the lower-level pieces (the pruning state, scoring, block
selection, checkpoints) are exported for research use. See README.md and docs/INTERNALS.md.

Example::

    cfg = icbs.load_config("examples/mnist_mlp.yaml")
    result = icbs.prune(model, cfg, calibration_batches, loss_fn)
    result.masks, result.report["final_loss"]
"""

from icbs.bcd import PruneResult, prune
from icbs.blocks import check_block_size, select_block
from icbs.checkpoint import load_checkpoint, save_checkpoint
from icbs.config import IcbsConfig, config_from_dict, load_config
from icbs.exceptions import ConfigError, InfeasibleSolutionError, NonFiniteDerivativeError, PruningError
from icbs.layers import check_layers, find_prunable
from icbs.moves import check_solution
from icbs.records import EvalRecord, PruneSummary, RunReport, StepRecord
from icbs.refit import reconstruct_weights
from icbs.schedule import layer_schedule, step_seed
from icbs.scoring import (
    collect_activation_norms,
    collect_gradients,
    collect_input_covariances,
    init_mask,
    init_masks,
    score,
)
from icbs.state import LayerState, MaskPattern, PruningState

__all__ = [
    "IcbsConfig",
    "load_config",
    "config_from_dict",
    "ConfigError",
    "PruningError",
    "NonFiniteDerivativeError",
    "InfeasibleSolutionError",
    "prune",
    "PruneResult",
    "PruneSummary",
    "StepRecord",
    "EvalRecord",
    "RunReport",
    "find_prunable",
    "check_layers",
    "MaskPattern",
    "LayerState",
    "PruningState",
    "score",
    "init_mask",
    "init_masks",
    "collect_activation_norms",
    "collect_gradients",
    "collect_input_covariances",
    "select_block",
    "check_block_size",
    "layer_schedule",
    "step_seed",
    "check_solution",
    "reconstruct_weights",
    "save_checkpoint",
    "load_checkpoint",
]
__version__ = "0.1.0"
