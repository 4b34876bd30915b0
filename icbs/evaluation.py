"""Held-out metrics and sparsity reports.

Perplexity of a language model is ``exp`` of the mean next-token negative log-likelihood over *all*
held-out target tokens (padding excluded), not the mean of per-window perplexities. Classifiers report
top-1 accuracy and the mean cross-entropy (or the adapter's loss). :func:`density_report` counts the
zeros actually in the weights, so it checks what was saved rather than what a mask says. Zero-shot
benchmarks go through lm-evaluation-harness when it is installed (``pip install icbs[eval]``): lm-eval's
own tasks by name, or the user's task YAMLs by path.
All evaluation runs under ``torch.no_grad`` with the model in eval mode (restored afterwards).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from icbs.config import EvalConfig

__all__ = [
    "token_nll",
    "causal_lm_nll",
    "causal_lm_kl",
    "dense_top_k",
    "coarse_kl",
    "outcome_targets",
    "distillation_loss",
    "evaluate_lm",
    "evaluate_classifier",
    "density_report",
    "evaluate_lm_eval",
    "check_lm_eval_tasks",
    "run_lm_eval",
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


def _logit_chunks(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, chunk_tokens: int | None
) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, logits)`` of the predicting positions ``start..stop-1``, float32, chunk by chunk.

    Known families (:func:`_decoder_and_head`) run the decoder once and the LM head per chunk of
    ``chunk_tokens`` positions (``None``: as many as fit ``B x chunk x V`` in 2^24 elements); others yield
    their own full logits as one chunk. The last position predicts nothing and is left out.
    """
    n_positions = input_ids.shape[1] - 1
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        yield 0, n_positions, logits[:, :-1, :].float()
        return
    decoder, head, softcap = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    step = chunk_tokens or max(1, _LOGIT_ELEMENTS // max(1, input_ids.shape[0] * head.weight.shape[0]))
    for start in range(0, n_positions, step):
        stop = min(start + step, n_positions)
        logits = head(hidden[:, start:stop])
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        yield start, stop, logits.float()


def _joined(pieces: list[Tensor], input_ids: Tensor) -> Tensor:
    """The per-chunk ``(B, chunk)`` pieces as one ``(B, T-1)`` float32 tensor."""
    if pieces:
        return torch.cat(pieces, dim=1)
    return torch.zeros(input_ids.shape[0], 0, dtype=torch.float32, device=input_ids.device)


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
    pieces = []
    for start, stop, logits in _logit_chunks(model, input_ids, attention_mask, chunk_tokens):
        targets = input_ids[:, start + 1 : stop + 1].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        pieces.append(nll.view(targets.shape))
    nll = _joined(pieces, input_ids)
    valid = _valid_targets(attention_mask, nll)
    return nll * valid, valid


def dense_top_k(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, k: int, *, seed: int = 0,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The model's ``k`` most likely next tokens at every position, their log-probabilities, and a sampled token.

    These are the targets of :func:`causal_lm_kl`: taken from the dense model once, before pruning, they
    cost ``B x (T-1) x (k + 1)`` numbers instead of the full ``B x T x V`` distribution. The sampled token
    is drawn from the full distribution with a generator seeded by ``seed``, so the same model and windows
    give the same targets.

    Returns:
        ``(ids, logp, sample)``: ``(B, T-1, k)`` int32 token ids and float32 log-probabilities, most likely
        first, and ``(B, T-1)`` int32 sampled tokens.
    """
    ids, logps, samples = [], [], []
    generator: torch.Generator | None = None
    with torch.no_grad():
        for _, _, logits in _logit_chunks(model, input_ids, attention_mask, chunk_tokens):
            if generator is None:
                generator = torch.Generator(device=logits.device).manual_seed(seed)
            for out, part in zip((ids, logps, samples), outcome_targets(logits, k, generator)):
                out.append(part)
    return torch.cat(ids, dim=1), torch.cat(logps, dim=1), torch.cat(samples, dim=1)


def outcome_targets(logits: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` most likely outcomes along the last axis, their log-probabilities, and one sampled outcome.

    One log-softmax serves both the top ``k`` and the draw (``generator`` makes it reproducible).

    Returns:
        ``(ids, logp, sample)``: ``(..., k)`` int32 and float32 (``k`` capped at the number of outcomes),
        and ``(...)`` int32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    sample = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
    return top.indices.to(torch.int32), top.values, sample.view(logp.shape[:-1]).to(torch.int32)


def distillation_loss(logits: Tensor, target_ids: Tensor, target_logp: Tensor, sample: Tensor) -> Tensor:
    """The KL of :func:`coarse_kl` in value, the NLL of the dense model's sampled outcome in gradient.

    The gradient of the NLL of an outcome drawn from the dense distribution ``p`` has the mean
    ``∇ CE(p, q) = ∇ KL(p || q)``, and per-sample gradients whose outer products estimate the Fisher of the
    pruned model; the gradients of the KL itself shrink to zero near the dense model, and their outer
    products with them, so a Fisher built from them would under-state the curvature and the block problems
    would take steps too long. The value stays the exact coarsened KL for the round check and the reports.
    """
    kl = coarse_kl(logits, target_ids, target_logp)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), sample.to(logits.device).long().reshape(-1),
                          reduction="none").view(sample.shape)
    return kl.detach() + (nll - nll.detach())


def coarse_kl(logits: Tensor, target_ids: Tensor, target_logp: Tensor) -> Tensor:
    """KL from a reference distribution known by its top ``k`` outcomes to ``softmax(logits)``.

    Both distributions are coarsened to ``k + 1`` outcomes: the reference's ``k`` and "any other". The KL
    of the coarsened pair is exact, zero when the model matches the reference, and never above the full KL;
    with ``k`` equal to the number of outcomes it is the full KL.

    Args:
        logits: ``(..., V)`` model logits.
        target_ids: ``(..., k)`` outcome indices of the reference (any integer dtype).
        target_logp: ``(..., k)`` their reference log-probabilities.

    Returns:
        ``(...)`` float32 divergences.
    """
    ids = target_ids.to(logits.device).long()
    p_logp = target_logp.to(logits.device).float()
    q_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)
    top = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    if ids.shape[-1] >= logits.shape[-1]:  # every outcome listed: the full KL, no remainder to round
        return top
    p_rest = -torch.expm1(torch.logsumexp(p_logp, dim=-1)).clamp_max(0.0)
    q_rest = (-torch.expm1(torch.logsumexp(q_logp, dim=-1).clamp_max(0.0))).clamp_min(torch.finfo(torch.float32).tiny)
    return top + torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest)


def causal_lm_kl(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, target_ids: Tensor, target_logp: Tensor,
    sample: Tensor, *, chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per position, the :func:`distillation_loss` to a reference next-token distribution (the dense model's).

    The logits are scored chunk by chunk as in :func:`causal_lm_nll`, so no ``(B, T, V)`` tensor exists
    outside autograd.

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: as :func:`causal_lm_nll`.
        target_ids, target_logp, sample: from :func:`dense_top_k` on the same windows.

    Returns:
        ``(loss, valid)``, both ``(B, T-1)`` float32, with ``valid`` as :func:`token_nll`; ``loss`` is the
        coarsened KL in value.
    """
    pieces = []
    for start, stop, logits in _logit_chunks(model, input_ids, attention_mask, chunk_tokens):
        pieces.append(distillation_loss(logits, target_ids[:, start:stop], target_logp[:, start:stop],
                                        sample[:, start:stop]))
    kl = _joined(pieces, input_ids)
    valid = _valid_targets(attention_mask, kl)
    return kl * valid, valid


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

    An entry of ``tasks`` is a task, group or tag name (``"arc_easy"``), a task YAML file (``"tasks/qa.yaml"``:
    the task or group it defines runs), or a folder (``"tasks/"``: lm-eval's ``include_path``; the tasks defined
    in its YAML files, searched recursively, become known by name, and run when named). An entry is a path when
    it ends in ``.yaml``/``.yml`` or holds a ``/``; a relative path is read from the working directory. lm-eval
    seeds Python's, numpy's and torch's global generators; their states are restored afterwards, so a run's own
    random streams do not depend on whether lm-eval ran.

    Args:
        model: a Hugging Face causal LM (pruned weights in place).
        tokenizer: its tokenizer.
        tasks: task names and paths, as above.
        batch_size: lm-eval batch size.
        limit: lm-eval's per-task example limit (for quick looks).
        num_fewshot: few-shot examples; ``None`` = the task default (zero-shot for most).

    Returns:
        ``{task: {metric: value}}`` with lm-eval's numeric results; a metric under lm-eval's default filter is
        named without its ``,none`` suffix (``"acc"``, ``"acc_stderr"``).

    Raises:
        ImportError: lm-eval is not installed (``pip install icbs[eval]``).
        ValueError: no tasks, a task lm-eval does not know, or a task path that is missing or names no task.
    """
    names, manager = _resolve_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    with _eval_mode(model), _kept_rng_state():
        results = simple_evaluate(model=wrapped, tasks=list(names), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot)
    return {task: _numeric(metrics) for task, metrics in (results or {}).get("results", {}).items()}


def check_lm_eval_tasks(eval_cfg: EvalConfig, kind: str) -> None:
    """Pre-flight check of ``eval.lm_eval_tasks``: the model is a causal LM and lm-eval knows every task.

    Runs before anything is written or loaded. Indexing lm-eval's own tasks takes seconds, so it happens only
    for a name that no listed folder defines; the index is kept for :func:`run_lm_eval`.

    Args:
        eval_cfg: the ``eval`` section.
        kind: the model family the run loads (``model.kind``, or the built-in model's own).

    Raises:
        ValueError: a model that is not a causal LM, a task lm-eval does not know, or a bad task path.
        ImportError: lm-eval is not installed.
    """
    if not eval_cfg.lm_eval_tasks:
        return
    if kind != "causal_lm":
        raise ValueError(f"'eval.lm_eval_tasks' needs a causal language model (model.kind 'causal_lm'); got {kind!r}")
    _resolve_tasks(eval_cfg.lm_eval_tasks)


def run_lm_eval(
    eval_cfg: EvalConfig, model: nn.Module, tokenizer: Any, stage: str = "final"
) -> dict[str, dict[str, float]] | None:
    """Run ``eval.lm_eval_tasks`` on the model as it is now and log one line of results.

    Args:
        eval_cfg: the ``eval`` section (its ``batch_size`` is lm-eval's batch size).
        model: the causal LM (dense or pruned, in memory).
        tokenizer: its tokenizer.
        stage: what the model is (``"dense"``, ``"final"``), for the log line.

    Returns:
        ``{task: {metric: value}}`` as :func:`evaluate_lm_eval` gives, or ``None`` when no task is set.
    """
    if not eval_cfg.lm_eval_tasks:
        return None
    started = time.perf_counter()
    results = evaluate_lm_eval(model, tokenizer, eval_cfg.lm_eval_tasks, batch_size=eval_cfg.batch_size)
    summary = "; ".join(
        f"{task} " + ", ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name in _HEADLINE)
        for task, metrics in results.items()
    )
    logger.info("lm-eval, %s model (%.0f s): %s", stage, time.perf_counter() - started, summary)
    return results


# Metrics worth a log line; the report keeps every numeric result.
_HEADLINE = ("acc", "acc_norm", "exact_match", "f1", "mcc", "perplexity", "word_perplexity")


def _is_path(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or "/" in entry or os.sep in entry


def _resolve_tasks(entries: Sequence[str]) -> tuple[tuple[str, ...], Any]:
    """The specs lm-eval runs for ``entries`` (task names, and YAML files by path) and a task manager that knows them.

    A folder entry runs nothing itself: it joins lm-eval's ``include_path``, so that the tasks defined under it
    are known by name. lm-eval's own tasks are indexed only when a name is not defined in those folders.
    """
    if not entries:
        raise ValueError("'eval.lm_eval_tasks' should name at least one task; got none")
    _import_lm_eval()
    names: list[str] = []
    files: list[str] = []
    folders: list[str] = []
    for entry in entries:
        path = Path(entry).expanduser().resolve()
        if not _is_path(entry):
            names.append(entry)
        elif entry.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise ValueError(f"'eval.lm_eval_tasks' names task file {entry!r}, which does not exist")
            _yaml_task_name(path, entry)
            files.append(str(path))
        elif path.is_dir():
            folders.append(str(path))
        else:
            raise ValueError(f"'eval.lm_eval_tasks' names task folder {entry!r}, which does not exist")
    if not names and not files:
        raise ValueError("'eval.lm_eval_tasks' lists only task folders; add the names of the tasks in them to run")
    manager = _task_manager(tuple(dict.fromkeys(folders)), False)
    if not set(names) <= set(manager.all_tasks):
        manager = _task_manager(tuple(dict.fromkeys(folders)), True)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise ValueError(f"'eval.lm_eval_tasks' names task {name!r}, which lm-eval does not know")
    return tuple(dict.fromkeys(names + files)), manager


def _import_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "'eval.lm_eval_tasks' needs lm-evaluation-harness; install it with `pip install icbs[eval]`"
        ) from err


@functools.lru_cache(maxsize=8)
def _task_manager(folders: tuple[str, ...], with_lm_eval_tasks: bool) -> Any:
    """lm-eval's task index over ``folders`` (plus its own tasks); cached because indexing takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=with_lm_eval_tasks)


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without running their ``!function`` tags (only the names are wanted)."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _yaml_task_name(path: Path, entry: str) -> str:
    """The task (or group) a task YAML defines: its ``task`` key when that is a name, else its ``group``.

    A name the file does not hold is looked up in the files it ``include``s, as lm-eval does.
    """
    for _ in range(16):  # include chains are short; the bound stops a cycle
        try:
            config = yaml.load(path.read_text(), Loader=_TagTolerantLoader)
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"'eval.lm_eval_tasks' names task file {entry!r}, which cannot be read: {err}") from err
        config = config if isinstance(config, dict) else {}
        for key in ("task", "group"):
            if isinstance(config.get(key), str):
                return str(config[key])
        if not isinstance(config.get("include"), str):
            break
        path = path.parent / config["include"]
    raise ValueError(f"'eval.lm_eval_tasks' names task file {entry!r}, which defines no 'task' or 'group' name")


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's numeric results of one task; ``"acc,none"`` becomes ``"acc"`` (other filters keep theirs)."""
    return {
        key.removesuffix(",none"): float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random states on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
