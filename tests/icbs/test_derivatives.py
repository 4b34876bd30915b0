"""Tests for icbs.derivatives: every estimator against an independent autograd reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs.batching import index_batch
from icbs.derivatives import (
    collect_layer_inputs,
    estimate_blocks,
    per_sample_gradients,
)
from icbs.exceptions import NonFiniteDerivativeError

# ----------------------------------------------------------------------------------- fixtures


def _mlp(dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _classifier_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _classifier_batch(n=5, d=6, classes=4, dtype=torch.float64, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=gen, dtype=dtype), "y": torch.randint(0, classes, (n,), generator=gen)}


def _random_block(weight: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(weight.numel(), generator=gen)[:n]


def _loop_per_sample(model, layers: dict, batch: dict, loss_fn) -> dict:
    """Reference: one autograd pass per sample, full weight gradient, then pick the block entries."""
    out = {name: [] for name in layers}
    for s in range(next(iter(batch.values())).shape[0]):
        loss = loss_fn(model, index_batch(batch, s))[0]
        grads = torch.autograd.grad(loss, [m.weight for m, _ in layers.values()])
        for (name, (module, idx)), grad in zip(layers.items(), grads):
            out[name].append(grad.reshape(-1)[idx])
    return {name: torch.stack(rows) for name, rows in out.items()}


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    return model


def _lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token NLL over each window's non-padding tokens: one loss per sample."""
    return _lm_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)


