"""Crash-safe checkpoints of a pruning run (DESIGN.md §5: state that must survive a crash).

A checkpoint is one ``torch.save`` file holding plain data only (loadable with
``weights_only=True``): the :class:`~icbs.state.PruningState` (masks bit-packed), the driver's
counters, elapsed time and history, the RNG states (torch, numpy, the driver's seed) and the config
dict. :func:`save_checkpoint` writes through :func:`icbs.export.atomic_write` (a temporary file next to
the target, then ``os.replace``), so a reader (or a resumed run after ``kill -9``) sees either the old
or the new checkpoint, never half of one. :func:`load_checkpoint` refuses anything else in one line, and
:func:`check_resumable` names the first setting that differs between a checkpoint and a new config.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from icbs.export import atomic_write

__all__ = [
    "CHECKPOINT_VERSION",
    "RESUME_SECTIONS",
    "RESUME_BCD_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "check_resumable",
    "pack_mask",
    "unpack_mask",
    "rng_states",
    "set_rng_states",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_MASK_KEYS = ("keep_mask", "fixed_pruned", "fixed_kept")
_ENTRIES = ("state", "driver", "rng", "config")
#: Config sections, and ``bcd`` keys, that must not change between a checkpoint and its resumption.
RESUME_SECTIONS = ("pruning", "scoring", "blocks", "derivatives")
RESUME_BCD_KEYS = ("seed", "blocks_per_round", "min_steps_per_layer")


def pack_mask(mask: Tensor) -> dict[str, Any]:
    """Bit-pack a bool tensor (8x smaller): ``{"shape": [...], "bits": uint8 tensor}``."""
    flat = mask.detach().cpu().reshape(-1).numpy().astype(bool)
    return {"shape": list(mask.shape), "bits": torch.from_numpy(np.packbits(flat))}


def unpack_mask(packed: Mapping[str, Any]) -> Tensor:
    """Inverse of :func:`pack_mask`; returns a CPU bool tensor."""
    shape = [int(s) for s in packed["shape"]]
    count = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed["bits"].numpy(), count=count).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def rng_states() -> dict[str, Any]:
    """The global torch and numpy RNG states as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    saved = states["numpy"]
    np.random.set_state(
        (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    )


def _map_masks(state: Mapping[str, Any], convert: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of a state dict with ``convert`` applied to every layer's mask entries."""
    mapped = dict(state)
    mapped["layers"] = {
        name: {**layer, **{key: convert(layer[key]) for key in _MASK_KEYS}} for name, layer in state["layers"].items()
    }
    return mapped


def _pack_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return _map_masks(state, pack_mask)


def _unpack_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return _map_masks(state, unpack_mask)


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically.

    Args:
        path: target file; its folder must exist.
        payload: ``{"state": PruningState.state_dict(), "driver": {...}, "rng": {...}, "config": {...}}``;
            masks in ``state`` are bit-packed here.

    Raises:
        FileNotFoundError: the folder does not exist.
        OSError: the file cannot be written (names ``path``).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path.parent)!r} does not exist")
    data = dict(payload)
    data["version"] = CHECKPOINT_VERSION
    data["state"] = _pack_state(payload["state"])

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            torch.save(data, handle)

    atomic_write(path, write)
    logger.debug("checkpoint written to %s", path)


def _unreadable(err: BaseException) -> str:
    """Why ``torch.load`` failed, in a few words (torch's own message repeats advice that does not apply)."""
    if isinstance(err, pickle.UnpicklingError) and "unsupported global" in str(err).lower():
        return "it holds objects other than plain data, which icbs never loads"
    if isinstance(err, (EOFError, zipfile.BadZipFile, pickle.UnpicklingError)) or "zip" in str(err).lower():
        return "not a torch file, or cut short"
    return type(err).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (masks unpacked to bool tensors).

    Only plain data is unpickled (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an icbs checkpoint of a known version (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (resume needs one)")
    where = f"checkpoint {str(path)!r}"
    if path.stat().st_size == 0:
        raise ValueError(f"{where} is an empty file, not an icbs checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{where} is not a readable icbs checkpoint ({_unreadable(err)})") from err
    if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{where} is not an icbs checkpoint of version {CHECKPOINT_VERSION}")
    missing = [key for key in _ENTRIES if not isinstance(data.get(key), dict)]
    if missing or not isinstance(data["state"].get("layers"), dict):
        raise ValueError(f"{where} is not an icbs checkpoint (no {(missing or ['state.layers'])[0]!r} entry)")
    try:
        data["state"] = _unpack_state(data["state"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where} holds damaged masks ({type(err).__name__}: {err})") from err
    return data


def check_resumable(saved_config: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Refuse to resume under settings that change the run's result (:data:`RESUME_SECTIONS`,
    :data:`RESUME_BCD_KEYS`); budgets, evaluation, export and the solver may change.

    Args:
        saved_config: the checkpoint's ``config`` entry (``IcbsConfig.to_dict()`` of the run).
        config: ``IcbsConfig.to_dict()`` of the resuming run.

    Raises:
        ValueError: names the first key that differs.
    """
    keys = [(section, key) for section in RESUME_SECTIONS for key in config[section]]
    keys += [("bcd", key) for key in RESUME_BCD_KEYS]
    for section, key in keys:
        saved = (saved_config.get(section) or {}).get(key, _MISSING)
        if saved != config[section][key]:
            shown = "absent" if saved is _MISSING else repr(saved)
            raise ValueError(f"'{section}.{key}' differs from the checkpoint's ({shown}; now "
                             f"{config[section][key]!r}); resume needs the same setting")


_MISSING = object()
