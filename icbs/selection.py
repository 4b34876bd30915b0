"""Each round's blocks and their derivative estimates (paper Fig. 2, step 3: score, pick block, estimate).

For every layer of a round, the free weights are scored with ``scoring.selection_method``, a tabu-free
block is picked (:func:`icbs.blocks.select_block`), and ``g`` and ``H`` of all the round's blocks come from
one derivative pass (:func:`icbs.derivatives.estimate_blocks`). With gradient selection and a first-order
estimator (``fisher``, ``gradient_mean``) on linear layers, the blocks are picked inside that pass from its
own mean gradient, which saves a second backward and picks exactly the same blocks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from icbs.blocks import select_block
from icbs.config import BlocksConfig, DerivativesConfig, ScoringConfig
from icbs.derivatives import BlockEstimate, estimate_blocks
from icbs.schedule import Stream, step_seed
from icbs.scoring import collect_gradients, score
from icbs.state import PruningState

__all__ = ["RoundBlocks", "BlockChooser", "layer_scores"]

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def layer_scores(method: str, scope: str, state: PruningState, names: Sequence[str], *,
                 act_norms: Mapping[str, Tensor] | None, grads: Mapping[str, Tensor] | None,
                 generator: torch.Generator) -> dict[str, Tensor]:
    """Scores (higher = more important) of every weight of the layers ``names`` (see :func:`icbs.scoring.score`)."""
    return {
        name: score(method, scope, state[name].w0, act_norm=None if act_norms is None else act_norms.get(name),
                    grad=None if grads is None else grads[name], generator=generator)
        for name in names
    }


@dataclasses.dataclass
class RoundBlocks:
    """The blocks of one round: flat indices per layer, estimates of those that hold a block, timings."""

    index: dict[str, Tensor]
    estimates: dict[str, BlockEstimate]
    select_s: float
    estimate_s: float


class BlockChooser:
    """Pick and estimate each round's blocks for one run.

    Args:
        model: the model (current masked weights).
        layers: ``{name: module}`` being pruned.
        state: the pruning state.
        loss_fn: per-sample loss.
        scoring, blocks, derivatives: the config sections.
        seed: ``bcd.seed``.
        act_norms: input activation norms per layer (``wanda`` selection), or ``None``.
        layer_inputs: ``X X^T / N`` per layer (``layerwise`` estimator), or ``None``.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], state: PruningState, loss_fn: LossFn, *,
                 scoring: ScoringConfig, blocks: BlocksConfig, derivatives: DerivativesConfig, seed: int,
                 act_norms: Mapping[str, Tensor] | None, layer_inputs: Mapping[str, Tensor] | None) -> None:
        self.model, self.layers, self.state, self.loss_fn = model, layers, state, loss_fn
        self.scoring, self.blocks, self.derivatives = scoring, blocks, derivatives
        self.seed = seed
        self.act_norms, self.layer_inputs = act_norms, layer_inputs

    def choose(self, names: list[str], batch: dict[str, Tensor], first_step: int) -> RoundBlocks:
        """The blocks of the round over ``names`` (distinct layers) and their estimates on ``batch``."""
        if self._select_in_pass(names):
            return self._in_pass(names, batch, first_step)
        return self._select_then_estimate(names, batch, first_step)

    def _generator(self, step: int, stream: Stream) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.seed, step, stream=stream))

    def _pick(self, name: str, scores: Tensor, step: int) -> Tensor:
        return select_block(self.state, name, scores, self.blocks.block_size, self.blocks.k,
                            self._generator(step, Stream.BLOCK))

    def _select_in_pass(self, names: list[str]) -> bool:
        return (self.scoring.selection_method == "gradient"
                and self.derivatives.estimator in ("fisher", "gradient_mean")
                and all(isinstance(self.layers[name], nn.Linear) for name in names))

    def _in_pass(self, names: list[str], batch: dict[str, Tensor], first_step: int) -> RoundBlocks:
        """One forward+backward; each layer's block is picked from the pass's mean gradient, then estimated."""
        mark = time.perf_counter()
        score_generator = self._generator(first_step, Stream.SELECTION_SCORES)
        index = {name: torch.empty(0, dtype=torch.long) for name in names}

        def chooser(name: str, i: int) -> Callable[[Tensor], Tensor]:
            def choose(mean_grad: Tensor) -> Tensor:
                scores = score("gradient", self.scoring.selection_scope, self.state[name].w0, grad=mean_grad,
                               generator=score_generator)
                index[name] = self._pick(name, scores, first_step + i)
                return index[name] if index[name].numel() >= 2 else index[name][:0]

            return choose

        estimates = estimate_blocks(
            self.derivatives.estimator, self.model,
            {name: (self.layers[name], chooser(name, i)) for i, name in enumerate(names)}, batch, self.loss_fn,
        )
        return RoundBlocks(index, estimates, 0.0, time.perf_counter() - mark)

    def _select_then_estimate(self, names: list[str], batch: dict[str, Tensor], first_step: int) -> RoundBlocks:
        """Score and pick every layer's block, then one estimating pass for all of them."""
        mark = time.perf_counter()
        method = self.scoring.selection_method
        grads = None
        if method == "gradient":
            grads = collect_gradients(self.model, {n: self.layers[n] for n in names}, [batch], self.loss_fn)
        scores = layer_scores(method, self.scoring.selection_scope, self.state, names, act_norms=self.act_norms,
                              grads=grads, generator=self._generator(first_step, Stream.SELECTION_SCORES))
        index = {name: self._pick(name, scores[name], first_step + i) for i, name in enumerate(names)}
        select_s = time.perf_counter() - mark
        active = [name for name in names if index[name].numel() >= 2]
        if not active:
            return RoundBlocks(index, {}, select_s, 0.0)
        mark = time.perf_counter()
        device = next(iter(batch.values())).device
        reference = {name: self.state[name].w0 for name in active} if self.derivatives.estimator == "layerwise" else None
        estimates = estimate_blocks(
            self.derivatives.estimator, self.model, {name: (self.layers[name], index[name].to(device)) for name in active},
            batch, self.loss_fn, layer_inputs=self.layer_inputs, reference_weights=reference,
        )
        return RoundBlocks(index, estimates, select_s, time.perf_counter() - mark)
