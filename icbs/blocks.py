"""Tabu-aware block selection (paper Fig. 2, step 3: "pick block").

From a layer's free, non-tabu weights, :func:`select_block` takes the currently pruned weights with
the highest selection scores (the likeliest mistakes) and the kept weights with the lowest. For the
``unstructured`` pattern that is ``k`` pruned + ``block_size - k`` kept over the layer. For
``per_output`` and ``N:M`` the block is made of groups (rows / M-groups) ranked by how likely they
hold a mistake (best pruned score minus worst kept score): whole groups while they fit, and for
rows longer than the space left, that row's best pruned and worst kept weights in the ratio
``k : block_size - k``. The driver turns the block into per-group cardinality constraints
(:meth:`icbs.state.PruningState.block_groups`), so every group keeps its count.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from icbs.state import PruningState

__all__ = ["select_block", "check_block_size"]

logger = logging.getLogger(__name__)


def check_block_size(block_size: int, k: int, free_counts: dict[str, int]) -> None:
    """Validate ``blocks.block_size`` and ``blocks.k`` against every layer's free weights.

    Raises:
        ValueError: a setting is not a valid int, ``k > block_size``, or a layer has fewer free weights
            than ``block_size``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"'blocks.block_size' should be an int >= 2; got {block_size!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"'blocks.k' should be a non-negative int; got {k!r}")
    if k > block_size:
        raise ValueError(f"'blocks.k' should be <= blocks.block_size ({block_size}); got {k}")
    for name, n_free in free_counts.items():
        if block_size > n_free:
            raise ValueError(
                f"'blocks.block_size' ({block_size}) is larger than the {n_free} free weights of layer {name!r}; "
                "lower blocks.block_size (or scoring.fix_frac_prune / fix_frac_keep)"
            )


def _ranked(candidates: Tensor, scores: Tensor, descending: bool, generator: torch.Generator | None) -> Tensor:
    """Candidates sorted by score (ties broken by a random permutation from ``generator``)."""
    if candidates.numel() == 0:
        return candidates
    if generator is not None:
        perm = torch.randperm(candidates.numel(), generator=generator).to(candidates.device)
        candidates = candidates[perm]
    order = torch.sort(scores[candidates], descending=descending, stable=True).indices
    return candidates[order]


def _split(room: int, k: int, block_size: int, n_pruned: int, n_kept: int) -> tuple[int, int]:
    """How many pruned and kept weights of one row fill ``room`` (>= 2): ratio ``k / block_size``, at least one of each."""
    want_p = max(1, min(n_pruned, room - 1, round(room * k / block_size)))
    want_k = min(n_kept, room - want_p)
    want_p = min(n_pruned, room - want_k)
    return want_p, want_k


def select_block(
    state: PruningState,
    layer: str,
    scores: Tensor,
    block_size: int,
    k: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next block of a layer.

    Args:
        state: the pruning state.
        layer: layer name.
        scores: ``(n_out, n_in)`` selection scores (higher = more important).
        block_size: block size ``n`` (an upper bound when fewer candidates are free).
        k: how many currently pruned weights the block holds (unstructured; a ratio otherwise).
        generator: CPU torch generator used to break score ties at random.

    Returns:
        ``(n,)`` long tensor of distinct flat indices, sorted, on the CPU; never a fixed or tabu weight.
    """
    ls = state[layer]
    device = ls.keep_mask.device
    available = (ls.free_mask() & ~ls.tabu_mask()).reshape(-1)
    keep = ls.keep_mask.reshape(-1)
    flat_scores = scores.to(device).reshape(-1).float()
    pattern = state.pattern_of(layer)
    if pattern.kind == "unstructured":
        return _select_unstructured(available, keep, flat_scores, block_size, k, generator)
    length = pattern.group_length(ls.shape)
    avail, keep_g, s = available.view(-1, length), keep.view(-1, length), flat_scores.view(-1, length)
    groups = _ranked_groups(avail, keep_g, s, generator)
    if pattern.kind == "nm":
        return _select_nm(avail, groups, length, block_size)
    return _select_rows(avail, keep_g, s, groups, length, block_size, k, generator)


def _swap_pair(pruned: Tensor, kept: Tensor, scores: Tensor, n_p: int, n_k: int,
               generator: torch.Generator | None) -> Tensor:
    """The ``n_p`` best-scored pruned and the ``n_k`` worst-scored kept indices: the likeliest swaps."""
    return torch.cat([_ranked(pruned, scores, True, generator)[:n_p], _ranked(kept, scores, False, generator)[:n_k]])


def _select_unstructured(available: Tensor, keep: Tensor, flat_scores: Tensor, block_size: int, k: int,
                         generator: torch.Generator | None) -> Tensor:
    """The ``k`` best-scored pruned and the worst-scored kept weights of the layer, ``block_size`` in all."""
    pruned = torch.nonzero(available & ~keep).squeeze(1)
    kept = torch.nonzero(available & keep).squeeze(1)
    n_take = min(block_size, int(pruned.numel()) + int(kept.numel()))
    n_p = min(k, int(pruned.numel()))
    n_k = min(n_take - n_p, int(kept.numel()))
    n_p = n_take - n_k
    return torch.sort(_swap_pair(pruned, kept, flat_scores, n_p, n_k, generator)).values.cpu()


def _ranked_groups(avail: Tensor, keep_g: Tensor, s: Tensor, generator: torch.Generator | None) -> Tensor:
    """Groups (rows or N:M groups) that hold a free pruned and a free kept weight, most promising swap first."""
    best_pruned = torch.where(avail & ~keep_g, s, torch.full_like(s, -torch.inf)).amax(dim=1)
    worst_kept = torch.where(avail & keep_g, s, torch.full_like(s, torch.inf)).amin(dim=1)
    eligible = torch.isfinite(best_pruned) & torch.isfinite(worst_kept)
    groups = torch.nonzero(eligible).squeeze(1)
    return _ranked(groups, best_pruned - worst_kept, True, generator)


def _select_nm(avail: Tensor, groups: Tensor, length: int, block_size: int) -> Tensor:
    """Whole N:M groups (all their free weights), in rank order, while they fit in ``block_size``."""
    counts = avail.sum(dim=1)
    taken = groups[torch.cumsum(counts[groups], 0) <= block_size]
    members = torch.nonzero(avail[taken]).cpu()
    flat = taken.cpu()[members[:, 0]] * length + members[:, 1]
    return torch.sort(flat).values


def _select_rows(avail: Tensor, keep_g: Tensor, s: Tensor, groups: Tensor, length: int, block_size: int, k: int,
                 generator: torch.Generator | None) -> Tensor:
    """Per-output rows in rank order: a whole row when it fits, else its best pruned and worst kept weights."""
    counts = avail.sum(dim=1)
    pieces: list[Tensor] = []
    room = block_size
    for group in groups.tolist():
        if room < 2:
            break
        row_avail = avail[group]
        if int(counts[group]) <= room:
            picked = torch.nonzero(row_avail).squeeze(1)
        else:
            row_pruned = torch.nonzero(row_avail & ~keep_g[group]).squeeze(1)
            row_kept = torch.nonzero(row_avail & keep_g[group]).squeeze(1)
            n_p, n_k = _split(room, k, block_size, int(row_pruned.numel()), int(row_kept.numel()))
            picked = _swap_pair(row_pruned, row_kept, s[group], n_p, n_k, generator)
        pieces.append(picked.cpu() + group * length)
        room -= int(picked.numel())
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(pieces)).values
