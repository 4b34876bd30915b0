"""Adapter and loader for Hugging Face causal language models (Llama/Mistral family).

Batches are token windows ``{"input_ids": (B, T), "attention_mask": (B, T)}``; the per-sample loss is the
mean next-token NLL over the window's non-padding targets (a target counts when it and the token that
predicts it are both real). Models come from a local folder, a hub id (for users with network), or a GGUF
file (``gguf_file=``; transformers de-quantises it to the configured dtype). The same
:func:`load_hf_model` reads folders written by :meth:`CausalLMAdapter.save`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from icbs.evaluation import causal_lm_kl, causal_lm_nll, dense_top_k, evaluate_lm
from icbs.models.base import (
    check_dtype_runs,
    find_prunable_layers,
    model_device,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
)
from icbs.targets import DENSE_IDS, DENSE_LOGP, DENSE_SAMPLE, has_dense_targets

__all__ = ["CausalLMAdapter", "load_hf_model", "resolve_model_path", "save_hf_model"]

logger = logging.getLogger(__name__)

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model_path(path: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Turn ``model.path``/``model.gguf_file`` into ``(folder or hub id, gguf file name or None)``.

    ``gguf_file`` may be absolute (then ``path`` may be unset) or relative to ``path``; a ``path`` that is
    itself a ``.gguf`` file is split into folder and name.

    Raises:
        ValueError: a local path or GGUF file does not exist (a string that is not a local path and looks
            like ``org/name`` is passed on as a hub id).
    """
    if gguf_file is not None:
        gguf = Path(gguf_file).expanduser()
        if gguf.is_absolute() or path is None:
            if not gguf.is_file():
                raise ValueError(f"'model.gguf_file' should be an existing GGUF file; got {gguf_file!r}")
            return str(gguf.parent), gguf.name
    if path is None:
        raise ValueError("'model.path' should be set (a local folder, a hub id or a .gguf file); got None")
    local = Path(path).expanduser()
    if local.exists():
        if local.is_file():
            if local.suffix != ".gguf" or gguf_file is not None:
                raise ValueError(f"'model.path' should be a model folder or a .gguf file; got the file {path!r}")
            return str(local.parent), local.name
        if gguf_file is not None and not (local / gguf_file).is_file():
            raise ValueError(f"'model.gguf_file' {gguf_file!r} is not a file in 'model.path' {path!r}")
        return str(local), gguf_file
    if path.startswith((".", "/", "~")) or not _HUB_ID_RE.fullmatch(path):
        raise ValueError(f"'model.path' should be an existing folder, a .gguf file or a hub id; got {path!r}")
    return path, gguf_file


