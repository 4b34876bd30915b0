"""The model-adapter contract and the loaded-model record.

A :class:`ModelAdapter` hides what differs between model families (how a batch goes into the model, the
per-sample loss, the metrics, how the model is written to disk) behind five members, so that the driver,
the baselines and the CLI never look inside a model. :class:`LoadedModel` bundles a model with its
adapter, its tokenizer (language models) and a display name; :func:`icbs.models.load_model` returns one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from icbs.config import DEVICE_MAP_STRATEGIES
from icbs.layers import HEAD_NAMES, find_prunable, output_heads

__all__ = [
    "ModelAdapter",
    "LoadedModel",
    "find_prunable_layers",
    "model_device",
    "model_dtype",
    "resolve_device",
    "resolve_dtype",
    "resolve_device_map",
    "check_dtype_runs",
    "HEAD_NAMES",
]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@runtime_checkable
class ModelAdapter(Protocol):
    """What icbs needs to know about a model family.

    Attributes:
        kind: ``"classifier"``, ``"causal_lm"`` or ``"image_classifier"``.
    """

    kind: str

    def prunable_layers(
        self, model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> dict[str, nn.Module]:
        """``{module name: nn.Linear}`` of the layers to prune, in model order."""
        ...

    def per_sample_loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """One loss per sample, shape ``(B,)``; the objective is its mean."""
        ...

    def evaluate(
        self, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], *, progress: bool = False
    ) -> dict[str, float]:
        """``{"perplexity", "loss"}`` for language models, ``{"accuracy", "loss"}`` for classifiers."""
        ...

    def save(self, model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, progress: bool = False) -> None:
        """Write the model (and tokenizer) so that :func:`icbs.models.load_model` reads it back."""
        ...


@dataclass
class LoadedModel:
    """A model ready to prune.

    Attributes:
        model: the module, in eval mode, on its device.
        adapter: the family's :class:`ModelAdapter`.
        tokenizer: the tokenizer of a language model, else ``None``.
        name: a short display name (builtin name or path).
    """

    model: nn.Module
    adapter: ModelAdapter
    tokenizer: Any = None
    name: str = ""


def find_prunable_layers(
    model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = (), *, last_linear_head: bool = False
) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` matching ``include`` and not ``exclude``, minus output heads.

    Delegates to ``icbs.layers.find_prunable`` (the project-wide rule, INTERNALS.md "Layers");
    ``last_linear_head`` is the classifiers' rule of :func:`icbs.layers.output_heads`.

    Raises:
        ValueError: a pattern matches no layer.
    """
    heads = output_heads(model, last_linear=last_linear_head)
    return find_prunable(model, include=tuple(include), exclude=tuple(exclude), heads=heads)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; anything else as given, once checked to exist here.

    Raises:
        ValueError: a CUDA device (or index) or MPS is asked for and is not available (names ``model.device``).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"'model.device' is {device!r} but no CUDA device is available; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"'model.device' is {device!r} but only {torch.cuda.device_count()} CUDA devices exist")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"'model.device' is {device!r} but MPS is not available here; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a config dtype name (``"float32"``, ``"bfloat16"``...) to a torch dtype."""
    if dtype not in _DTYPES:
        raise ValueError(f"'model.dtype' should be one of {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _map_device(module: str, value: Any) -> str | int:
    """One ``device_map`` entry checked against this machine's devices (an int is a CUDA index, as in accelerate)."""
    where = f"'model.device_map' entry {module!r}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where} should be a device such as 'cpu', 'cuda:0' or 0; got {value!r}")
    try:
        device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except RuntimeError as err:
        raise ValueError(f"{where} should be a device such as 'cpu', 'cuda:0' or 0; got {value!r}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{where} names {value!r} but this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{where} names 'mps' but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"{where} should be 'cpu', 'cuda:N', an int or 'mps'; got {value!r}")
    return value


def resolve_device_map(device_map: str | Mapping[str, Any]) -> tuple[str | dict[str, str | int], list[torch.device]]:
    """Check ``model.device_map`` before anything loads, and list the devices it may place weights on.

    Args:
        device_map: an accelerate strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or a
            mapping from module name (``""`` = the whole model) to a device (``"cpu"``, ``"cuda:1"``, ``1``).

    Returns:
        ``(the device_map to hand to from_pretrained, the devices it may use)``; a strategy may use every
        visible CUDA device and the CPU.

    Raises:
        ValueError: an unknown strategy, an empty mapping, or a device this machine does not have.
    """
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"'model.device_map' should be one of {', '.join(map(repr, DEVICE_MAP_STRATEGIES))} or a mapping "
                f"module -> device (use 'model.device' for one device); got {device_map!r}"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return device_map, [torch.device(f"cuda:{i}") for i in range(count)] + [torch.device("cpu")]
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"'model.device_map' should be a strategy name or a non-empty mapping module -> device; got {device_map!r}")
    checked = {str(module): _map_device(str(module), value) for module, value in device_map.items()}
    devices = [torch.device(f"cuda:{v}" if isinstance(v, int) else v) for v in checked.values()]
    return checked, devices


def check_dtype_runs(dtype: str, devices: Sequence[torch.device], key: str = "model.dtype") -> None:
    """Refuse a weight dtype one of ``devices`` cannot compute in (before the model loads).

    bfloat16 needs a CUDA device with bf16 support (compute capability 8.0+); MPS has no float64. float16
    and bfloat16 run on the CPU (slowly on CPUs without native support, but correctly).

    Raises:
        ValueError: naming ``key``, the dtype and the device.
    """
    for device in devices:
        if device.type == "cuda" and dtype == "bfloat16" and torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError(f"'{key}' is 'bfloat16' but {device} has no bf16 support; use 'float16' or 'float32'")
        if device.type == "mps" and dtype == "float64":
            raise ValueError(f"'{key}' is 'float64' but MPS has no float64; use 'float32'")
