"""Held-out metrics and sparsity reports.

Perplexity of a language model is ``exp`` of the mean next-token negative log-likelihood over *all*
held-out target tokens (padding excluded), not the mean of per-window perplexities. Classifiers report
top-1 accuracy and the mean cross-entropy (or the adapter's loss). :func:`density_report` counts the
zeros actually in the weights, so it checks what was saved rather than what a mask says. Zero-shot
benchmarks go through lm-evaluation-harness when it is installed (``pip install icbs[eval]``).
All evaluation runs under ``torch.no_grad`` with the model in eval mode (restored afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "token_nll",
    "evaluate_lm",
    "evaluate_classifier",
    "density_report",
    "evaluate_lm_eval",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Next-token negative log-likelihoods and which of them count.

    Args:
        logits: ``(B, T, V)`` model outputs (any float dtype; computed in float32).
        input_ids: ``(B, T)`` long token ids.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding; ``None`` = all real.

    Returns:
        ``(nll, valid)``: ``nll`` ``(B, T-1)`` float32, the NLL of token ``t+1`` given tokens ``<= t``;
        ``valid`` ``(B, T-1)`` float32, 1 where both the predicting and the target token are real.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape)
    if attention_mask is None:
        valid = torch.ones_like(nll)
    else:
        mask = attention_mask.to(nll.device)
        valid = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return nll * valid, valid


def evaluate_lm(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
    """Perplexity and mean token NLL of a causal LM on held-out token windows.

    Args:
        model: a Hugging Face causal LM (called with ``input_ids``, ``attention_mask``; returns ``.logits``).
        batches: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}`` batches.

    Returns:
        ``{"perplexity": exp(loss), "loss": total NLL / number of target tokens, "n_tokens": count}``.

    Raises:
        ValueError: no batches or no target tokens.
    """
    if len(batches) == 0:
        raise ValueError("'batches' should hold at least one evaluation batch; got none")
    device = _device_of(model)
    total_nll = 0.0
    total_tokens = 0.0
    with _eval_mode(model):
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            nll, valid = token_nll(logits, input_ids, attention_mask)
            total_nll += float(nll.double().sum())
            total_tokens += float(valid.double().sum())
    if total_tokens == 0:
        raise ValueError("evaluation batches hold no target tokens (every window is padding or one token long)")
    loss = total_nll / total_tokens
    return {"perplexity": math.exp(loss) if loss < 700 else math.inf, "loss": loss, "n_tokens": total_tokens}


def evaluate_classifier(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    logits_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor],
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and mean per-sample loss of a classifier.

    Args:
        model: the classifier.
        batches: ``{"x": (B, ...), "y": (B,) long}`` batches.
        logits_fn: ``(model, batch) -> (B, C)`` logits (the adapter moves the batch to the device).
        loss: ``(logits, y) -> (B,)`` per-sample loss; default cross-entropy.

    Returns:
        ``{"accuracy": fraction correct, "loss": mean loss, "n_samples": count}``.

    Raises:
        ValueError: no batches.
    """
    if len(batches) == 0:
        raise ValueError("'batches' should hold at least one evaluation batch; got none")
    correct = 0
    total = 0
    loss_sum = 0.0
    with _eval_mode(model):
        for batch in batches:
            logits = logits_fn(model, batch)
            y = batch["y"].to(logits.device)
            per_sample = loss(logits, y) if loss is not None else F.cross_entropy(logits.float(), y, reduction="none")
            correct += int((logits.argmax(dim=-1) == y).sum())
            total += int(y.shape[0])
            loss_sum += float(per_sample.double().sum())
    return {"accuracy": correct / total, "loss": loss_sum / total, "n_samples": float(total)}


def density_report(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Per-layer and global density counted from the weights (a weight is kept iff it is non-zero).

    Args:
        model: the model (unused except for symmetry with other reports; the layers are its modules).
        layers: ``{name: module}`` with a ``weight`` each, e.g. from ``adapter.prunable_layers``.

    Returns:
        ``{"layers": {name: {"density", "n_kept", "n_weights", "shape"}}, "global": {"density", "n_kept",
        "n_weights"}}``.
    """
    del model
    per_layer: dict[str, dict[str, Any]] = {}
    kept_total = 0
    size_total = 0
    for name, module in layers.items():
        weight = module.weight.detach()
        n_kept = int(torch.count_nonzero(weight))
        n_weights = weight.numel()
        per_layer[name] = {
            "density": n_kept / n_weights if n_weights else 1.0,
            "n_kept": n_kept,
            "n_weights": n_weights,
            "shape": list(weight.shape),
        }
        kept_total += n_kept
        size_total += n_weights
    return {
        "layers": per_layer,
        "global": {
            "density": kept_total / size_total if size_total else 1.0,
            "n_kept": kept_total,
            "n_weights": size_total,
        },
    }


def evaluate_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot (or few-shot) tasks of lm-evaluation-harness on the in-memory model.

    Args:
        model: a Hugging Face causal LM (pruned weights in place).
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. ``["arc_easy", "hellaswag"]``.
        batch_size: lm-eval batch size.
        limit: lm-eval's per-task example limit (for quick looks).
        num_fewshot: few-shot examples; ``None`` = the task default (zero-shot for most).

    Returns:
        ``{task: {metric: value}}`` with lm-eval's numeric metrics.

    Raises:
        ImportError: lm-eval is not installed (``pip install icbs[eval]``).
        ValueError: no tasks.
    """
    if not tasks:
        raise ValueError("'eval.lm_eval_tasks' should name at least one task; got none")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            "zero-shot evaluation needs lm-evaluation-harness; install it with `pip install icbs[eval]`"
        ) from err
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _eval_mode(model):
        results = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
    return out
