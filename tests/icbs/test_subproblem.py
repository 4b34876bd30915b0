"""Tests for icbs.subproblem: the QUBO of a block equals the local quadratic model of the loss."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs.derivatives import BlockEstimate, estimate_blocks
from icbs.subproblem import build_block_problem, keep_to_x, x_to_keep


def _classifier_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _setup(n=24, seed=0, estimator="fisher"):
    """A real block of a small MLP's first layer, masked at 50%, with its estimate."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    layer = model[0]
    w0_full = layer.weight.detach().clone()
    keep_full = torch.rand(w0_full.shape) > 0.5
    with torch.no_grad():
        layer.weight.mul_(keep_full)
    idx = torch.randperm(w0_full.numel())[:n]
    batch = {"x": torch.randn(10, 8, dtype=torch.float64), "y": torch.randint(0, 3, (10,))}
    est = estimate_blocks(estimator, model, {"l": (layer, idx)}, batch, _classifier_loss)["l"]
    return model, layer, batch, idx, w0_full.reshape(-1)[idx], layer.weight.detach().reshape(-1)[idx], keep_full.reshape(-1)[idx], est


def _quadratic_model_torch(est, w0, w, x, alpha, ridge):
    """alpha g^T Delta + 1/2 Delta^T H Delta + ridge ||Delta||^2 with Delta = (1 - x) w0 - w, in torch."""
    g = torch.as_tensor(est.g)
    H = torch.as_tensor(est.H)
    new = (1 - torch.as_tensor(x, dtype=torch.float64)) * w0
    delta = new - w
    return float(alpha * g @ delta + 0.5 * delta @ H @ delta + ridge * delta @ delta)


@pytest.mark.parametrize("alpha,ridge", [(1.0, 0.0), (0.7, 0.05), (-1.3, 1.5)])
def test_block_problem_energy_equals_quadratic_model(alpha, ridge):
    model, layer, batch, idx, w0, w, keep, est = _setup()
    problem, x_cur = build_block_problem(est, w0, w, keep, None, alpha=alpha, ridge=ridge)
    rng = np.random.default_rng(0)
    values = []
    for _ in range(50):
        x = rng.integers(0, 2, size=24)
        want = _quadratic_model_torch(est, w0, w, x, alpha, ridge)
        got = float(x @ problem.Q @ x + problem.offset)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12 * np.abs(problem.Q).sum())
        assert problem.energy(x) == pytest.approx(want, rel=1e-6, abs=1e-12 * np.abs(problem.Q).sum())
        values.append(want)
    assert np.std(values) > 1e-4  # the energies vary: the check compares real numbers


def test_current_mask_is_feasible_with_zero_energy():
    model, layer, batch, idx, w0, w, keep, est = _setup()
    problem, x_cur = build_block_problem(est, w0, w, keep, None, alpha=1.0, ridge=0.1)
    np.testing.assert_array_equal(x_cur, (~keep).numpy().astype(np.int8))
    assert problem.is_feasible(x_cur)
    assert abs(problem.energy(x_cur)) <= 1e-12 * np.abs(problem.Q).sum()
    assert len(problem.constraints) == 1
    members, k = problem.constraints[0]
    assert k == int((~keep).sum()) and members.size == 24


