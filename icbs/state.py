"""The pruning state of a run: what is kept, what is fixed, what is tabu, and the original weights.

:class:`PruningState` owns, per prunable layer, the keep-mask (True = kept), the fixed-pruned and
fixed-kept sets that leave the candidate pool for good (paper Fig. 2, "fix extremes"), a FIFO tabu
list of recently tried flat indices, and the original dense weights ``w0`` so that every move can be
undone and the model restored. :class:`MaskPattern` says which counts a layer must hold: the whole
layer (``unstructured``), every output row (``per_output``) or every ``M`` consecutive inputs of a row
(``N:M``). Every layer has its own pattern (:meth:`PruningState.pattern_of`): the run's, or the same kind at
the layer's density from a non-uniform allocation (:mod:`icbs.allocation`). The state checks these counts
after every change (:meth:`PruningState.check_invariants`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from icbs.config import parse_pattern
from icbs.exceptions import PruningError

__all__ = ["MaskPattern", "LayerState", "PruningState", "round_half_up", "mask_densities", "layer_patterns"]

logger = logging.getLogger(__name__)


def round_half_up(value: float) -> int:
    """Round to the nearest int, halves up (``round_half_up(2.5) == 3``), unlike Python's ``round``."""
    return int(math.floor(value + 0.5))


