"""Model adapters and :func:`load_model`: from a ``model`` config section to a ready :class:`LoadedModel`.

One adapter per family (``classifier``, ``causal_lm``, ``image_classifier``), all satisfying
:class:`~icbs.models.base.ModelAdapter`; built-in models (``mnist_mlp``, ``deit_tiny``, ``smollm2``,
``tiny_llama``) live in :mod:`icbs.models.builtin`. Hugging Face models load from a local folder, a hub id
or a GGUF file through one code path, which also reads the folders that ``adapter.save`` writes.

Example::

    loaded = load_model(ModelConfig(builtin="mnist_mlp"))
    layers = loaded.adapter.prunable_layers(loaded.model)      # {"fc1": ..., "fc2": ...}; fc3 is the head
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from icbs.config import ModelConfig
from icbs.models.base import (
    LoadedModel,
    ModelAdapter,
    check_dtype_runs,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
)
from icbs.models.builtin import (
    ARCHITECTURES,
    BUILTIN_MODELS,
    build_tiny_llama,
    load_deit_tiny,
    load_mnist_mlp,
    smollm2_gguf_path,
)
from icbs.models.causal_lm import CausalLMAdapter, load_hf_model
from icbs.models.classifier import CLASSIFIER_META_FILE, CLASSIFIER_WEIGHTS_FILE, ClassifierAdapter
from icbs.models.image_classifier import ImageClassifierAdapter

__all__ = [
    "load_model",
    "model_kind",
    "LoadedModel",
    "ModelAdapter",
    "ClassifierAdapter",
    "CausalLMAdapter",
    "ImageClassifierAdapter",
    "BUILTIN_MODELS",
]

logger = logging.getLogger(__name__)

_BUILTIN_KINDS = {
    "mnist_mlp": "classifier",
    "deit_tiny": "image_classifier",
    "smollm2": "causal_lm",
    "tiny_llama": "causal_lm",
}


def model_kind(cfg: ModelConfig) -> str:
    """The family a ``model`` section loads as, known before loading: a built-in model's own, else ``model.kind``."""
    return _BUILTIN_KINDS.get(cfg.builtin, cfg.kind) if cfg.builtin is not None else cfg.kind


def _check_builtin(cfg: ModelConfig) -> None:
    name = cfg.builtin
    if name not in _BUILTIN_KINDS:
        raise ValueError(f"'model.builtin' should be one of {', '.join(BUILTIN_MODELS)}; got {name!r}")
    kind = _BUILTIN_KINDS[name]
    if cfg.kind not in ("classifier", kind):
        raise ValueError(f"'model.kind' should be {kind!r} for model.builtin {name!r}; got {cfg.kind!r}")
    if cfg.device_map is not None and name != "smollm2":
        raise ValueError(
            f"'model.device_map' applies to models loaded through transformers (model.path or model.builtin "
            f"'smollm2'); model.builtin {name!r} is built in memory, use 'model.device'"
        )


def _check_placement(cfg: ModelConfig) -> None:
    """Devices and dtype this machine can run, checked before anything loads."""
    if cfg.device_map is not None:
        _, devices = resolve_device_map(cfg.device_map)
    else:
        devices = [resolve_device(cfg.device)]
    check_dtype_runs(cfg.dtype, devices)


def _load_builtin(cfg: ModelConfig, progress: bool) -> LoadedModel:
    name = cfg.builtin
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if name == "mnist_mlp":
        model = load_mnist_mlp(cfg.cache_dir).to(device=device, dtype=dtype)
        adapter: ModelAdapter = ClassifierAdapter(input_shape=(784,), architecture="mnist_mlp")
        return LoadedModel(model.eval(), adapter, None, name)
    if name == "deit_tiny":
        model = load_deit_tiny(cfg.cache_dir).to(device=device, dtype=dtype)
        return LoadedModel(model.eval(), ImageClassifierAdapter(model), None, name)
    if name == "smollm2":
        model, tokenizer = load_hf_model(
            _auto("AutoModelForCausalLM"), None, gguf_file=str(smollm2_gguf_path()), dtype=cfg.dtype,
            device=cfg.device, device_map=cfg.device_map, progress=progress,
        )
        return LoadedModel(model, CausalLMAdapter(), tokenizer, name)
    model, tokenizer = build_tiny_llama()
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), CausalLMAdapter(), tokenizer, name)


