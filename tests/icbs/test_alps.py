"""ALPS: near-optimal supports on brute-forced tiny layers, the PCG re-fit, exact pattern counts, the CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from icbs import cli, export
from icbs.baselines import run_baseline
from icbs.baselines.alps import alps_prune_weight, pcg_refit, project_to_pattern
from icbs.baselines.sparsegpt import sparsegpt_prune_weight
from icbs.exceptions import PruningError
from icbs.state import MaskPattern, round_half_up

PATTERNS = ("unstructured", "per_output", "2:4")


def _row_best(w: np.ndarray, H: np.ndarray, subsets) -> float:
    """Smallest ``(v - w)^T H (v - w)`` over ``v`` supported on one of ``subsets`` (least-squares values)."""
    hw = H @ w
    best = np.inf
    for subset in subsets:
        S = list(subset)
        best = min(best, float(w @ hw - hw[S] @ np.linalg.solve(H[np.ix_(S, S)], hw[S])))
    return best


def _brute_force_optimum(W: np.ndarray, H: np.ndarray, pattern: MaskPattern) -> float:
    """The best reconstruction error over every feasible mask, each with its least-squares re-fit."""
    n_out, n_in = W.shape
    if pattern.kind == "nm":
        groups = [list(itertools.combinations(range(g, g + pattern.m), pattern.n)) for g in range(0, n_in, pattern.m)]
        subsets = [list(itertools.chain.from_iterable(choice)) for choice in itertools.product(*groups)]
        return sum(_row_best(W[r], H, subsets) for r in range(n_out))
    k = pattern.group_target((n_out, n_in))
    if pattern.kind == "per_output":
        return sum(_row_best(W[r], H, itertools.combinations(range(n_in), k)) for r in range(n_out))
    # Unstructured: the rows are independent once the layer's count is split between them.
    per_row = [[_row_best(W[r], H, itertools.combinations(range(n_in), j)) for j in range(n_in + 1)] for r in range(n_out)]
    return min(sum(per_row[r][j] for r, j in enumerate(split)) for split in itertools.product(range(n_in + 1), repeat=n_out)
               if sum(split) == k)


def _error(new: np.ndarray, W: np.ndarray, H: np.ndarray) -> float:
    d = new - W
    return float(np.einsum("ri,ij,rj->", d, H, d))


@pytest.mark.parametrize("pattern_name", PATTERNS)
def test_alps_is_near_the_brute_force_optimum_on_tiny_layers(pattern_name):
    """20 random layers (2 x 8, 32 random input rows): every feasible mask enumerated, each least-squares re-fit.

    ADMM is a local method, so exact optimality on every instance is not expected; with a generous
    iteration budget it finds the optimum on most instances, and stays within a few percent of it in total,
    well ahead of SparseGPT.
    """
    pattern = MaskPattern.from_config(0.5, pattern_name)
    optimal = 0
    totals = {"alps": 0.0, "sparsegpt": 0.0, "optimum": 0.0}
    for seed in range(20):
        rng = np.random.default_rng(seed)
        W = rng.standard_normal((2, 8))
        X = rng.standard_normal((32, 8))
        H = 2 * X.T @ X / 32
        best = _brute_force_optimum(W, H, pattern)
        new, keep = alps_prune_weight(torch.tensor(W), torch.tensor(H), pattern, damping_frac=0.0, admm_iters=300,
                                      pcg_iters=50, rho_init=0.01)
        assert torch.equal(pattern.kept_per_group(keep), torch.full_like(pattern.kept_per_group(keep), pattern.group_target((2, 8))))
        error = _error(new.double().numpy(), W, H)
        sgpt, _ = sparsegpt_prune_weight(torch.tensor(W, dtype=torch.float32), torch.tensor(H, dtype=torch.float32),
                                         pattern, block_size=8, damping_frac=0.0)
        assert error >= best * (1 - 1e-5)  # nothing feasible beats the enumeration
        assert error <= 1.15 * best
        optimal += error <= best * (1 + 1e-4)
        totals["alps"] += error
        totals["sparsegpt"] += _error(sgpt.double().numpy(), W, H)
        totals["optimum"] += best
    assert optimal >= 13
    assert totals["alps"] <= 1.02 * totals["optimum"]
    assert totals["alps"] <= 0.95 * totals["sparsegpt"]


def test_pcg_refit_equals_least_squares_on_the_support():
    rng = np.random.default_rng(3)
    n_out, n_in, n_rows = 6, 20, 64
    W = rng.standard_normal((n_out, n_in))
    X = rng.standard_normal((n_rows, n_in)) * (rng.random(n_in) * 3 + 0.1)
    keep = rng.random((n_out, n_in)) < np.linspace(0.2, 0.8, n_out)[:, None]
    refit = pcg_refit(torch.tensor(W, dtype=torch.float32), torch.tensor(X.T @ X, dtype=torch.float32),
                      torch.tensor(keep), max_iters=60).double().numpy()
    expected = np.zeros_like(W)
    for r in range(n_out):
        S = np.flatnonzero(keep[r])
        expected[r, S] = np.linalg.lstsq(X[:, S], X @ W[r], rcond=None)[0]
    np.testing.assert_allclose(refit, expected, rtol=1e-3, atol=1e-4)
    assert np.all(refit[~keep] == 0)


@pytest.mark.parametrize("pattern_name", PATTERNS)
def test_alps_keeps_the_exact_counts_of_its_pattern(pattern_name):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(12, 24, generator=gen)
    X = torch.randn(100, 24, generator=gen) @ torch.randn(24, 24, generator=gen)
    pattern = MaskPattern.from_config(0.3, pattern_name)
    new, keep = alps_prune_weight(W, 2 * X.T @ X / 100, pattern)
    assert torch.equal(new != 0, keep)
    counts = pattern.kept_per_group(keep)
    assert (counts == pattern.group_target((12, 24))).all()
    expected = {"unstructured": round_half_up(0.3 * 288), "per_output": 12 * round_half_up(0.3 * 24), "2:4": 144}
    assert int(keep.sum()) == expected[pattern_name]
    assert torch.equal(project_to_pattern(new, pattern), keep)


def test_alps_damping_is_sparsegpts_relative_diagonal_shift():
    """``damping_frac`` means H + damping_frac * mean(diag H) * I, as for SparseGPT."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=gen)
    X = torch.randn(50, 16, generator=gen) * torch.rand(16, generator=gen)
    H = X.T @ X
    pattern = MaskPattern.from_config(0.25, "unstructured")
    damped = H + 0.3 * float(torch.diag(H).mean()) * torch.eye(16)
    new_a, keep_a = alps_prune_weight(W, H, pattern, damping_frac=0.3)
    new_b, keep_b = alps_prune_weight(W, damped, pattern, damping_frac=0.0)
    assert torch.equal(keep_a, keep_b)
    torch.testing.assert_close(new_a, new_b)
    _, keep_c = alps_prune_weight(W, H, pattern, damping_frac=0.0)
    assert not torch.equal(keep_a, keep_c)