def test_block_problem_predicts_true_loss_change_of_quadratic_loss():
    """For a loss that is exactly quadratic in the weights, the exact estimate's QUBO is the true ΔL."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3, bias=False).double()
    model = nn.Sequential(layer)
    x_in = torch.randn(12, 5, dtype=torch.float64)
    target = torch.randn(12, 3, dtype=torch.float64)
    batch = {"x": x_in, "t": target}

    def loss_fn(m, b):
        return ((m(b["x"]) - b["t"]) ** 2).sum(dim=1)

    w0_full = layer.weight.detach().clone()
    keep_full = torch.ones_like(w0_full, dtype=torch.bool)
    keep_full.view(-1)[[0, 4, 7, 11, 13]] = False
    with torch.no_grad():
        layer.weight.mul_(keep_full)
    idx = torch.arange(15)
    est = estimate_blocks("exact", model, {"l": (layer, idx)}, batch, loss_fn)["l"]
    problem, x_cur = build_block_problem(est, w0_full.view(-1), layer.weight.detach().view(-1), keep_full.view(-1), None, alpha=1.0, ridge=0.0)
    base = float(loss_fn(model, batch).mean().detach())
    rng = np.random.default_rng(3)
    for _ in range(10):
        x = np.zeros(15, dtype=np.int8)
        x[rng.choice(15, size=5, replace=False)] = 1
        with torch.no_grad():
            trial = nn.Sequential(nn.Linear(5, 3, bias=False).double())
            trial[0].weight.copy_((w0_full.view(-1) * torch.as_tensor(1 - x, dtype=torch.float64)).view(3, 5))
            true_change = float(loss_fn(trial, batch).mean()) - base
        assert problem.energy(x) == pytest.approx(true_change, rel=1e-9, abs=1e-12)


def test_groups_give_per_row_constraints():
    model, layer, batch, idx, w0, w, keep, est = _setup()
    x_cur = keep_to_x(keep)
    groups = [(np.arange(0, 12), int(x_cur[:12].sum())), (np.arange(12, 24), int(x_cur[12:].sum()))]
    problem, x = build_block_problem(est, w0, w, keep, groups, alpha=1.0, ridge=0.0)
    assert [int(k) for _, k in problem.constraints] == [int(x_cur[:12].sum()), int(x_cur[12:].sum())]
    assert problem.is_feasible(x)
    moved = x.copy()
    first_pruned = int(np.flatnonzero(moved[:12])[0])
    first_kept = 12 + int(np.flatnonzero(moved[12:] == 0)[0])
    moved[first_pruned], moved[first_kept] = 0, 1  # a swap across groups keeps the total, breaks the groups
    assert not problem.is_feasible(moved)


def test_group_with_wrong_k_and_bad_shapes_raise():
    model, layer, batch, idx, w0, w, keep, est = _setup()
    pruned = int((~keep).sum())
    with pytest.raises(ValueError, match=r"'groups\[0\]' k should equal"):
        build_block_problem(est, w0, w, keep, [(np.arange(24), pruned + 1)], alpha=1.0, ridge=0.0)
    with pytest.raises(ValueError, match=r"'w0' should hold the block's 24 values"):
        build_block_problem(est, w0[:5], w, keep, None, alpha=1.0, ridge=0.0)
    with pytest.raises(ValueError, match="'keep_mask_block' should have shape"):
        build_block_problem(est, w0, w, keep[:3], None, alpha=1.0, ridge=0.0)
    with pytest.raises(TypeError, match="bool mask"):
        build_block_problem(est, w0, w, keep.long(), None, alpha=1.0, ridge=0.0)
    with pytest.raises(ValueError, match="'w_current' should be finite"):
        build_block_problem(est, w0, w * float("nan"), keep, None, alpha=1.0, ridge=0.0)


def test_refitted_weights_warn_that_current_energy_is_not_zero(caplog):
    model, layer, batch, idx, w0, w, keep, est = _setup()
    refitted = w + 0.1 * keep.double()  # kept weights moved away from w0
    with caplog.at_level(logging.WARNING, logger="icbs.subproblem"):
        problem, x_cur = build_block_problem(est, w0, refitted, keep, None, alpha=1.0, ridge=0.0)
    assert "not 0" in caplog.text
    assert abs(problem.energy(x_cur)) > 1e-6


def test_keep_and_x_round_trip():
    keep = torch.tensor([True, False, False, True])
    x = keep_to_x(keep)
    np.testing.assert_array_equal(x, [0, 1, 1, 0])
    assert torch.equal(x_to_keep(x), keep)


def test_block_problem_solved_by_exhaustive_is_no_worse_than_current():
    solvers = pytest.importorskip("solvers")
    model, layer, batch, idx, w0, w, keep, est = _setup(n=12, seed=2)
    problem, x_cur = build_block_problem(est, w0, w, keep, None, alpha=1.0, ridge=0.0)
    solution = solvers.get_solver("exhaustive").solve(problem, initial_state=x_cur, seed=0)
    assert problem.is_feasible(solution.x)
    assert solution.energy <= problem.energy(x_cur) + 1e-12
    assert int(np.sum(solution.x)) == int(np.sum(x_cur))


def test_manual_estimate_object_is_accepted():
    est = BlockEstimate(g=np.array([1.0, -2.0]), H=np.eye(2), loss=0.0, timings={})
    problem, x_cur = build_block_problem(
        est, torch.tensor([0.5, -1.0]), torch.tensor([0.0, -1.0]), torch.tensor([False, True]), None, alpha=1.0, ridge=0.0
    )
    # x = [0, 1]: restore weight 0 (Δ0 = +0.5) and prune weight 1 (Δ1 = +1.0).
    delta = np.array([0.5, 1.0])
    assert problem.energy(np.array([0, 1])) == pytest.approx(np.array([1.0, -2.0]) @ delta + 0.5 * delta @ delta)
