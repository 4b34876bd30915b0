"""Everything a run writes: the output folder, pruned weights, masks, the effective config and the report.

The output folder holds a fixed set of names (:data:`OUTPUT_NAMES`): ``model/`` (the pruned model, with the
zeros really in the weights: ``save_pretrained`` with safetensors for Hugging Face models, a state_dict
otherwise; :data:`MODEL_MANIFEST_NAME` lists the files icbs wrote there), ``masks.safetensors`` (one bool
tensor per pruned layer, True = kept), ``config.yaml`` (the effective config), ``report.json``, the PNG plots
and ``checkpoint.pt``. An existing, non-empty folder is never written into unless the caller asks for
``overwrite`` (which removes only icbs's own files: those names, the files the manifest lists, the block
files, and temporary files of interrupted writes) or ``resume`` (which continues the run whose checkpoint is
there). :func:`check_output_dir` decides this without writing anything, so a run can check it before any
expensive work and create the folder (:func:`prepare_output_dir`) only once every other check has passed.
Every file is written through :func:`atomic_write`: readers see the old file or the new one, a failed write
raises ``OSError`` naming the file, and files get the usual permissions (``0o666`` less the umask).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import platform
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
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
    "MODEL_MANIFEST_NAME",
    "OutputPlan",
    "check_output_dir",
    "prepare_output_dir",
    "remove_temp_files",
    "discard_outputs",
    "atomic_write",
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
MODEL_MANIFEST_NAME = "icbs_files.txt"
_TEMP_SUFFIX = ".tmp"
_BLOCK_FILE_GLOBS = ("block_*.qp", "block_*.cqm", "index.json")
OUTPUT_NAMES = (
    MODEL_DIR_NAME,
    MASKS_NAME,
    REPORT_NAME,
    CONFIG_NAME,
    CHECKPOINT_NAME,
    BLOCKS_DIR_NAME,
    "run.log",
) + PLOT_NAMES


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """What :func:`check_output_dir` decided about an output folder.

    Attributes:
        path: the folder.
        existed: it existed before this run.
        created: the top folder this run creates (``path`` or a missing parent), ``None`` when ``path``
            exists; a failed run removes it again when it holds nothing.
        clear: icbs's files in it are to be removed (``overwrite``).
        resume_checkpoint: the checkpoint to continue from, or ``None`` (a fresh start; also a ``resume``
            of a run that was stopped before its first checkpoint was complete).
    """

    path: Path
    existed: bool
    created: Path | None
    clear: bool
    resume_checkpoint: Path | None


def check_output_dir(
    out_dir: str | Path, *, overwrite: bool = False, resume: bool = False, can_resume: bool = True
) -> OutputPlan:
    """Decide whether ``out_dir`` may be written, without writing anything.

    Args:
        out_dir: the output folder.
        overwrite: icbs's files already in the folder may be replaced; other files stay.
        resume: continue the run checkpointed in the folder. A folder whose run was stopped before its
            first checkpoint was complete (``config.yaml`` but no ``checkpoint.pt`` and no ``report.json``)
            starts that run again.
        can_resume: the command supports ``--resume`` (named in the refusal message only then).

    Raises:
        OutputExistsError: the folder exists, is not empty, and neither flag allows writing into it.
        FileNotFoundError: ``resume`` is set and the folder holds no run to continue.
        ValueError: ``out_dir`` exists and is not a folder, both flags are set, or a finished run is resumed.
        OSError: the folder cannot be created or written (names the folder).
    """
    path = Path(out_dir)
    if overwrite and resume:
        raise ValueError("'--overwrite' and '--resume' exclude each other; pick one")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {str(path)!r} exists and is not a folder")
    existed = path.is_dir()
    created = None
    if not existed:
        created = path
        while not created.parent.exists() and created.parent != created:
            created = created.parent
    if resume:
        return OutputPlan(path, existed, created, False, _resume_checkpoint(path))
    if existed and any(path.iterdir()) and not overwrite:
        hint = "--overwrite to replace its icbs outputs, --resume to continue its run," if can_resume else (
            "--overwrite to replace its icbs outputs")
        raise OutputExistsError(f"output folder {str(path)!r} already exists and is not empty; pass {hint} or --out DIR")
    _check_writable(path)
    return OutputPlan(path, existed, created, overwrite and existed, None)


def _resume_checkpoint(path: Path) -> Path | None:
    checkpoint = path / CHECKPOINT_NAME
    if checkpoint.is_file():
        _check_writable(path)
        return checkpoint
    if (path / REPORT_NAME).is_file():
        raise ValueError(f"the run in output folder {str(path)!r} has finished (its {REPORT_NAME} is written); "
                         "nothing to resume: pass --overwrite to run it again, or --out DIR")
    if (path / CONFIG_NAME).is_file():
        _check_writable(path)
        return None  # stopped before its first checkpoint was complete: start it again
    raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_NAME} in output folder {str(path)!r}; run without --resume")


def _check_writable(path: Path) -> None:
    """Create and delete a probe file in ``path`` (or in its nearest existing parent): permissions alone do
    not tell, e.g. for root on a read-only or immutable folder."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(errno.ENOTDIR, f"cannot create output folder {str(path)!r}: {str(existing)!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".icbs-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        what = "write into output folder" if existing == path else "create output folder"
        raise OSError(err.errno, f"cannot {what} {str(path)!r}: {err.strerror}") from err


def prepare_output_dir(
    out_dir: str | Path | OutputPlan, *, overwrite: bool = False, resume: bool = False, can_resume: bool = True
) -> Path:
    """Check the output folder (:func:`check_output_dir`, unless given its plan), then create it or clear it.

    Returns:
        The folder as a :class:`Path` (created if it did not exist). With ``overwrite``, icbs's files in it
        are removed first (:data:`OUTPUT_NAMES`, the files ``model/`` lists in its manifest, block files and
        temporary files); a resumed folder only loses the temporary files of interrupted writes.

    Raises:
        The errors of :func:`check_output_dir`; ``OSError`` naming the folder when it cannot be created.
    """
    plan = out_dir if isinstance(out_dir, OutputPlan) else check_output_dir(
        out_dir, overwrite=overwrite, resume=resume, can_resume=can_resume)
    path = plan.path
    try:
        if plan.clear:
            _remove_outputs(path)
            logger.info("overwriting icbs outputs in %s", path)
        path.mkdir(parents=True, exist_ok=True)
        remove_temp_files(path)
    except OSError as err:
        raise OSError(err.errno, f"cannot prepare output folder {str(path)!r}: {err.strerror}") from err
    return path


def _remove_outputs(path: Path) -> None:
    """Remove icbs's own files from an output folder; anything else stays."""
    for name in OUTPUT_NAMES:
        target = path / name
        if name == MODEL_DIR_NAME and target.is_dir() and not target.is_symlink():
            _remove_listed(target, _manifest(target) + [MODEL_MANIFEST_NAME])
        elif name == BLOCKS_DIR_NAME and target.is_dir() and not target.is_symlink():
            _remove_listed(target, [p.name for pattern in _BLOCK_FILE_GLOBS for p in target.glob(pattern)])
        elif target.exists() or target.is_symlink():
            target.unlink()


def _manifest(model_dir: Path) -> list[str]:
    manifest = model_dir / MODEL_MANIFEST_NAME
    if not manifest.is_file():
        return []
    names = [line.strip() for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name for name in names if not Path(name).is_absolute() and ".." not in Path(name).parts]


def _remove_listed(folder: Path, names: list[str]) -> None:
    """Remove the listed files of ``folder``, then the sub-folders and the folder itself if that emptied them."""
    for name in names:
        target = folder / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def discard_outputs(plan: OutputPlan) -> None:
    """Remove the icbs files a failed run wrote into ``plan.path``, and the folder when the run created it.

    Files that are not icbs's stay, and so does a folder that still holds any.
    """
    path = plan.path
    if not path.is_dir():
        return
    _remove_outputs(path)
    remove_temp_files(path)
    if plan.created is None:
        return
    folder = path
    while not any(folder.iterdir()):
        folder.rmdir()
        if folder == plan.created:
            break
        folder = folder.parent


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_write` calls left in ``folder``.

    Only names icbs writes are touched (``checkpoint.pt.<random>.tmp``, ``.model.<random>.tmp/``...).
    Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    patterns = [f"{MODEL_DIR_NAME}/{MODEL_MANIFEST_NAME}.*{_TEMP_SUFFIX}"]
    for name in OUTPUT_NAMES:
        patterns += [f"{name}.*{_TEMP_SUFFIX}", f".{name}.*{_TEMP_SUFFIX}"]
    for leftover in (found for pattern in patterns for found in folder.glob(pattern)):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
        removed.append(leftover)
    if removed:
        logger.info("removed %d temporary files of interrupted writes in %s", len(removed), folder)
    return removed


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
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


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

    The adapter writes into a temporary sibling folder; the files then move into ``model/`` after their
    names are listed in ``model/``:data:`MODEL_MANIFEST_NAME` (so ``--overwrite`` later removes exactly
    them, and a write cut short leaves only a temporary folder that :func:`remove_temp_files` clears).

    Args:
        loaded: a :class:`icbs.models.LoadedModel` (``model``, ``adapter``, ``tokenizer``).
        out_dir: the run's output folder.
        progress: let the adapter show a progress bar.

    Returns:
        The model folder.

    Raises:
        OSError: a file cannot be written (names the model folder).
    """
    model_dir = Path(out_dir) / MODEL_DIR_NAME
    staging = Path(out_dir) / f".{MODEL_DIR_NAME}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
    try:
        staging.mkdir()
        loaded.adapter.save(loaded.model, staging, tokenizer=loaded.tokenizer, progress=progress)
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        model_dir.mkdir(exist_ok=True)
        listed = sorted(set(_manifest(model_dir)) | set(names))
        atomic_write(model_dir / MODEL_MANIFEST_NAME,
                     lambda tmp: Path(tmp).write_text("".join(f"{n}\n" for n in listed), encoding="utf-8"))
        for name in names:
            (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.chmod(staging / name, _file_mode())
            os.replace(staging / name, model_dir / name)
    except OSError as err:
        raise OSError(err.errno, f"cannot write the model into {str(model_dir)!r}: {err.strerror}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def write_config(config: IcbsConfig, path: str | Path) -> None:
    """Write the effective config as YAML (loadable again with :func:`icbs.load_config`)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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


def _file_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open`` gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    Readers (and a run resumed after ``kill -9``) see the old file or the new one, never half of one.
    The temporary file is named ``<name>.<random>.tmp`` (what :func:`remove_temp_files` clears after a
    crash); the file gets mode ``0o666`` less the umask, the mode a plain ``open`` gives.

    Args:
        path: the target file; its folder is created if needed.
        write: ``write(temporary_path)`` writes the content.

    Raises:
        OSError: the file cannot be written; the message names ``path`` (not the temporary file).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        write(str(tmp))
        os.chmod(tmp, _file_mode())  # some writers (safetensors) create files with mode 0o600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {str(path)!r}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
