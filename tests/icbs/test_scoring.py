"""Tests for icbs.scoring: score functions, exact-count initial masks, calibration statistics."""

import pytest
import torch
from torch import nn

from icbs.exceptions import NonFiniteDerivativeError
from icbs.scoring import collect_activation_norms, collect_gradients, collect_input_covariances, init_mask, score
from icbs.state import MaskPattern, round_half_up


def _weight(seed=0, shape=(6, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_score_methods_match_formulas():
    w = _weight()
    norms = torch.rand(8) + 0.5
    grad = torch.randn(6, 8)
    assert torch.allclose(score("magnitude", "per_layer", w), w.abs())
    assert torch.allclose(score("wanda", "per_layer", w, act_norm=norms), w.abs() * norms[None, :])
    assert torch.allclose(score("gradient", "per_layer", w, grad=grad), (w * grad).abs())
    r1 = score("random", "per_layer", w, generator=torch.Generator().manual_seed(3))
    r2 = score("random", "per_layer", w, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and r1.min() >= 0 and r1.max() < 1


def test_score_scopes_normalise_rows_or_columns_and_keep_ranks_within():
    w = _weight()
    per_out = score("magnitude", "per_output", w)
    per_in = score("magnitude", "per_input", w)
    assert torch.allclose(per_out.mean(dim=1), torch.ones(6))
    assert torch.allclose(per_in.mean(dim=0), torch.ones(8))
    assert torch.equal(per_out.argsort(dim=1), w.abs().argsort(dim=1))


def test_score_rejects_bad_input():
    w = _weight()
    with pytest.raises(ValueError, match="one of"):
        score("taylor", "per_layer", w)
    with pytest.raises(ValueError, match="act_norm"):
        score("wanda", "per_layer", w)
    with pytest.raises(ValueError, match="grad"):
        score("gradient", "per_layer", w, grad=torch.zeros(3))


@pytest.mark.parametrize("scope", ["per_layer", "per_output", "per_input"])
def test_init_mask_unstructured_exact_count_and_scope(scope):
    s = torch.rand(7, 9, generator=torch.Generator().manual_seed(1))
    pat = MaskPattern.from_config(0.37, "unstructured")
    mask = init_mask(s, pat, scope)
    assert int(mask.sum()) == round_half_up(0.37 * 63)
    if scope == "per_layer":
        assert float(s[mask].min()) >= float(s[~mask].max())
    elif scope == "per_output":
        counts = mask.sum(dim=1)
        assert int(counts.max() - counts.min()) <= 1
        for r in range(7):
            if (~mask[r]).any():
                assert float(s[r][mask[r]].min()) >= float(s[r][~mask[r]].max())
    else:
        counts = mask.sum(dim=0)
        assert int(counts.max() - counts.min()) <= 1


def test_init_mask_per_output_and_nm_exact_counts_keep_best():
    s = torch.rand(5, 8, generator=torch.Generator().manual_seed(2))
    rows = init_mask(s, MaskPattern.from_config(0.25, "per_output"))
    assert rows.sum(dim=1).tolist() == [2] * 5
    assert torch.equal(rows, torch.zeros_like(rows).scatter_(1, s.topk(2, dim=1).indices, True))
    nm = init_mask(s, MaskPattern.from_config(0.5, "2:4"))
    groups = s.reshape(-1, 4)
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    assert torch.equal(nm.reshape(-1, 4), expected)


def _mlp_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(10, 4)
    y = torch.randn(10, 2)
    batches = [{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}]
    loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(dim=1)  # noqa: E731
    return model, {"a": model[0], "b": model[2]}, batches, loss, x, y


def test_activation_norms_and_covariances_match_direct_computation():
    model, layers, batches, loss, x, _ = _mlp_and_batches()
    norms = collect_activation_norms(model, layers, batches, loss)
    cov = collect_input_covariances(model, layers, batches, loss)
    hidden = torch.relu(model[0](x)).detach()
    assert torch.allclose(norms["a"], x.norm(dim=0), atol=1e-6)
    assert torch.allclose(norms["b"], hidden.norm(dim=0), atol=1e-6)
    assert torch.allclose(cov["a"], x.T @ x / 10, atol=1e-6)


def test_collect_gradients_is_mean_over_samples_and_leaves_flags():
    model, layers, batches, loss, x, y = _mlp_and_batches()
    model[0].weight.requires_grad_(False)
    grads = collect_gradients(model, layers, batches, loss)
    model[0].weight.requires_grad_(True)
    full = loss(model, {"x": x, "y": y}).mean()
    expected = torch.autograd.grad(full, [model[0].weight, model[2].weight])
    assert torch.allclose(grads["a"], expected[0], atol=1e-6)
    assert torch.allclose(grads["b"], expected[1], atol=1e-6)
    model[0].weight.requires_grad_(False)
    collect_gradients(model, layers, batches, loss)
    assert model[0].weight.requires_grad is False and model[0].weight.grad is None


def test_collect_gradients_raises_on_nan_loss():
    model, layers, batches, _, _, _ = _mlp_and_batches()
    nan_loss = lambda m, b: m(b["x"]).sum(dim=1) * float("nan")  # noqa: E731
    with pytest.raises(NonFiniteDerivativeError, match="layer 'a'"):
        collect_gradients(model, layers, batches, nan_loss)
