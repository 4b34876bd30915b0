"""The one input-second-moment function and its three users: padding masked, sums equal to the direct product."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icbs.baselines.sparsegpt import _hessians
from icbs.derivatives import collect_layer_inputs
from icbs.moments import accumulate_second_moments, accumulation_dtype
from icbs.scoring import collect_input_covariances


class _TokenModel(nn.Module):
    """Two linears applied per token of ``x`` (B, T, 6); the loss is one number per window."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"]).pow(2).sum(dim=(1, 2))


def _padded_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 4, 6, generator=generator)
    x2 = torch.randn(3, 4, 6, generator=generator)
    mask1 = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mask2 = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    return [{"x": x1, "attention_mask": mask1}, {"x": x2, "attention_mask": mask2}]


def _direct(model: _TokenModel, batches: list[dict[str, torch.Tensor]], masked: bool) -> dict[str, torch.Tensor]:
    rows_first, rows_second = [], []
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"].bool() if masked else torch.ones_like(batch["attention_mask"]).bool()
            rows_first.append(batch["x"][keep])
            rows_second.append(torch.tanh(model.first(batch["x"]))[keep])
    x1, x2 = torch.cat(rows_first), torch.cat(rows_second)
    return {"first": x1.T @ x1 / x1.shape[0], "second": x2.T @ x2 / x2.shape[0]}


def test_second_moments_leave_padding_rows_out_in_every_caller():
    model = _TokenModel()
    layers = {"first": model.first, "second": model.second}
    batches = _padded_batches()
    expected = _direct(model, batches, masked=True)
    moments = accumulate_second_moments(layers, lambda b: _loss(model, b), batches)
    assert moments.counts == {"first": 14, "second": 14}  # 6 + 8 real tokens of 20
    for name, value in moments.mean().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    for covariance in (collect_input_covariances(model, layers, batches, _loss),
                       collect_layer_inputs(model, layers, batches, _loss)):
        for name in layers:
            torch.testing.assert_close(covariance[name], expected[name], rtol=1e-6, atol=1e-6)


def test_sparsegpt_hessians_are_twice_the_unmasked_second_moment():
    model = _TokenModel()
    layers = {"first": model.first, "second": model.second}
    batches = _padded_batches()
    hessians = _hessians(lambda: [_loss(model, b) for b in batches], layers)
    expected = _direct(model, batches, masked=False)  # the closure carries no attention mask
    for name in layers:
        torch.testing.assert_close(hessians[name], 2.0 * expected[name], rtol=1e-6, atol=1e-6)


def test_second_moments_accumulate_in_float32_for_bf16_layers():
    model = _TokenModel().to(torch.bfloat16)
    layers = {"first": model.first}
    batches = [{"x": b["x"].to(torch.bfloat16)} for b in _padded_batches()]
    moments = accumulate_second_moments(layers, lambda b: model(b["x"]), batches)
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert moments.sums["first"].dtype == torch.float32
    rows = torch.cat([b["x"].reshape(-1, 6).float() for b in batches])
    torch.testing.assert_close(moments.mean()["first"], rows.T @ rows / 20, rtol=1e-6, atol=1e-6)


def test_second_moments_of_an_uncalled_layer_raise_or_are_zero_when_allowed():
    model = _TokenModel()
    unused = nn.Linear(4, 2)
    moments = accumulate_second_moments({"unused": unused}, lambda b: _loss(model, b), _padded_batches())
    assert torch.equal(moments.mean(allow_empty=True)["unused"], torch.zeros(4, 4))
    with pytest.raises(ValueError, match="'unused' was not called"):
        moments.mean()


@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_non_finite_second_moment_raises_a_bad_input_error_naming_the_key(method):
    from icbs.baselines.alps import alps_prune_weight
    from icbs.baselines.sparsegpt import sparsegpt_prune_weight
    from icbs.exceptions import StatisticsError
    from icbs.state import MaskPattern

    H = torch.eye(8)
    H[2, 3] = float("inf")
    prune = {"sparsegpt": sparsegpt_prune_weight, "alps": alps_prune_weight}[method]
    with pytest.raises(StatisticsError, match="non-finite.*scoring.init_damping_frac") as info:
        prune(torch.randn(4, 8), H, MaskPattern.from_config(0.5, "unstructured"))
    assert isinstance(info.value, ValueError)  # the CLI reports it as bad input (exit 2)


def test_singular_hessian_without_damping_names_the_damping_key():
    from icbs.baselines.sparsegpt import inverse_hessian_factor
    from icbs.exceptions import StatisticsError

    x = 1000 * torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    H = x.T @ x  # rank 2 of 16, no zero diagonal: only damping can make it invertible
    with pytest.raises(StatisticsError, match="'scoring.init_damping_frac'"):
        inverse_hessian_factor(H, 0.0)
    assert torch.isfinite(inverse_hessian_factor(H, 0.01)).all()