def mask_densities(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Fraction kept per layer of keep-masks, plus ``"total"`` over all their weights."""
    densities = {name: float(mask.float().mean()) for name, mask in masks.items()}
    n_total = sum(mask.numel() for mask in masks.values())
    n_kept = sum(int(mask.sum()) for mask in masks.values())
    densities["total"] = n_kept / n_total if n_total else 1.0
    return densities


@dataclasses.dataclass(frozen=True)
class MaskPattern:
    """Which weight counts a layer must keep.

    Attributes:
        kind: ``"unstructured"`` (one group: the layer), ``"per_output"`` (one group per output row)
            or ``"nm"`` (one group per ``m`` consecutive inputs of a row).
        density: fraction of weights kept, in (0, 1).
        n: kept weights per group of ``m`` (``nm`` only).
        m: group length (``nm`` only).
    """

    kind: str
    density: float
    n: int = 0
    m: int = 0

    @classmethod
    def from_config(cls, density: float, pattern: str) -> MaskPattern:
        """Build from ``pruning.density`` and ``pruning.pattern`` (``"unstructured"``, ``"per_output"``, ``"2:4"``)."""
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
            raise ValueError(f"'pruning.density' should be in (0, 1) (the fraction of weights kept); got {density!r}")
        kind, n, m = parse_pattern(pattern)
        if kind == "nm":
            density = n / m
        return cls(kind=kind, density=float(density), n=n, m=m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    def group_length(self, shape: tuple[int, int]) -> int:
        """Number of weights per group for a layer of ``shape`` (the whole layer when unstructured)."""
        n_out, n_in = shape
        if self.kind == "per_output":
            return n_in
        if self.kind == "nm":
            return self.m
        return n_out * n_in

    def group_target(self, shape: tuple[int, int]) -> int:
        """Weights kept in every group of a layer of ``shape``."""
        if self.kind == "nm":
            return self.n
        return round_half_up(self.density * self.group_length(shape))

    def layer_target(self, shape: tuple[int, int]) -> int:
        """Weights a layer of ``shape`` keeps in all: its groups times :meth:`group_target`."""
        return shape[0] * shape[1] // self.group_length(shape) * self.group_target(shape)

    def at_density(self, density: float) -> MaskPattern:
        """The same pattern at another density (``density`` of a layer from a non-uniform allocation).

        Raises:
            ValueError: ``density`` is not in (0, 1), or the pattern is N:M (its density is N/M).
        """
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
            raise ValueError(f"a layer density should be in (0, 1) (the fraction of weights kept); got {density!r}")
        if self.kind == "nm" and density != self.density:
            raise ValueError(f"'pruning.allocation' other than 'uniform' does not apply to pattern {str(self)!r} "
                             "(N:M fixes every group's count)")
        return dataclasses.replace(self, density=float(density))

    def group_of(self, shape: tuple[int, int], flat_index: Tensor) -> Tensor:
        """Group id of every flat index (long tensor of the same shape)."""
        return torch.div(flat_index, self.group_length(shape), rounding_mode="floor")

    def check_layer(self, name: str, shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` when a layer of ``shape`` cannot hold this pattern."""
        n_out, n_in = shape
        if self.kind == "nm" and n_in % self.m:
            raise ValueError(
                f"'pruning.pattern' {str(self)!r} needs the input size of layer {name!r} to be a multiple of "
                f"{self.m}; got n_in={n_in}"
            )
        target = self.group_target(shape)
        if target < 1 or target >= self.group_length(shape):
            raise ValueError(
                f"'pruning.density' {self.density:g} keeps {target} of {self.group_length(shape)} weights per "
                f"group in layer {name!r} (pattern {str(self)!r}); nothing would be pruned or nothing kept"
            )

    def kept_per_group(self, keep_mask: Tensor) -> Tensor:
        """Kept count of every group of a ``(n_out, n_in)`` keep-mask (1-d long tensor)."""
        shape = (int(keep_mask.shape[0]), int(keep_mask.shape[1]))
        return keep_mask.reshape(-1, self.group_length(shape)).sum(dim=1)


def layer_patterns(pattern: MaskPattern | Mapping[str, MaskPattern], names: Iterable[str],
                   densities: Mapping[str, float] | None = None) -> dict[str, MaskPattern]:
    """One pattern per layer of ``names``: ``pattern`` itself (or its entry when it is already one per layer),
    or ``pattern`` at each layer's ``densities[name]``.

    Raises:
        ValueError: a layer has no pattern or no density, or a density does not fit the pattern
            (:meth:`MaskPattern.at_density`).
    """
    names = list(names)
    if not isinstance(pattern, MaskPattern):
        missing = [name for name in names if name not in pattern]
        if missing:
            raise ValueError(f"no mask pattern given for layer {missing[0]!r}")
        return {name: pattern[name] for name in names}
    if densities is None:
        return dict.fromkeys(names, pattern)
    missing = [name for name in names if name not in densities]
    if missing:
        raise ValueError(f"no layer density given for layer {missing[0]!r}")
    return {name: pattern.at_density(densities[name]) for name in names}


@dataclasses.dataclass
class LayerState:
    """The state of one layer. Masks live on the weight's device, shaped like the weight.

    Attributes:
        name: module name.
        module: the ``nn.Linear`` (not saved in checkpoints).
        w0: ``(n_out, n_in)`` original dense weight (a copy, same dtype/device as the weight).
        keep_mask: ``(n_out, n_in)`` bool, True = kept.
        fixed_pruned: ``(n_out, n_in)`` bool, pruned for good.
        fixed_kept: ``(n_out, n_in)`` bool, kept for good.
        tabu: FIFO of recently tried flat indices; ``maxlen`` is the capacity.
        values: ``(n_out, n_in)`` each weight's value if kept (an init's or a refit's), or ``None`` to use ``w0``.
        steps: steps taken in this layer.
        accepted: accepted moves in this layer.
    """

    name: str
    module: nn.Module
    w0: Tensor
    keep_mask: Tensor
    fixed_pruned: Tensor
    fixed_kept: Tensor
    tabu: deque[int]
    values: Tensor | None = None
    steps: int = 0
    accepted: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_out, n_in)``."""
        return (int(self.w0.shape[0]), int(self.w0.shape[1]))

    @property
    def size(self) -> int:
        """Number of weights."""
        return int(self.w0.numel())

    def free_mask(self) -> Tensor:
        """``(n_out, n_in)`` bool: weights still in the candidate pool."""
        return ~(self.fixed_pruned | self.fixed_kept)

    def tabu_mask(self) -> Tensor:
        """``(n_out, n_in)`` bool: weights in the tabu list."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=self.keep_mask.device)
        if self.tabu:
            mask[torch.tensor(list(self.tabu), dtype=torch.long, device=mask.device)] = True
        return mask.view(self.shape)

    def value_if_kept(self) -> Tensor:
        """Each weight's value when kept: ``values`` where an init or a refit set them, else ``w0``."""
        return self.w0 if self.values is None else self.values

    def current_weight(self) -> Tensor:
        """The pruned weight this state stands for: the value if kept where kept, 0 elsewhere."""
        base = self.value_if_kept()
        return base * self.keep_mask.to(base.dtype)


def _fixed_count(frac: float, n: int) -> int:
    return int(math.floor(frac * n))