def _auto(name: str) -> Any:
    """A transformers ``Auto*`` class by name (imported lazily: transformers is slow to import)."""
    import transformers

    return getattr(transformers, name)


def _load_saved_classifier(cfg: ModelConfig) -> LoadedModel:
    """A classifier folder written by :meth:`ClassifierAdapter.save` (built-in architectures only)."""
    from safetensors.torch import load_file

    folder = Path(str(cfg.path)).expanduser()
    if not folder.exists():
        raise ValueError(f"'model.path' {cfg.path!r} does not exist")
    meta_file = folder / CLASSIFIER_META_FILE
    if not meta_file.is_file():
        raise ValueError(
            f"'model.path' {cfg.path!r} should be a folder saved by icbs (with {CLASSIFIER_META_FILE}) for "
            "model.kind 'classifier'; for your own nn.Module use the Python API (icbs.prune) instead"
        )
    meta = json.loads(meta_file.read_text())
    architecture = meta.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"'model.path' {cfg.path!r} holds weights of a user-defined {meta.get('module_class')}; rebuild it "
            f"yourself and load {CLASSIFIER_WEIGHTS_FILE} into it"
        )
    model = ARCHITECTURES[architecture](**meta.get("architecture_config", {}))
    model.load_state_dict(load_file(str(folder / CLASSIFIER_WEIGHTS_FILE)))
    model = model.to(device=resolve_device(cfg.device), dtype=resolve_dtype(cfg.dtype)).eval()
    adapter = ClassifierAdapter(
        input_shape=meta.get("input_shape"),
        architecture=architecture,
        architecture_config=meta.get("architecture_config"),
    )
    return LoadedModel(model, adapter, None, str(cfg.path))


def load_model(cfg: ModelConfig, *, progress: bool = False) -> LoadedModel:
    """Load (build, train-and-cache, or read) the model a ``model`` config section names.

    Args:
        cfg: ``builtin`` (``mnist_mlp``, ``deit_tiny``, ``smollm2``, ``tiny_llama``) or ``path`` (+ ``kind``,
            ``gguf_file``), and ``dtype``, ``device`` or ``device_map``, ``cache_dir``.
        progress: show progress bars while loading.

    Returns:
        A :class:`LoadedModel`: the model in eval mode on its device(s), its adapter, tokenizer and name.

    Raises:
        ValueError: unknown builtin, missing path/file, a kind that does not fit, a device_map naming
            devices this machine lacks, a dtype its devices cannot run (all before anything loads).
        ImportError: an optional package the model needs is missing.
    """
    cfg.validate()
    if cfg.builtin is not None:
        _check_builtin(cfg)
    elif cfg.device_map is not None and cfg.kind == "classifier":
        raise ValueError("'model.device_map' applies to Hugging Face models (model.kind 'causal_lm' or "
                         "'image_classifier'); got model.kind 'classifier'")
    _check_placement(cfg)
    if cfg.builtin is not None:
        loaded = _load_builtin(cfg, progress)
    elif cfg.kind == "causal_lm":
        model, tokenizer = load_hf_model(
            _auto("AutoModelForCausalLM"), cfg.path, gguf_file=cfg.gguf_file, dtype=cfg.dtype, device=cfg.device,
            device_map=cfg.device_map, progress=progress,
        )
        loaded = LoadedModel(model, CausalLMAdapter(), tokenizer, str(cfg.path or cfg.gguf_file))
    elif cfg.kind == "image_classifier":
        model, _ = load_hf_model(
            _auto("AutoModelForImageClassification"), cfg.path, gguf_file=cfg.gguf_file, dtype=cfg.dtype,
            device=cfg.device, device_map=cfg.device_map, with_tokenizer=False, progress=progress,
        )
        loaded = LoadedModel(model, ImageClassifierAdapter(model), None, str(cfg.path))
    else:
        loaded = _load_saved_classifier(cfg)
    if cfg.include or cfg.exclude:
        loaded.adapter.prunable_layers(loaded.model, cfg.include, cfg.exclude)  # fail early on a bad pattern
    logger.info("loaded %s (%s)", loaded.name, loaded.adapter.kind)
    return loaded
