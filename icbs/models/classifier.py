"""Adapter for any ``nn.Module`` classifier fed ``{"x", "y"}`` batches.

The model maps ``x`` ``(B, ...)`` to logits ``(B, C)`` (a plain tensor or an object with ``.logits``); the
per-sample loss is cross-entropy unless the user gives another ``loss(logits, y) -> (B,)``. Saving writes
the ``state_dict`` as ``model.safetensors`` plus ``icbs_model.json`` naming the architecture, which
:func:`icbs.models.load_model` uses to rebuild built-in architectures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icbs.evaluation import distillation_loss, evaluate_classifier, outcome_targets
from icbs.models.base import find_prunable_layers, model_device, model_dtype
from icbs.targets import DENSE_IDS, DENSE_LOGP, DENSE_SAMPLE, has_dense_targets

__all__ = ["ClassifierAdapter", "CLASSIFIER_META_FILE", "CLASSIFIER_WEIGHTS_FILE"]

logger = logging.getLogger(__name__)

CLASSIFIER_META_FILE = "icbs_model.json"
CLASSIFIER_WEIGHTS_FILE = "model.safetensors"

LossFn = Callable[[Tensor, Tensor], Tensor]


class ClassifierAdapter:
    """Generic classifier: logits from ``model(x)``, per-sample cross-entropy (or ``loss``).

    Args:
        loss: ``(logits (B, C), y (B,)) -> (B,)`` per-sample loss; ``None`` = cross-entropy.
        input_shape: if set, ``x`` is reshaped to ``(B, *input_shape)`` before the forward pass (lets one
            data source feed flat vectors or images).
        architecture: the name of a built-in architecture (``"mnist_mlp"``), written by :meth:`save` so the
            model can be rebuilt; ``None`` for user modules (weights are still saved).
        architecture_config: keyword arguments of that architecture, saved alongside.
    """

    kind = "classifier"

    def __init__(
        self,
        loss: LossFn | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        architecture: str | None = None,
        architecture_config: Mapping[str, Any] | None = None,
    ) -> None:
        if loss is not None and not callable(loss):
            raise TypeError(f"'loss' should be a callable (logits, y) -> (B,) tensor; got {type(loss).__name__}")
        self.loss = loss
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self.architecture = architecture
        self.architecture_config = dict(architecture_config or {})

    def prunable_layers(
        self, model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> dict[str, nn.Module]:
        """Every ``nn.Linear`` except the head, filtered by the patterns.

        The head is a layer named like one (``classifier``, ``head``...) or else the last ``nn.Linear``, the
        layer that produces the logits (:func:`icbs.layers.output_heads`); include it by name to prune it.
        """
        return find_prunable_layers(model, include, exclude, last_linear_head=True)

    def _inputs(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        x = batch["x"].to(model_device(model))
        if x.is_floating_point():
            x = x.to(model_dtype(model))
        if self.input_shape is not None:
            x = x.reshape(x.shape[0], *self.input_shape)
        return x

    def _forward(self, model: nn.Module, x: Tensor) -> Any:
        return model(x)

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits ``(B, C)`` for the batch's ``x`` (moved to the model's device and dtype)."""
        out = self._forward(model, self._inputs(model, batch))
        return out.logits if hasattr(out, "logits") else out

    def per_sample_loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-sample loss ``(B,)``: cross-entropy of the logits against ``y`` unless ``loss`` was given.

        A batch with dense-model targets (:meth:`dense_targets`) gets the KL divergence from them instead.

        Raises:
            ValueError: a custom loss does not return one value per sample.
        """
        logits = self.logits(model, batch)
        if has_dense_targets(batch):
            return distillation_loss(logits, batch[DENSE_IDS], batch[DENSE_LOGP], batch[DENSE_SAMPLE])
        y = batch["y"].to(logits.device)
        if self.loss is None:
            return F.cross_entropy(logits.float(), y, reduction="none")
        losses = self.loss(logits, y)
        if losses.shape != (y.shape[0],):
            raise ValueError(
                f"'loss' should return one loss per sample, shape ({y.shape[0]},); got {tuple(losses.shape)}"
            )
        return losses

    def dense_targets(self, model: nn.Module, batch: Mapping[str, Tensor], top_k: int, *, seed: int = 0
                      ) -> dict[str, Tensor]:
        """The model's ``top_k`` most likely classes and their log-probabilities (all when ``top_k >= C``),
        and a class sampled from its distribution with a generator seeded by ``seed``.

        Raises:
            ValueError: the adapter has a custom ``loss``, which dense targets would replace.
        """
        if self.loss is not None:
            raise ValueError("'calibration.targets' 'dense' replaces the loss by the KL divergence to the dense "
                             "model; this adapter was given a custom 'loss': use 'labels'")
        logits = self.logits(model, batch)
        ids, logp, sample = outcome_targets(logits, top_k, torch.Generator(device=logits.device).manual_seed(seed))
        device = batch["x"].device
        return {DENSE_IDS: ids.to(device), DENSE_LOGP: logp.to(device), DENSE_SAMPLE: sample.to(device)}

    def evaluate(
        self, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], *, progress: bool = False
    ) -> dict[str, float]:
        """``{"accuracy", "loss", "n_samples"}`` on the batches (see :func:`icbs.evaluation.evaluate_classifier`)."""
        return evaluate_classifier(model, batches, self.logits, self.loss, progress=progress)

    def save(self, model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, progress: bool = False) -> None:
        """Write ``model.safetensors`` (the state_dict) and ``icbs_model.json`` (architecture, shapes).

        One file of a small model: no progress bar (``progress`` is accepted for the adapter contract).
        """
        from safetensors.torch import save_file

        del tokenizer, progress
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(state, str(out / CLASSIFIER_WEIGHTS_FILE))
        if self.architecture is None:
            logger.warning(
                "saved the weights of a user-defined %s; rebuild the module yourself and load_state_dict them",
                type(model).__name__,
            )
        meta = {
            "format": "icbs-classifier",
            "architecture": self.architecture,
            "architecture_config": self.architecture_config,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "module_class": type(model).__name__,
            "dtype": str(model_dtype(model)).replace("torch.", ""),
        }
        (out / CLASSIFIER_META_FILE).write_text(json.dumps(meta, indent=2))
