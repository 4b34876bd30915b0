"""Helpers for batches: ``dict[str, Tensor]`` whose tensors share the leading (sample) dimension.

A language-model batch is ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}``; a classifier
batch is ``{"x": (B, ...), "y": (B,) long}``. These functions never modify the batch they are given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Batch", "batch_size", "index_batch", "batch_to", "concat_batches", "split_batch"]

Batch = dict[str, Tensor]


def _check_batch(batch: Mapping[str, Tensor], name: str = "batch") -> int:
    """Validate a batch and return its number of samples."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"'{name}' should be a dict[str, Tensor]; got {type(batch).__name__}")
    if not batch:
        raise ValueError(f"'{name}' should hold at least one tensor; got an empty dict")
    size: int | None = None
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"'{name}[{key!r}]' should be a Tensor; got {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"'{name}[{key!r}]' should have a leading sample dimension; got a 0-d tensor")
        if size is None:
            size = int(value.shape[0])
        elif int(value.shape[0]) != size:
            raise ValueError(
                f"tensors of '{name}' should share the leading dimension; "
                f"{key!r} has {int(value.shape[0])}, others have {size}"
            )
    assert size is not None
    return size


def batch_size(batch: Mapping[str, Tensor]) -> int:
    """Number of samples in ``batch`` (the shared leading dimension).

    Raises:
        TypeError: ``batch`` is not a mapping of tensors.
        ValueError: the batch is empty or its tensors disagree on the leading dimension.
    """
    return _check_batch(batch)


def index_batch(batch: Mapping[str, Tensor], idx: Tensor | Sequence[int] | slice | int) -> Batch:
    """Select samples of a batch.

    Args:
        batch: the batch, every tensor ``(B, ...)``.
        idx: a slice, an int (kept as a batch of one), a sequence of ints or a 1-d long/bool tensor.

    Returns:
        A new batch with the selected samples (tensors are views for slices, copies otherwise).
    """
    n = _check_batch(batch)
    if isinstance(idx, bool):
        raise TypeError(f"'idx' should be an int, slice, sequence or tensor; got {idx!r}")
    if isinstance(idx, int):
        if not -n <= idx < n:
            raise IndexError(f"'idx' should be in [{-n}, {n}); got {idx}")
        idx = slice(idx, idx + 1 if idx != -1 else None)
    elif not isinstance(idx, slice):
        idx = torch.as_tensor(idx)
        if idx.dtype != torch.bool:
            idx = idx.long()
    return {key: value[idx.to(value.device) if isinstance(idx, Tensor) else idx] for key, value in batch.items()}


def batch_to(batch: Mapping[str, Tensor], device: torch.device | str) -> Batch:
    """Move every tensor of ``batch`` to ``device`` (a new dict; no copy where already there)."""
    _check_batch(batch)
    return {key: value.to(device) for key, value in batch.items()}


def concat_batches(batches: Sequence[Mapping[str, Tensor]]) -> Batch:
    """Concatenate batches along the sample dimension.

    Raises:
        ValueError: no batches, or the batches do not have the same keys.
    """
    if len(batches) == 0:
        raise ValueError("'batches' should hold at least one batch; got none")
    keys = set(batches[0])
    for i, batch in enumerate(batches):
        _check_batch(batch, f"batches[{i}]")
        if set(batch) != keys:
            raise ValueError(f"'batches[{i}]' has keys {sorted(batch)}; expected {sorted(keys)}")
    return {key: torch.cat([batch[key] for batch in batches], dim=0) for key in batches[0]}


def split_batch(batch: Mapping[str, Tensor], size: int) -> list[Batch]:
    """Cut a batch into consecutive chunks of ``size`` samples (the last one may be smaller).

    Raises:
        ValueError: ``size`` is not a positive int.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"'size' should be a positive int; got {size!r}")
    n = _check_batch(batch)
    return [{key: value[start : start + size] for key, value in batch.items()} for start in range(0, n, size)]
