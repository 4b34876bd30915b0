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
from tqdm.auto import tqdm

__all__ = [
    "token_nll",
    "causal_lm_nll",
    "evaluate_lm",
    "evaluate_classifier",
    "density_report",
    "evaluate_lm_eval",
]

logger = logging.getLogger(__name__)

#: Elements of one ``(B, chunk, V)`` block of logits in :func:`causal_lm_nll` (64 MiB in float32).
_LOGIT_ELEMENTS = 1 << 24
#: ``config.model_type`` of causal LMs whose logits are ``lm_head(last_hidden_state)`` (Gemma: soft-capped).
_PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2",
    "gemma3_text", "olmo2", "smollm3", "starcoder2",
})


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


def _valid_targets(attention_mask: Tensor | None, nll: Tensor) -> Tensor:
    """``(B, T-1)`` float mask of targets whose token and predicting token are both real (like ``nll``)."""
    if attention_mask is None:
        return torch.ones_like(nll)
    mask = attention_mask.to(nll.device)
    return (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)


def token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Next-token negative log-likelihoods and which of them count, from full logits.

    Args:
        logits: ``(B, T, V)`` model outputs (any float dtype; computed in float32).
        input_ids: ``(B, T)`` long token ids.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding; ``None`` = all real.

    Returns:
        ``(nll, valid)``: ``nll`` ``(B, T-1)`` float32, the NLL of token ``t+1`` given tokens ``<= t``;
        ``valid`` ``(B, T-1)`` float32, 1 where both the predicting and the target token are real.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:].to(shift_logits.device)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape)
    valid = _valid_targets(attention_mask, nll)
    return nll * valid, valid


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """``(decoder, LM head, final soft-cap or None)`` of a causal LM whose logits are ``head(hidden)``, else None.

    Only families whose forward is known to compute ``logits = lm_head(last_hidden_state)`` (plus Gemma's
    final soft-capping) qualify; others (logit scales, biases) are scored from their own full logits.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES or not hasattr(model, "get_decoder"):
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    return model.get_decoder(), head, getattr(config, "final_logit_softcapping", None)


def causal_lm_nll(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, *, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """Next-token NLL of a causal LM without materialising its ``(B, T, V)`` logits.

    The decoder gives the hidden states; the LM head and the log-softmax then run over chunks of
    ``chunk_tokens`` positions, so without autograd the logits in memory are ``(B, chunk_tokens, V)`` at
    most (under autograd each chunk's log-softmax is kept for the backward, as with full logits).
    Model families outside a known list (see :func:`_decoder_and_head`) fall back to ``model(...).logits``.

    Args:
        model: a Hugging Face causal LM (possibly sharded over devices by ``device_map``).
        input_ids: ``(B, T)`` long token ids on the model's input device.
        attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding; ``None`` = all real.
        chunk_tokens: positions per chunk; ``None`` = as many as fit ``B x chunk x V`` in 2^24 elements.

    Returns:
        ``(nll, valid)`` as :func:`token_nll`.
    """
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_nll(logits, input_ids, attention_mask)
    decoder, head, softcap = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    n_batch, n_positions = input_ids.shape[0], input_ids.shape[1] - 1
    vocab = head.weight.shape[0]
    step = chunk_tokens or max(1, _LOGIT_ELEMENTS // max(1, n_batch * vocab))
    pieces = []
    for start in range(0, n_positions, step):
        stop = min(start + step, n_positions)
        logits = head(hidden[:, start:stop])
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        targets = input_ids[:, start + 1 : stop + 1].to(logits.device)
        nll = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
        pieces.append(nll.view(n_batch, stop - start))
    nll = torch.cat(pieces, dim=1) if pieces else hidden.new_zeros(n_batch, 0, dtype=torch.float32)
    valid = _valid_targets(attention_mask, nll)
    return nll * valid, valid


def evaluate_lm(
    model: nn.Module, batches: Sequence[Mapping[str, Tensor]], *, progress: bool = False
) -> dict[str, float]:
    """Perplexity and mean token NLL of a causal LM on held-out token windows.

    The logits are scored chunk by chunk (:func:`causal_lm_nll`), so a large vocabulary costs no
    ``(B, T, V)`` tensor.

    Args:
        model: a Hugging Face causal LM (called with ``input_ids``, ``attention_mask``).
        batches: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}`` batches.
        progress: draw a progress bar over the batches.

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
        for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
            nll, valid = causal_lm_nll(model, input_ids, attention_mask)
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
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy and mean per-sample loss of a classifier.

    Args:
        model: the classifier.
        batches: ``{"x": (B, ...), "y": (B,) long}`` batches.
        logits_fn: ``(model, batch) -> (B, C)`` logits (the adapter moves the batch to the device).
        loss: ``(logits, y) -> (B,)`` per-sample loss; default cross-entropy.
        progress: draw a progress bar over the batches.

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
        for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
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
