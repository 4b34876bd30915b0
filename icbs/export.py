"""Everything a run writes: the output folder, pruned weights, masks, the effective config and the report.

The output folder holds a fixed set of names (:data:`OUTPUT_NAMES`): ``model/`` (the pruned model, with the
zeros really in the weights: ``save_pretrained`` with safetensors for Hugging Face models, a state_dict
otherwise), ``masks.safetensors`` (one bool tensor per pruned layer, True = kept), ``config.yaml`` (the
effective config), ``report.json``, the PNG plots and ``checkpoint.pt``. An existing, non-empty folder is
never written into unless the caller asks for ``overwrite`` (which removes only those names) or ``resume``
(which continues the run whose checkpoint is there); :func:`prepare_output_dir` checks this before any
expensive work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from icbs.config import IcbsConfig
from icbs.exceptions import OutputExistsError
from icbs.state import mask_densities

__all__ = [
    "OUTPUT_NAMES",
    "CHECKPOINT_NAME",
    "MASKS_NAME",
    "REPORT_NAME",
    "CONFIG_NAME",
    "MODEL_DIR_NAME",
    "BLOCKS_DIR_NAME",
    "PLOT_NAMES",
    "prepare_output_dir",
    "apply_masks",
    "save_masks",
    "load_masks",
    "save_model",
    "write_config",
    "write_report",
    "read_report",
    "collect_versions",
    "to_jsonable",
    "mask_densities",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
MASKS_NAME = "masks.safetensors"
REPORT_NAME = "report.json"
CONFIG_NAME = "config.yaml"
MODEL_DIR_NAME = "model"
PLOT_NAMES = ("metric_vs_time.png", "delta_loss_per_step.png")
BLOCKS_DIR_NAME = "blocks"
OUTPUT_NAMES = (
    MODEL_DIR_NAME,
    MASKS_NAME,
    REPORT_NAME,
    CONFIG_NAME,
    CHECKPOINT_NAME,
    BLOCKS_DIR_NAME,
    "run.log",
) + PLOT_NAMES


def prepare_output_dir(out_dir: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Check that ``out_dir`` may be written and create it.

    Call this before loading a model: a refused folder costs nothing.

    Args:
        out_dir: the output folder.
        overwrite: remove the icbs outputs (:data:`OUTPUT_NAMES`) already in the folder; other files stay.
        resume: the folder must hold a checkpoint of the run to continue; nothing is removed.

    Returns:
        The folder as a :class:`Path` (created if it did not exist).

    Raises:
        OutputExistsError: the folder exists, is not empty, and neither flag allows writing into it.
        FileNotFoundError: ``resume`` is set and the folder holds no checkpoint.
        ValueError: ``out_dir`` exists and is not a folder, or both flags are set.
    """
    path = Path(out_dir)
    if overwrite and resume:
        raise ValueError("'--overwrite' and '--resume' exclude each other; pick one")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {str(path)!r} exists and is not a folder")
    if resume:
        if not (path / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(
                f"cannot resume: no {CHECKPOINT_NAME} in output folder {str(path)!r}; run without --resume"
            )
        return path
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"output folder {str(path)!r} already exists and is not empty; "
                "pass --overwrite to replace its icbs outputs, --resume to continue its run, or --out DIR"
            )
        for name in OUTPUT_NAMES:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        logger.info("overwriting icbs outputs in %s", path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@torch.no_grad()
def apply_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place: ``weight *= keep_mask`` for every masked layer.

    Args:
        layers: layer name -> module with a ``weight`` of shape ``(n_out, n_in)``.
        masks: layer name -> bool keep-mask of the weight's shape (True = kept).

    Raises:
        ValueError: a mask names no layer or has the wrong shape (checked before any weight changes).
    """
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"mask for layer {name!r} matches no prunable layer; layers are {sorted(layers)}")
        weight = layers[name].weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask for layer {name!r} should have shape {tuple(weight.shape)}; got {tuple(mask.shape)}"
            )
    for name, mask in masks.items():
        weight = layers[name].weight
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write keep-masks (True = kept) to a safetensors file, one bool tensor per layer name."""
    tensors = {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp))


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the keep-masks written by :func:`save_masks`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {str(path)!r} does not exist")
    return {name: tensor.bool() for name, tensor in load_file(str(path)).items()}


def save_model(loaded: Any, out_dir: str | Path, *, progress: bool = False) -> Path:
    """Save the (already pruned) model through its adapter into ``out_dir/model``.

    Args:
        loaded: a :class:`icbs.models.LoadedModel` (``model``, ``adapter``, ``tokenizer``).
        out_dir: the run's output folder.
        progress: let the adapter show a progress bar.

    Returns:
        The model folder.
    """
    model_dir = Path(out_dir) / MODEL_DIR_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    loaded.adapter.save(loaded.model, model_dir, tokenizer=loaded.tokenizer, progress=progress)
    return model_dir


def write_config(config: IcbsConfig, path: str | Path) -> None:
    """Write the effective config as YAML (loadable again with :func:`icbs.load_config`)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, paths and tuples to plain JSON types; non-finite floats become None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist()) if value.numel() != 1 else to_jsonable(value.item())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def write_report(report: Mapping[str, Any], path: str | Path) -> None:
    """Write the run report as indented JSON (atomically)."""
    text = json.dumps(to_jsonable(report), indent=2)
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json``."""
    return json.loads(Path(path).read_text())


def collect_versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for package in ("icbs", "torch", "numpy", "scipy", "transformers", "dimod", "dwave-neal", "ortools", "numba"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    versions["torch_runtime"] = torch.__version__
    return versions


def _atomic(path: str | Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
