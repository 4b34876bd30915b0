"""Baselines: exact densities, N:M structure, SparseGPT's reconstruction advantage and sequential driver."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs.baselines import BASELINE_METHODS, run_baseline, sparsegpt_prune_weight
from icbs.baselines.sparsegpt import _call_groups, _run_model_groups
from icbs.config import ModelConfig
from icbs.models import CausalLMAdapter, load_model
from icbs.models.builtin import build_tiny_llama
from icbs.state import MaskPattern, round_half_up


class _Net(nn.Module):
    """Odd-sized MLP so that exact counts are not trivially even."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 37)
        self.fc2 = nn.Linear(37, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _net_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = _Net().eval()
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(24, 24, generator=gen)
    batches = [{"x": torch.randn(16, 24, generator=gen) @ mixing, "y": torch.randint(0, 3, (16,), generator=gen)} for _ in range(3)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    return model, {"fc1": model.fc1, "fc2": model.fc2}, batches, loss_fn


@pytest.mark.parametrize("method", BASELINE_METHODS)
@pytest.mark.parametrize("density", [0.3, 0.55])
def test_baseline_reaches_exact_density(method, density):
    model, layers, batches, loss_fn = _net_problem()
    head = model.head.weight.detach().clone()
    masks = run_baseline(method, model, layers, batches, loss_fn, density=density, seed=1)
    for name, module in layers.items():
        size = module.weight.numel()
        expected = round_half_up(density * size)
        assert int(masks[name].sum()) == expected
        assert int(torch.count_nonzero(module.weight)) == expected  # zeros really in the weights
        assert torch.equal(module.weight != 0, masks[name])
    assert torch.equal(model.head.weight, head)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baseline_per_output_pattern_keeps_exact_row_counts(method):
    model, layers, batches, loss_fn = _net_problem()
    masks = run_baseline(method, model, layers, batches, loss_fn, density=0.3, pattern="per_output")
    for name, module in layers.items():
        n_in = module.weight.shape[1]
        assert (masks[name].sum(dim=1) == round_half_up(0.3 * n_in)).all()
        assert ((module.weight != 0).sum(dim=1) == round_half_up(0.3 * n_in)).all()


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baseline_two_four_pattern_holds_exactly(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    layers = {"0": model[0], "2": model[2]}
    batches = [{"x": torch.randn(20, 32)}]
    masks = run_baseline(method, model, layers, batches, lambda m, b: m(b["x"]).sum(1), density=0.5, pattern="2:4")
    for name, module in layers.items():
        assert ((module.weight != 0).reshape(-1, 4).sum(dim=1) == 2).all(), name
        assert (masks[name].reshape(-1, 4).sum(dim=1) == 2).all()


def _reconstruction_error(w_new: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w_new - w) @ x.T).pow(2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_on_layer_reconstruction(pattern):
    gen = torch.Generator().manual_seed(0)
    n_out, n_in, n_samples = 24, 64, 512
    w = torch.randn(n_out, n_in, generator=gen)
    # Correlated inputs with uneven scales: where second-order information matters.
    x = torch.randn(n_samples, n_in, generator=gen) @ torch.randn(n_in, n_in, generator=gen) * torch.rand(n_in, generator=gen) * 3
    hessian = 2 * x.T @ x / n_samples
    mask_pattern = MaskPattern.from_config(0.5, pattern)
    w_sgpt, keep = sparsegpt_prune_weight(w, hessian, mask_pattern, block_size=16)
    assert torch.equal(w_sgpt != 0, keep)
    layer = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    run_baseline("magnitude", layer, {"l": layer}, [], lambda m, b: None, density=0.5, pattern=pattern)
    err_sgpt = _reconstruction_error(w_sgpt, w, x)
    err_mag = _reconstruction_error(layer.weight.detach(), w, x)
    assert err_sgpt < 0.7 * err_mag


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(10, 32, generator=gen)
    new, keep = sparsegpt_prune_weight(w, torch.eye(32), MaskPattern.from_config(0.25, "unstructured"), block_size=32)
    threshold = w.abs().flatten().sort(descending=True).values[79]
    assert torch.equal(keep, w.abs() >= threshold)
    torch.testing.assert_close(new, w * keep)


def test_sparsegpt_groups_llama_layers_by_shared_input():
    model, _ = build_tiny_llama()
    layers = CausalLMAdapter().prunable_layers(model)
    block = {n: m for n, m in layers.items() if n.startswith("model.layers.0.")}
    ids = torch.randint(0, 256, (2, 8))
    groups = _call_groups(lambda: model(input_ids=ids, use_cache=False), block)
    short = [[name.split(".")[-1] for name in group] for group in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_sparsegpt_block_sequential_equals_full_model_sequential():
    """Cached per-block inputs give the same result as re-running the whole pruned model per group."""
    adapter = CausalLMAdapter()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 259, (4, 24), generator=gen), "attention_mask": torch.ones(4, 24, dtype=torch.long)} for _ in range(2)]
    model_a, _ = build_tiny_llama(seed=4)
    layers_a = adapter.prunable_layers(model_a)
    masks_a = run_baseline("sparsegpt", model_a, layers_a, batches, adapter.per_sample_loss, density=0.4)
    model_b, _ = build_tiny_llama(seed=4)
    layers_b = adapter.prunable_layers(model_b)
    masks_b: dict = {}
    _run_model_groups(model_b, layers_b, batches, adapter.per_sample_loss, MaskPattern.from_config(0.4, "unstructured"), 128, 0.01, masks_b, {})
    for name in layers_a:
        agree = float((masks_a[name] == masks_b[name]).float().mean())
        assert agree > 0.999, name
        torch.testing.assert_close(layers_a[name].weight, layers_b[name].weight, rtol=1e-3, atol=1e-4)
    # The later layers saw pruned inputs: pruning the last block on dense inputs gives other weights.
    model_c, _ = build_tiny_llama(seed=4)
    layers_c = adapter.prunable_layers(model_c)
    last = {n: m for n, m in layers_c.items() if n.startswith("model.layers.1.")}
    run_baseline("sparsegpt", model_c, last, batches, adapter.per_sample_loss, density=0.4)
    name = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(layers_c[name].weight, layers_a[name].weight, atol=1e-4)


@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_sequential_pruning_ignores_a_cache_the_loss_lets_the_model_build(method):
    """A loss_fn without use_cache=False makes transformers pass a growing key/value cache to every block;
    the block-sequential driver drops it, so the result equals the one from a cache-free loss."""
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 259, (4, 16), generator=gen)} for _ in range(2)]

    def loss_with(**forward_kwargs):
        def loss_fn(m, batch):
            ids = batch["input_ids"]
            logits = m(input_ids=ids, **forward_kwargs).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(4, -1).mean(1)

        return loss_fn

    results = []
    # The model's default (use_cache=True) builds a cache; use_cache=False builds none.
    for loss_fn in (loss_with(), loss_with(use_cache=False)):
        model, _ = build_tiny_llama(seed=5)
        layers = CausalLMAdapter().prunable_layers(model)
        masks = run_baseline(method, model, layers, batches, loss_fn, density=0.5)
        results.append((masks, {n: m.weight.detach().clone() for n, m in layers.items()}))
    (masks_a, weights_a), (masks_b, weights_b) = results
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_sparsegpt_beats_magnitude_and_model_reloads_identically(tmp_path):
    adapter = CausalLMAdapter()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 259, (4, 32), generator=gen), "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(2)]
    losses = {}
    for method in ("magnitude", "sparsegpt"):
        model, tokenizer = build_tiny_llama(seed=2)
        with torch.no_grad():
            dense_logits = model(input_ids=batches[0]["input_ids"]).logits
        layers = adapter.prunable_layers(model)
        run_baseline(method, model, layers, batches, adapter.per_sample_loss, density=0.5)
        with torch.no_grad():
            logits = model(input_ids=batches[0]["input_ids"]).logits
        losses[method] = float((logits - dense_logits).pow(2).mean())
    assert losses["sparsegpt"] < losses["magnitude"]
    adapter.save(model, tmp_path, tokenizer)
    loaded = load_model(ModelConfig(kind="causal_lm", path=str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=batches[0]["input_ids"]).logits, logits, rtol=0, atol=0)
    reloaded_layers = loaded.adapter.prunable_layers(loaded.model)
    for name, module in layers.items():
        assert torch.equal(reloaded_layers[name].weight != 0, module.weight != 0)