def _lm_nll(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(1) / mask.sum(1)


def _lm_batch(n=3, t=7, vocab=50, seed=2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 5:] = 0  # right padding on one window
    return {"input_ids": ids, "attention_mask": mask}


class _ScaleThenLinear(nn.Module):
    """A non-nn.Linear layer with a 2-d weight (used through matmul) and a 1-d elementwise scale."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64) / math.sqrt(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.T) ** 2


class _Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _custom_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(_ScaleThenLinear(6, 7), _Scale(7), nn.Linear(7, 4).double())


# ----------------------------------------------------------------------------------- fisher


def test_fisher_per_sample_gradients_match_single_sample_loop_on_mlp():
    model = _mlp()
    batch = _classifier_batch()
    blocks = {"0": (model[0], _random_block(model[0].weight, 20, 0)), "2": (model[2], _random_block(model[2].weight, 9, 1))}
    got = per_sample_gradients(model, blocks, batch, _classifier_loss)
    want = _loop_per_sample(model, blocks, batch, _classifier_loss)
    for name in blocks:
        assert got[name].shape == (5, len(blocks[name][1]))
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-10)
        assert want[name].abs().max() > 1e-3  # the reference is not trivially zero
    assert all(p.grad is None for p in model.parameters())


def test_fisher_estimate_is_mean_gradient_and_empirical_fisher():
    model = _mlp()
    batch = _classifier_batch(n=6)
    idx = _random_block(model[2].weight, 12, 4)
    est = estimate_blocks("fisher", model, {"out": (model[2], idx)}, batch, _classifier_loss)["out"]
    G = _loop_per_sample(model, {"out": (model[2], idx)}, batch, _classifier_loss)["out"].numpy()
    np.testing.assert_allclose(est.g, G.mean(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(est.H, G.T @ G / 6, rtol=1e-6, atol=1e-12)
    assert est.g.dtype == np.float64 and est.H.shape == (12, 12)
    assert est.loss == pytest.approx(float(_classifier_loss(model, batch).mean().detach()), rel=1e-12)
    assert est.info["method"] == "hooks"
    assert {"forward", "backward", "gather", "hessian", "total"} <= set(est.timings)


def test_fisher_chooses_block_from_the_mean_gradient_of_the_same_pass():
    model = _mlp()
    batch = _classifier_batch(n=6)
    weight = model[2].weight
    seen = {}
    idx = _random_block(weight, 12, 4)

    def choose(mean_grad):
        seen["grad"] = mean_grad.detach().clone()
        return idx

    est = estimate_blocks("fisher", model, {"out": (model[2], choose)}, batch, _classifier_loss)["out"]
    want = estimate_blocks("fisher", model, {"out": (model[2], idx)}, batch, _classifier_loss)["out"]
    weight.requires_grad_(True)
    (full,) = torch.autograd.grad(_classifier_loss(model, batch).mean(), weight)
    weight.requires_grad_(False)
    torch.testing.assert_close(seen["grad"], full.detach(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(est.g, want.g, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(est.H, want.H, rtol=1e-12, atol=1e-15)
    assert torch.equal(est.info["index"], idx.cpu())
    # A choice of no weight leaves the layer out; choosers need a first-order estimator.
    assert estimate_blocks("fisher", model, {"out": (model[2], lambda g: idx[:0])}, batch, _classifier_loss) == {}
    with pytest.raises(ValueError, match="fisher"):
        estimate_blocks("exact", model, {"out": (model[2], choose)}, batch, _classifier_loss)


def test_fisher_per_sample_gradients_match_loop_on_tiny_llama():
    model = _tiny_llama()
    batch = _lm_batch()
    layers = model.model.layers
    blocks = {
        "model.layers.0.self_attn.q_proj": (layers[0].self_attn.q_proj, _random_block(layers[0].self_attn.q_proj.weight, 40, 0)),
        "model.layers.0.self_attn.v_proj": (layers[0].self_attn.v_proj, _random_block(layers[0].self_attn.v_proj.weight, 30, 1)),
        "model.layers.1.mlp.down_proj": (layers[1].mlp.down_proj, _random_block(layers[1].mlp.down_proj.weight, 50, 2)),
    }
    got = per_sample_gradients(model, blocks, batch, _lm_loss)
    want = _loop_per_sample(model, blocks, batch, _lm_loss)
    for name in blocks:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-10)
        assert want[name].abs().max() > 1e-4


def test_fisher_float32_model_accumulates_in_float32_and_stays_close():
    model = _mlp(dtype=torch.float32)
    batch = _classifier_batch(dtype=torch.float32)
    idx = _random_block(model[0].weight, 15, 5)
    got = per_sample_gradients(model, {"0": (model[0], idx)}, batch, _classifier_loss)["0"]
    want = _loop_per_sample(model, {"0": (model[0], idx)}, batch, _classifier_loss)["0"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fisher_vmap_fallback_on_custom_layers_matches_loop():
    model = _custom_model()
    batch = _classifier_batch(n=4)
    blocks = {
        "0": (model[0], _random_block(model[0].weight, 11, 0)),
        "1": (model[1], torch.tensor([0, 3, 6])),
        "2": (model[2], _random_block(model[2].weight, 5, 1)),
    }
    est = estimate_blocks("fisher", model, blocks, batch, _classifier_loss)
    want = _loop_per_sample(model, blocks, batch, _classifier_loss)
    assert est["0"].info["method"] == "vmap" and est["1"].info["method"] == "vmap"
    assert est["2"].info["method"] == "hooks"
    for name in blocks:
        G = want[name].numpy()
        np.testing.assert_allclose(est[name].g, G.mean(0), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(est[name].H, G.T @ G / 4, rtol=1e-6, atol=1e-12)


def test_fisher_loop_fallback_when_vmap_fails(monkeypatch, caplog):
    model = _custom_model()
    batch = _classifier_batch(n=3)
    blocks = {"0": (model[0], _random_block(model[0].weight, 8, 0))}

    def broken_vmap(*args, **kwargs):
        raise RuntimeError("vmap cannot trace this model")

    monkeypatch.setattr(torch.func, "vmap", broken_vmap)
    est = estimate_blocks("fisher", model, blocks, batch, _classifier_loss)["0"]
    G = _loop_per_sample(model, blocks, batch, _classifier_loss)["0"].numpy()
    assert est.info["method"] == "loop"
    assert "looping" in caplog.text
    np.testing.assert_allclose(est.H, G.T @ G / 3, rtol=1e-6, atol=1e-12)
    assert not model[0].weight.grad


def test_gradient_mean_is_rank_one_outer_product():
    model = _mlp()
    batch = _classifier_batch()
    idx = _random_block(model[0].weight, 10, 2)
    est = estimate_blocks("gradient_mean", model, {"0": (model[0], idx)}, batch, _classifier_loss)["0"]
    loss = _classifier_loss(model, batch).mean()
    g_ref = torch.autograd.grad(loss, model[0].weight)[0].reshape(-1)[idx].numpy()
    np.testing.assert_allclose(est.g, g_ref, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(est.H, np.outer(g_ref, g_ref), rtol=1e-8, atol=1e-14)
    assert np.linalg.matrix_rank(est.H, tol=1e-10 * np.abs(est.H).max()) == 1


def test_fisher_leaves_requires_grad_flags_and_weights_alone():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    batch = _classifier_batch()
    estimate_blocks("fisher", model, {"0": (model[0], torch.arange(5))}, batch, _classifier_loss)
    assert model[0].weight.requires_grad is False
    assert torch.equal(model[0].weight, before)


# ----------------------------------------------------------------------------------- exact


def _full_hessian(model, layer, batch, loss_fn):
    """Reference g and H of the mean loss w.r.t. every entry of ``layer.weight`` (autograd.functional)."""
    key = [name for name, p in model.named_parameters() if p is layer.weight][0]
    flat0 = layer.weight.detach().reshape(-1).clone()

    def mean_loss(flat):
        logits = torch.func.functional_call(model, {key: flat.reshape(layer.weight.shape)}, (batch["x"],))
        return F.cross_entropy(logits, batch["y"], reduction="none").mean()

    return torch.autograd.functional.jacobian(mean_loss, flat0), torch.autograd.functional.hessian(mean_loss, flat0)


@pytest.mark.parametrize("force_fallback", [False, True])
def test_exact_matches_autograd_hessian_restricted_to_block(monkeypatch, force_fallback):
    model = _mlp()
    batch = _classifier_batch(n=7)
    idx0 = _random_block(model[0].weight, 13, 0)
    idx2 = _random_block(model[2].weight, 7, 1)
    if force_fallback:
        def broken_vmap(*args, **kwargs):
            raise RuntimeError("no vmap here")

        monkeypatch.setattr(torch.func, "vmap", broken_vmap)
    est = estimate_blocks("exact", model, {"0": (model[0], idx0), "2": (model[2], idx2)}, batch, _classifier_loss)
    for name, layer, idx in (("0", model[0], idx0), ("2", model[2], idx2)):
        g_ref, H_ref = _full_hessian(model, layer, batch, _classifier_loss)
        np.testing.assert_allclose(est[name].g, g_ref[idx].numpy(), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(est[name].H, H_ref[idx][:, idx].numpy(), rtol=1e-8, atol=1e-12)
        assert np.abs(H_ref[idx][:, idx].numpy() - np.diag(np.diag(H_ref[idx][:, idx].numpy()))).max() > 1e-4
        assert est[name].info["method"] == ("double_backward" if force_fallback else "hvp")
        assert torch.equal(est[name].info["index"], idx)
    assert est["0"].loss == pytest.approx(float(_classifier_loss(model, batch).mean().detach()))


def test_fisher_differs_from_exact_hessian_but_has_same_gradient():
    model = _mlp()
    batch = _classifier_batch(n=7)
    blocks = {"2": (model[2], _random_block(model[2].weight, 10, 3))}
    fisher = estimate_blocks("fisher", model, blocks, batch, _classifier_loss)["2"]
    exact = estimate_blocks("exact", model, blocks, batch, _classifier_loss)["2"]
    np.testing.assert_allclose(fisher.g, exact.g, rtol=1e-8, atol=1e-12)
    assert np.abs(fisher.H - exact.H).max() > 1e-3


# ----------------------------------------------------------------------------------- layerwise


def test_layerwise_matches_autograd_hessian_of_reconstruction_objective():
    model = _mlp(seed=4)
    batch = _classifier_batch(n=9)
    layer = model[2]
    W0 = layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(W0.shape, generator=gen) > 0.5
    with torch.no_grad():
        layer.weight.mul_(keep)
    idx = _random_block(W0, 14, 6)
    est = estimate_blocks("layerwise", model, {"2": (layer, idx)}, batch, _classifier_loss, reference_weights={"2": W0})["2"]

    X = torch.tanh(model[0](batch["x"])).detach()  # (N, n_in): the inputs of layer 2

    def objective(flat):
        W = flat.reshape(W0.shape)
        return ((X @ (W - W0).T) ** 2).sum() / X.shape[0]

    flat = layer.weight.detach().reshape(-1).clone()
    H_ref = torch.autograd.functional.hessian(objective, flat)[idx][:, idx].numpy()
    g_ref = torch.autograd.functional.jacobian(objective, flat)[idx].numpy()
    np.testing.assert_allclose(est.H, H_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(est.g, g_ref, rtol=1e-10, atol=1e-12)
    assert np.abs(g_ref).max() > 1e-3  # the pruned entries make a real deviation
    assert est.loss == pytest.approx(float(_classifier_loss(model, batch).mean().detach()))
    assert est.timings["backward"] == 0.0

    cached = collect_layer_inputs(model, {"2": layer}, [batch], _classifier_loss)
    again = estimate_blocks(
        "layerwise", model, {"2": (layer, idx)}, batch, _classifier_loss, layer_inputs=cached, reference_weights={"2": W0}
    )["2"]
    np.testing.assert_allclose(again.H, H_ref, rtol=1e-10, atol=1e-12)
    assert again.info["cached_inputs"] and math.isnan(again.loss)
    assert torch.equal(again.info["index"], idx)


def test_layerwise_skips_padding_tokens():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    model = nn.Sequential(layer)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    batch = {"x": x, "attention_mask": mask}

    def loss_fn(m, b):
        return m(b["x"]).pow(2).mean(dim=(1, 2))

    W0 = layer.weight.detach() + 0.3
    est = estimate_blocks("layerwise", model, {"l": (layer, torch.arange(12))}, batch, loss_fn, reference_weights={"l": W0})["l"]
    X = x[mask.bool()]  # (8, 4): real tokens only
    C = X.T @ X / X.shape[0]
    np.testing.assert_allclose(est.H[:4, :4], 2 * C.numpy(), rtol=1e-12)
    np.testing.assert_allclose(est.H[:4, 4:8], 0.0)


def test_layerwise_requires_reference_weights():
    model = _mlp()
    with pytest.raises(ValueError, match="reference_weights"):
        estimate_blocks("layerwise", model, {"0": (model[0], torch.arange(3))}, _classifier_batch(), _classifier_loss)


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("estimator", ["fisher", "gradient_mean", "exact", "layerwise"])
def test_nan_in_gradient_raises_naming_layer_and_estimator(estimator):
    model = _mlp()
    batch = _classifier_batch()
    batch["x"][2, 1] = float("nan")
    kwargs = {"reference_weights": {"hidden": model[0].weight.detach() * 2}} if estimator == "layerwise" else {}
    with pytest.raises(NonFiniteDerivativeError, match=rf"{estimator}.*'hidden'"):
        estimate_blocks(estimator, model, {"hidden": (model[0], torch.arange(6))}, batch, _classifier_loss, **kwargs)


def test_bad_input_raises_clear_errors():
    model = _mlp()
    batch = _classifier_batch()
    with pytest.raises(ValueError, match="'estimator' should be one of"):
        estimate_blocks("hutchinson", model, {"0": (model[0], torch.arange(3))}, batch, _classifier_loss)
    with pytest.raises(ValueError, match=r"flat indices in \[0, 47\]"):
        estimate_blocks("fisher", model, {"0": (model[0], torch.tensor([0, 48]))}, batch, _classifier_loss)
    with pytest.raises(ValueError, match="should not repeat"):
        estimate_blocks("fisher", model, {"0": (model[0], torch.tensor([1, 1]))}, batch, _classifier_loss)
    with pytest.raises(ValueError, match="not part of the model"):
        estimate_blocks("fisher", model, {"0": (nn.Linear(2, 2), torch.tensor([1]))}, batch, _classifier_loss)
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(5,\)"):
        estimate_blocks("fisher", model, {"0": (model[0], torch.arange(3))}, batch, lambda m, b: _classifier_loss(m, b).mean())


def test_exact_on_tiny_llama_matches_autograd_hessian():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _tiny_llama()
    batch = _lm_batch()
    layer = model.model.layers[0].self_attn.q_proj
    idx = _random_block(layer.weight, 12, 7)
    est = estimate_blocks("exact", model, {"q": (layer, idx)}, batch, _lm_loss)["q"]
    key = [name for name, p in model.named_parameters() if p is layer.weight][0]
    flat0 = layer.weight.detach().reshape(-1).clone()

    def mean_loss(v):
        weight = flat0.index_add(0, idx, v).reshape(layer.weight.shape)
        logits = torch.func.functional_call(model, {key: weight}, (), dict(batch)).logits
        return _lm_nll(logits, batch).mean()

    with sdpa_kernel([SDPBackend.MATH]):
        H_ref = torch.autograd.functional.hessian(mean_loss, torch.zeros(12, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(est.H, H_ref, rtol=1e-6, atol=1e-6 * np.abs(H_ref).max())
    assert np.abs(H_ref).max() > 1e-6