def test_alps_non_finite_hessian_raises():
    H = torch.eye(8)
    H[2, 3] = float("nan")
    with pytest.raises(PruningError, match="non-finite"):
        alps_prune_weight(torch.randn(4, 8), H, MaskPattern.from_config(0.5, "unstructured"))


def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    batches = [{"x": torch.randn(20, 16)} for _ in range(2)]
    return model, {"0": model[0], "2": model[2]}, batches, lambda m, b: m(b["x"]).pow(2).sum(1)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"admm_iters": 0}, "'admm_iters' should be a positive int"),
        ({"pcg_iters": 2.5}, "'pcg_iters' should be a positive int"),
        ({"rho_init": 0}, "'rho_init' should be a positive number"),
        ({"rho_init": float("nan")}, "'rho_init' should be a positive number"),
        ({"damping_frac": -0.1}, "'damping_frac' should be a non-negative number"),
        ({"block_size": 64}, "unknown option 'block_size' for baseline 'alps'"),
    ],
)
def test_alps_bad_options_raise_and_leave_the_model_untouched(opts, message):
    model, layers, batches, loss_fn = _mlp_problem()
    before = {name: module.weight.detach().clone() for name, module in layers.items()}
    with pytest.raises(ValueError, match=message):
        run_baseline("alps", model, layers, batches, loss_fn, density=0.5, **opts)
    for name, module in layers.items():
        assert torch.equal(module.weight, before[name])


def test_alps_beats_sparsegpt_on_the_output_of_a_sequentially_pruned_mlp():
    outputs = {}
    for method in ("sparsegpt", "alps"):
        model, layers, batches, loss_fn = _mlp_problem()
        with torch.no_grad():
            dense = model(batches[0]["x"])
        masks = run_baseline(method, model, layers, batches, loss_fn, density=0.3, damping_frac=0.01)
        assert int(masks["0"].sum()) == round_half_up(0.3 * 16 * 12)
        with torch.no_grad():
            outputs[method] = float((model(batches[0]["x"]) - dense).pow(2).mean())
    assert outputs["alps"] < outputs["sparsegpt"]


def test_cli_baseline_alps_on_tiny_llama_writes_outputs(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"kind": "causal_lm", "builtin": "tiny_llama", "device": "cpu"},
        "calibration": {"source": "pydoc", "n_samples": 8, "seq_len": 32, "batch_size": 4},
        "eval": {"n_samples": 8, "seq_len": 32, "batch_size": 4, "every_s": None},
        "pruning": {"density": 0.5, "pattern": "2:4"},
    }))
    out = tmp_path / "out"
    assert cli.main(["baseline", "alps", str(config), "--out", str(out), "--quiet"]) == 0
    report = export.read_report(out / "report.json")
    assert report["method"] == "alps"
    assert np.isfinite(report["metrics"]["final"]["perplexity"])
    masks = export.load_masks(out / export.MASKS_NAME)
    assert masks
    for name, mask in masks.items():
        assert (mask.reshape(-1, 4).sum(dim=1) == 2).all(), name
