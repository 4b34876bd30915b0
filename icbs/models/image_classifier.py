"""Adapter for Hugging Face image classifiers (ViT, DeiT and relatives).

Batches are ``{"x": pixel_values (B, C, H, W), "y": (B,) long}``; the model is called as
``model(pixel_values=x)`` and its ``.logits`` scored with cross-entropy. Saving and loading go through
``save_pretrained``/``from_pretrained`` like the language models (local folders and hub ids alike).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from icbs.models.causal_lm import save_hf_model
from icbs.models.classifier import ClassifierAdapter

__all__ = ["ImageClassifierAdapter"]


class ImageClassifierAdapter(ClassifierAdapter):
    """Hugging Face image classifier; the head (``classifier``) is not pruned by default.

    Args:
        model: used to read ``config.num_channels``/``config.image_size`` so flat inputs can be reshaped.
        loss: optional ``(logits, y) -> (B,)`` per-sample loss (default cross-entropy).
    """

    kind = "image_classifier"

    def __init__(self, model: nn.Module | None = None, loss: Any = None) -> None:
        shape = None
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "image_size") and hasattr(config, "num_channels"):
            size = config.image_size
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            shape = (config.num_channels, height, width)
        super().__init__(loss, input_shape=shape)

    def prunable_layers(
        self, model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> dict[str, nn.Module]:
        """Every ``nn.Linear`` except the heads, filtered by the patterns.

        Besides the project-wide head names, any layer whose last name part ends in ``classifier``
        (DeiT-distilled's ``cls_classifier`` and ``distillation_classifier``) counts as a head here.
        """
        layers = super().prunable_layers(model, include, exclude)
        named = [re.compile(p) for p in include]
        return {
            name: module
            for name, module in layers.items()
            if not name.rsplit(".", 1)[-1].endswith("classifier") or any(p.search(name) for p in named)
        }

    def _forward(self, model: nn.Module, x: Tensor) -> Any:
        return model(pixel_values=x)

    def save(self, model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, progress: bool = False) -> None:
        """``save_pretrained`` (safetensors); reloadable with ``model.kind=image_classifier, model.path=out_dir``."""
        save_hf_model(model, out_dir, tokenizer, progress=progress)