def load_hf_model(
    auto_class: Any,
    path: str | None,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    device_map: str | Mapping[str, Any] | None = None,
    with_tokenizer: bool = True,
    progress: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a transformers model (and tokenizer) from a folder, hub id or GGUF file.

    Args:
        auto_class: e.g. ``transformers.AutoModelForCausalLM``.
        path: local folder, hub id, or ``.gguf`` file.
        gguf_file: GGUF file name inside ``path`` (or absolute).
        dtype: ``"float32"``, ``"bfloat16"``... (GGUF weights are de-quantised to it).
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``... (ignored when ``device_map`` is set).
        device_map: accelerate placement (``"auto"``, ``"balanced"``, ``"sequential"`` or a mapping module ->
            device): the weights load straight onto their devices, shard by shard, so a model larger than one
            device (or than host memory) loads at all.
        with_tokenizer: also load the tokenizer from the same place.
        progress: show progress bars (transformers' own bars over shards/tensors included).

    Returns:
        ``(model in eval mode on its device(s), tokenizer or None)``.

    Raises:
        ValueError: the path does not exist and is not a reachable hub id; a device or dtype this machine
            cannot use (checked before loading).
    """
    location, gguf = resolve_model_path(path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"], devices = resolve_device_map(device_map)
    else:
        devices = [resolve_device(device)]
    check_dtype_runs(dtype, devices)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    steps = tqdm(total=2 if with_tokenizer else 1, desc="load model", unit="step", disable=not progress, leave=False)
    try:
        with _transformers_bars(progress):
            model = auto_class.from_pretrained(location, **kwargs)
            steps.update()
            tokenizer = None
            if with_tokenizer:
                from transformers import AutoTokenizer

                tok_kwargs = {"gguf_file": gguf} if gguf is not None else {}
                tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
                steps.update()
    except OSError as err:
        raise ValueError(
            f"'model.path' {path!r} could not be loaded as a local model folder or hub id: {err}"
        ) from err
    finally:
        steps.close()
    if device_map is None:
        model.to(devices[0])
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' own progress bars on or off for the duration (and restore them)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def save_hf_model(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, progress: bool = False) -> None:
    """``save_pretrained`` in safetensors (without a GGUF ``quantization_config``) plus the tokenizer.

    The model's config is left as it was. With ``progress``, a bar names the stage being written
    (weights, then tokenizer): both can take minutes for a large model or vocabulary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    # A GGUF model is de-quantised on load but keeps the GGUF quantizer record, which makes
    # save_pretrained refuse; the weights in memory are plain tensors, so save them as such.
    removed = config.__dict__.pop("quantization_config", None)
    quantizer = model.__dict__.get("hf_quantizer")
    if quantizer is not None:
        model.hf_quantizer = None
    steps = tqdm(total=2 if tokenizer is not None else 1, desc="save weights", unit="step", disable=not progress,
                 leave=False)
    try:
        kwargs: dict[str, Any] = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True
        with _transformers_bars(progress):
            model.save_pretrained(str(out), **kwargs)
        steps.update()
        if tokenizer is not None:
            steps.set_description("save tokenizer")
            tokenizer.save_pretrained(str(out))
            steps.update()
    finally:
        steps.close()
        if removed is not None:
            config.quantization_config = removed
        if quantizer is not None:
            model.hf_quantizer = quantizer


def _inputs(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The batch's ``input_ids`` and ``attention_mask`` (or None) on the model's input device."""
    device = model_device(model)
    attention_mask = batch.get("attention_mask")
    return batch["input_ids"].to(device), attention_mask.to(device) if attention_mask is not None else None


class CausalLMAdapter:
    """Hugging Face causal LM: next-token NLL per window, perplexity on held-out windows."""

    kind = "causal_lm"

    def prunable_layers(
        self, model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> dict[str, nn.Module]:
        """Every ``nn.Linear`` except ``lm_head``, filtered by the patterns."""
        return find_prunable_layers(model, include, exclude)

    def per_sample_loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean next-token NLL over each window's non-padding targets, shape ``(B,)`` float32.

        A batch with dense-model targets (:meth:`dense_targets`) gets the mean per-token KL divergence
        from them instead (:func:`icbs.evaluation.causal_lm_kl`), over the same positions.

        A window with no valid target (all padding) gets loss 0. The LM head runs chunk by chunk
        (:func:`icbs.evaluation.causal_lm_nll`), so a large vocabulary's full logits never exist at once
        outside autograd.
        """
        input_ids, attention_mask = _inputs(model, batch)
        if has_dense_targets(batch):
            loss, valid = causal_lm_kl(model, input_ids, attention_mask, batch[DENSE_IDS], batch[DENSE_LOGP],
                                       batch[DENSE_SAMPLE])
        else:
            loss, valid = causal_lm_nll(model, input_ids, attention_mask)
        return loss.sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)

    def dense_targets(self, model: nn.Module, batch: Mapping[str, Tensor], top_k: int, *, seed: int = 0
                      ) -> dict[str, Tensor]:
        """The model's ``top_k`` next tokens and log-probabilities per position, and a token sampled from it.

        Added to a calibration batch (``calibration.targets: dense``), they turn :meth:`per_sample_loss`
        into the mean per-token KL divergence from this (dense) model to the model being pruned (in value;
        its gradient is that of the sampled token's NLL, :func:`icbs.evaluation.distillation_loss`).
        """
        ids, logp, sample = dense_top_k(model, *_inputs(model, batch), top_k, seed=seed)
        device = batch["input_ids"].device
        return {DENSE_IDS: ids.to(device), DENSE_LOGP: logp.to(device), DENSE_SAMPLE: sample.to(device)}

    def evaluate(
        self, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], *, progress: bool = False
    ) -> dict[str, float]:
        """``{"perplexity", "loss", "n_tokens"}`` over all held-out target tokens."""
        return evaluate_lm(model, batches, progress=progress)

    def save(self, model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, progress: bool = False) -> None:
        """``save_pretrained`` (safetensors) + tokenizer; reloadable with ``model.path=out_dir``."""
        save_hf_model(model, out_dir, tokenizer, progress=progress)

