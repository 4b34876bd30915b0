"""Crash-safe checkpoints of a pruning run (DESIGN.md §5: state that must survive a crash).

A checkpoint is one ``torch.save`` file holding plain data only (loadable with
``weights_only=True``): the :class:`~icbs.state.PruningState` (masks bit-packed), the driver's
counters, elapsed time and history, the RNG states (torch, numpy, the driver's seed) and the config
dict. :func:`save_checkpoint` writes a temporary file next to the target and ``os.replace``-s it, so
a reader (or a resumed run after ``kill -9``) sees either the old or the new checkpoint, never half
of one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_resumable", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "pack_mask", "unpack_mask", "rng_states", "set_rng_states"]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_MASK_KEYS = ("keep_mask", "fixed_pruned", "fixed_kept")
# Settings that must not change between a checkpoint and its resumption: whole sections, and bcd keys.
_RESUME_SECTIONS = ("pruning", "scoring", "blocks", "derivatives")
_RESUME_BCD_KEYS = ("seed", "blocks_per_round", "min_steps_per_layer")


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first setting of ``current`` that differs from the checkpoint's config."""
    keys = [(section, key) for section in _RESUME_SECTIONS for key in current[section]]
    keys += [("bcd", key) for key in _RESUME_BCD_KEYS]
    for section, key in keys:
        if saved.get(section, {}).get(key) != current[section][key]:
            raise ValueError(f"'{section}.{key}' differs from the checkpoint's; resume needs the same setting")


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
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path.parent)!r} does not exist")
    data = dict(payload)
    data["version"] = CHECKPOINT_VERSION
    data["state"] = _pack_state(payload["state"])
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.debug("checkpoint written to %s", path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (masks unpacked to bool tensors).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an icbs checkpoint of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (resume needs one)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{str(path)!r} is not a readable icbs checkpoint: {err}") from err
    if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} is not an icbs checkpoint of version {CHECKPOINT_VERSION}")
    data["state"] = _unpack_state(data["state"])
    return data
