"""Tiny-model fixtures shared by the test suite: a 2-layer MLP on toy data and a toy transformer LM.

The builders are plain functions (importable from subprocesses with ``sys.path`` pointing here) and
are also exposed as factory fixtures, so a test can build the same model twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pytest


class TinyMLP(nn.Module):
    """``fc1: (hidden, n_in)`` -> ReLU -> ``fc2: (n_out, hidden)``."""

    def __init__(self, n_in: int = 6, hidden: int = 8, n_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def mse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample mean squared error ``(B,)`` of ``model(batch['x'])`` against ``batch['y']``."""
    return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)


def make_mlp_problem(
    seed: int = 0, n_samples: int = 32, batch_size: int = 8, n_in: int = 6, hidden: int = 8, n_out: int = 3
) -> tuple[TinyMLP, list[dict[str, torch.Tensor]], object]:
    """A float64 MLP and calibration batches whose targets are the dense model's outputs plus noise.

    Returns:
        ``(model, calibration, loss_fn)``; the dense model has a small loss, pruning raises it.
    """
    gen = torch.Generator().manual_seed(seed)
    model = TinyMLP(n_in, hidden, n_out).double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.7)
    x = torch.randn(n_samples, n_in, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x) + 0.05 * torch.randn(n_samples, n_out, generator=gen, dtype=torch.float64)
    batches = [{"x": x[i : i + batch_size], "y": y[i : i + batch_size]} for i in range(0, n_samples, batch_size)]
    return model.eval(), batches, mse_loss


def make_linear_problem(seed: int = 0, n_samples: int = 24, n_in: int = 8, n_out: int = 4):
    """A single float64 ``nn.Linear`` regression (loss exactly quadratic in the weights)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=torch.float64))
        model[0].bias.zero_()
    x = torch.randn(n_samples, n_in, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return model.eval(), [{"x": x, "y": y}], mse_loss


class ToyTransformer(nn.Module):
    """A one-block causal transformer LM with random weights: embed, attention (q, k, v, o), MLP, lm_head."""

    def __init__(self, vocab: int = 32, d_model: int = 16, d_ff: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.up_proj = nn.Linear(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model)
        self.lm_head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        t = input_ids.shape[1]
        scores = self.q_proj(h) @ self.k_proj(h).transpose(1, 2) / h.shape[-1] ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        h = h + self.o_proj(torch.softmax(scores, dim=-1) @ self.v_proj(h))
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.lm_head(h)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample mean next-token NLL ``(B,)`` over non-padding tokens."""
    logits = model(batch["input_ids"], batch.get("attention_mask"))
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def make_transformer_problem(seed: int = 0, n_samples: int = 8, seq_len: int = 12, batch_size: int = 4):
    """A float32 toy transformer and token batches. Returns ``(model, calibration, loss_fn)``."""
    torch.manual_seed(seed)
    model = ToyTransformer().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 32, (n_samples, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    batches = [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
        for i in range(0, n_samples, batch_size)
    ]
    return model, batches, lm_loss


@pytest.fixture
def mlp_problem():
    """Factory: ``mlp_problem(seed=0) -> (model, calibration, loss_fn)``."""
    return make_mlp_problem


@pytest.fixture
def linear_problem():
    """Factory: ``linear_problem(seed=0) -> (model, calibration, loss_fn)``."""
    return make_linear_problem


@pytest.fixture
def transformer_problem():
    """Factory: ``transformer_problem(seed=0) -> (model, calibration, loss_fn)``."""
    return make_transformer_problem