def test_random_baseline_is_seeded():
    results = []
    for seed in (3, 3, 4):
        model, layers, batches, loss_fn = _net_problem()
        results.append(run_baseline("random", model, layers, batches, loss_fn, density=0.5, seed=seed)["fc1"])
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_wanda_keeps_weights_of_loud_inputs():
    model, layers, batches, loss_fn = _net_problem()
    with torch.no_grad():
        model.fc1.weight[:, 5] *= 0.05  # small weights...
    loud = [{"x": b["x"].clone(), "y": b["y"]} for b in batches]
    for b in loud:
        b["x"][:, 5] *= 1000.0  # ...on an input that is 1000x louder
    wanda = run_baseline("wanda", model, layers, loud, loss_fn, density=0.5)
    assert float(wanda["fc1"][:, 5].float().mean()) > 0.9
    model2, layers2, _, _ = _net_problem()
    with torch.no_grad():
        model2.fc1.weight[:, 5] *= 0.05
    magnitude = run_baseline("magnitude", model2, layers2, loud, loss_fn, density=0.5)
    assert float(magnitude["fc1"][:, 5].float().mean()) < 0.2


def test_bad_input_raises_and_leaves_model_untouched():
    model, layers, batches, loss_fn = _net_problem()
    before = {name: module.weight.detach().clone() for name, module in layers.items()}
    with pytest.raises(ValueError, match="'method'"):
        run_baseline("obs", model, layers, batches, loss_fn, density=0.5)
    with pytest.raises(ValueError, match="unknown option 'blocksize'"):
        run_baseline("sparsegpt", model, layers, batches, loss_fn, density=0.5, blocksize=64)
    with pytest.raises(ValueError, match="'block_size' should be a positive int"):
        run_baseline("sparsegpt", model, layers, batches, loss_fn, density=0.5, block_size=0)
    with pytest.raises(ValueError, match="'pruning.density'"):
        run_baseline("magnitude", model, layers, batches, loss_fn, density=1.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        run_baseline("sparsegpt", model, layers, batches, loss_fn, density=0.5, pattern="2:4")  # fc2 has n_in=37
    with pytest.raises(ValueError, match="'calibration'"):
        run_baseline("sparsegpt", model, layers, [], loss_fn, density=0.5)
    for name, module in layers.items():
        assert torch.equal(module.weight, before[name])


def test_sparsegpt_with_an_included_head_prunes_blocks_then_head():
    adapter = CausalLMAdapter()
    model, _ = build_tiny_llama(seed=5)
    layers = adapter.prunable_layers(model, include=(r"layers\.1\.mlp", "lm_head"))
    batches = [{"input_ids": torch.randint(0, 259, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}]
    masks = run_baseline("sparsegpt", model, layers, batches, adapter.per_sample_loss, density=0.25)
    assert list(masks) == list(layers) and "lm_head" in masks
    for name, module in layers.items():
        assert int(torch.count_nonzero(module.weight)) == round_half_up(0.25 * module.weight.numel()), name