class PruningState:
    """Masks, fixed sets, tabu lists and original weights of every pruned layer.

    The state binds the layer modules at construction and copies their dense weights; it does not
    change the model until :meth:`apply` or :meth:`apply_move` is called, and :meth:`restore` puts
    the dense weights back.

    Args:
        layers: ``{name: nn.Linear}`` to prune.
        pattern: the run's mask pattern (counts every layer must hold unless :meth:`set_densities` gives the
            layers densities of their own).
        tabu_frac: tabu capacity as a fraction of a layer's free weights.

    Example:
        >>> state = PruningState(layers, MaskPattern.from_config(0.5, "unstructured"), tabu_frac=0.2)
        >>> state.set_masks(init_masks(...)); state.apply()
    """

    def __init__(self, layers: Mapping[str, nn.Module], pattern: MaskPattern, tabu_frac: float = 0.0) -> None:
        if not 0 <= tabu_frac < 1:
            raise ValueError(f"'blocks.tabu_frac' should be in [0, 1); got {tabu_frac!r}")
        self.pattern = pattern
        self.tabu_frac = float(tabu_frac)
        self.layers: dict[str, LayerState] = {}
        self._patterns: dict[str, MaskPattern] = dict.fromkeys(layers, pattern)
        for name, module in layers.items():
            weight = module.weight
            if weight.dim() != 2:
                raise ValueError(f"layer {name!r} should have a 2-d weight; got shape {tuple(weight.shape)}")
            pattern.check_layer(name, (int(weight.shape[0]), int(weight.shape[1])))
            ones = torch.ones_like(weight, dtype=torch.bool)
            self.layers[name] = LayerState(
                name=name,
                module=module,
                w0=weight.detach().clone(),
                keep_mask=ones,
                fixed_pruned=torch.zeros_like(ones),
                fixed_kept=torch.zeros_like(ones),
                tabu=deque(maxlen=0),
            )

    # ------------------------------------------------------------------ setup
    def __getitem__(self, name: str) -> LayerState:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        """Iterate over layer names."""
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def pattern_of(self, name: str) -> MaskPattern:
        """The pattern layer ``name`` holds: the run's, at the layer's own density after :meth:`set_densities`."""
        return self._patterns[name]

    def layer_densities(self) -> dict[str, float]:
        """Every layer's pattern density (the run's density for all of them unless :meth:`set_densities` was called)."""
        return {name: pattern.density for name, pattern in self._patterns.items()}

    def set_densities(self, densities: Mapping[str, float]) -> None:
        """Give every layer its own density (the run's pattern kind); call it before the masks are set.

        Raises:
            ValueError: a layer is missing, or a density does not fit the pattern or the layer's shape.
        """
        patterns = layer_patterns(self.pattern, self.layers, densities)
        for name, pattern in patterns.items():
            pattern.check_layer(name, self.layers[name].shape)
        self._patterns = patterns

    def target_kept(self, name: str) -> int:
        """Kept weights layer ``name`` must hold."""
        return self.pattern_of(name).layer_target(self.layers[name].shape)

    def set_masks(self, keep_masks: Mapping[str, Tensor]) -> None:
        """Set every layer's keep-mask (clears fixed sets and tabu lists); counts must be exact.

        Raises:
            ValueError: a layer is missing or a mask has the wrong shape.
            PruningError: a mask does not hold the pattern's counts.
        """
        for name, layer in self.layers.items():
            if name not in keep_masks:
                raise ValueError(f"no mask given for layer {name!r}")
            mask = keep_masks[name]
            if tuple(mask.shape) != layer.shape:
                raise ValueError(f"mask of layer {name!r} should have shape {layer.shape}; got {tuple(mask.shape)}")
            layer.keep_mask = mask.to(device=layer.w0.device, dtype=torch.bool).clone()
            layer.fixed_pruned = torch.zeros_like(layer.keep_mask)
            layer.fixed_kept = torch.zeros_like(layer.keep_mask)
            layer.values = None
        self._reset_tabu()
        self.check_invariants()

    def fix_extremes(self, scores: Mapping[str, Tensor], fix_frac_prune: float, fix_frac_keep: float) -> None:
        """Fix the lowest-scored ``fix_frac_prune`` of each pruned set and the highest ``fix_frac_keep`` of each kept set.

        Paper Fig. 2, step 2: these weights leave the candidate pool for good. Counts are
        ``floor(frac * n_pruned)`` and ``floor(frac * n_kept)`` per layer (see :meth:`free_counts`).

        Args:
            scores: ``{name: (n_out, n_in) float}`` init scores (higher = more important).
            fix_frac_prune: in [0, 1).
            fix_frac_keep: in [0, 1).
        """
        for name, layer in self.layers.items():
            score = scores[name].to(layer.keep_mask.device).reshape(-1).float()
            keep = layer.keep_mask.reshape(-1)
            fixed_pruned = torch.zeros_like(keep)
            fixed_kept = torch.zeros_like(keep)
            pruned_idx = torch.nonzero(~keep).squeeze(1)
            kept_idx = torch.nonzero(keep).squeeze(1)
            n_fix_p = _fixed_count(fix_frac_prune, int(pruned_idx.numel()))
            n_fix_k = _fixed_count(fix_frac_keep, int(kept_idx.numel()))
            if n_fix_p:
                order = torch.sort(score[pruned_idx], stable=True).indices[:n_fix_p]
                fixed_pruned[pruned_idx[order]] = True
            if n_fix_k:
                order = torch.sort(score[kept_idx], descending=True, stable=True).indices[:n_fix_k]
                fixed_kept[kept_idx[order]] = True
            layer.fixed_pruned = fixed_pruned.view(layer.shape)
            layer.fixed_kept = fixed_kept.view(layer.shape)
        self._reset_tabu()

    def free_counts(self, fix_frac_prune: float, fix_frac_keep: float) -> dict[str, int]:
        """Free weights each layer will have after :meth:`fix_extremes` with these fractions (known before init)."""
        counts = {}
        for name, layer in self.layers.items():
            kept = self.target_kept(name)
            pruned = layer.size - kept
            counts[name] = layer.size - _fixed_count(fix_frac_prune, pruned) - _fixed_count(fix_frac_keep, kept)
        return counts

    def _reset_tabu(self) -> None:
        for layer in self.layers.values():
            n_free = int(layer.free_mask().sum())
            layer.tabu = deque(maxlen=round_half_up(self.tabu_frac * n_free))

    # ------------------------------------------------------------------ model writes
    @torch.no_grad()
    def apply(self) -> None:
        """Write the pruned weights (``values`` or ``w0`` where kept, 0 elsewhere) into every layer."""
        for layer in self.layers.values():
            layer.module.weight.data.copy_(layer.current_weight())

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original dense weights back into every layer."""
        for layer in self.layers.values():
            layer.module.weight.data.copy_(layer.w0)

    @torch.no_grad()
    def apply_move(self, name: str, flat_index: Tensor, keep_block: Tensor) -> Tensor:
        """Set the keep-mask of a block and write the block's weights into the model.

        Args:
            name: layer name.
            flat_index: ``(n,)`` long flat indices.
            keep_block: ``(n,)`` bool, the new keep values.

        Returns:
            ``(n,)`` bool, the previous keep values (pass them to :meth:`apply_move` to undo).

        Raises:
            PruningError: the move would change a fixed weight.
        """
        layer = self.layers[name]
        device = layer.keep_mask.device
        flat_index = flat_index.to(device)
        keep_block = keep_block.to(device=device, dtype=torch.bool)
        keep = layer.keep_mask.view(-1)
        old = keep[flat_index].clone()
        changed = old != keep_block
        if bool((changed & layer.free_mask().view(-1)[flat_index].logical_not()).any()):
            raise PruningError(f"a move in layer {name!r} tried to change a fixed weight")
        keep[flat_index] = keep_block
        base = layer.value_if_kept().view(-1)
        weight = layer.module.weight.data.view(-1)
        weight[flat_index] = base[flat_index] * keep_block.to(base.dtype)
        return old

    def push_tabu(self, name: str, flat_index: Tensor) -> None:
        """Append a block's flat indices to the layer's FIFO tabu list (oldest drop out)."""
        self.layers[name].tabu.extend(int(i) for i in flat_index.tolist())

    def set_values(self, name: str, values: Tensor) -> None:
        """Store ``(n_out, n_in)`` values-if-kept of layer ``name`` (the mask still zeroes the pruned ones)."""
        layer = self.layers[name]
        layer.values = values.detach().to(device=layer.w0.device, dtype=layer.w0.dtype).clone()

    # ------------------------------------------------------------------ queries
    def block_groups(self, name: str, flat_index: Tensor) -> list[tuple[np.ndarray, int]]:
        """Cardinality constraints of a block: positions per pattern group and their current pruned count.

        Keeping every group's pruned count inside the block keeps the layer's counts exact.

        Args:
            name: layer name.
            flat_index: ``(n,)`` long flat indices of the block.

        Returns:
            ``[(positions, k), ...]`` with ``positions`` int64 arrays into the block (disjoint,
            covering it) and ``k`` the number of those weights pruned now.
        """
        layer = self.layers[name]
        flat_cpu = flat_index.detach().cpu().long()
        pruned = (~layer.keep_mask.view(-1)[flat_index.to(layer.keep_mask.device)]).cpu().numpy()
        group = self.pattern_of(name).group_of(layer.shape, flat_cpu).numpy()
        constraints = []
        for g in np.unique(group):
            positions = np.flatnonzero(group == g).astype(np.int64)
            constraints.append((positions, int(pruned[positions].sum())))
        return constraints

    def masks(self) -> dict[str, Tensor]:
        """A copy of every keep-mask (on the CPU)."""
        return {name: layer.keep_mask.detach().cpu().clone() for name, layer in self.layers.items()}

    def check_invariants(self, name: str | None = None) -> None:
        """Check the pattern's counts and that fixed sets agree with the mask; cheap (one pass per layer).

        Raises:
            PruningError: a count is off or a fixed weight has the wrong state.
        """
        names = self.layers if name is None else [name]
        for layer_name in names:
            layer = self.layers[layer_name]
            pattern = self.pattern_of(layer_name)
            counts = pattern.kept_per_group(layer.keep_mask)
            target = pattern.group_target(layer.shape)
            if bool((counts != target).any()):
                raise PruningError(
                    f"layer {layer_name!r} breaks the {pattern} density invariant: groups should keep "
                    f"{target} weights; got counts in [{int(counts.min())}, {int(counts.max())}]"
                )
            if bool((layer.fixed_pruned & layer.keep_mask).any()) or bool((layer.fixed_kept & ~layer.keep_mask).any()):
                raise PruningError(f"layer {layer_name!r}: a fixed weight changed state")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything but the modules and ``w0``: masks (CPU bool), tabu lists, counters, values."""
        layers = {}
        for name, layer in self.layers.items():
            layers[name] = {
                "shape": list(layer.shape),
                "keep_mask": layer.keep_mask.cpu().clone(),
                "fixed_pruned": layer.fixed_pruned.cpu().clone(),
                "fixed_kept": layer.fixed_kept.cpu().clone(),
                "tabu": list(layer.tabu),
                "tabu_capacity": int(layer.tabu.maxlen or 0),
                "values": None if layer.values is None else layer.values.cpu().clone(),
                "steps": layer.steps,
                "accepted": layer.accepted,
                "target_kept": self.target_kept(name),
                "w0_abs_sum": float(layer.w0.double().abs().sum()),
            }
        return {
            "pattern": str(self.pattern),
            "density": self.pattern.density,
            "tabu_frac": self.tabu_frac,
            "layers": layers,
        }

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the layers, their shapes, the pattern and every layer's kept count
        (this run's allocation, recomputed from the dense model) must match.

        Raises:
            ValueError: the saved state does not belong to these layers, this pattern or this allocation, or
                the model's weights are not the original dense ones the state was made from.
        """
        if data.get("pattern") != str(self.pattern) or abs(float(data.get("density", -1)) - self.pattern.density) > 1e-12:
            raise ValueError(
                f"checkpoint was made with pattern {data.get('pattern')!r} at density {data.get('density')!r}; "
                f"this run uses {str(self.pattern)!r} at {self.pattern.density:g} (see pruning.pattern, pruning.density)"
            )
        saved = data["layers"]
        if list(saved) != list(self.layers):
            raise ValueError(f"checkpoint layers {list(saved)[:5]}... do not match this run's layers {list(self.layers)[:5]}...")
        for name, layer in self.layers.items():
            item = saved[name]
            if tuple(item["shape"]) != layer.shape:
                raise ValueError(f"checkpoint layer {name!r} has shape {tuple(item['shape'])}; the model has {layer.shape}")
            w0_sum = float(layer.w0.double().abs().sum())
            if not math.isclose(w0_sum, float(item["w0_abs_sum"]), rel_tol=1e-5, abs_tol=1e-8):
                raise ValueError(
                    f"layer {name!r} of the model does not hold the dense weights the checkpoint was made from; "
                    "resume needs the original (unpruned) model"
                )
            saved_kept = int(item.get("target_kept", self.pattern.layer_target(layer.shape)))
            if saved_kept != self.target_kept(name):
                raise ValueError(
                    f"checkpoint layer {name!r} keeps {saved_kept} weights; this run's allocation keeps "
                    f"{self.target_kept(name)} (pruning.allocation): resume needs the dense model and the "
                    "calibration samples the checkpoint's run started from"
                )
        for name, layer in self.layers.items():
            item = saved[name]
            device = layer.w0.device
            layer.keep_mask = item["keep_mask"].to(device=device, dtype=torch.bool).clone()
            layer.fixed_pruned = item["fixed_pruned"].to(device=device, dtype=torch.bool).clone()
            layer.fixed_kept = item["fixed_kept"].to(device=device, dtype=torch.bool).clone()
            layer.tabu = deque((int(i) for i in item["tabu"]), maxlen=int(item["tabu_capacity"]))
            values = item.get("values")
            layer.values = None if values is None else values.to(device=device, dtype=layer.w0.dtype).clone()
            layer.steps = int(item["steps"])
            layer.accepted = int(item["accepted"])
        self.check_invariants()
