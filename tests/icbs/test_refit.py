"""Kept weights re-fitted inside the search (bcd.refit: rounds): exact least squares, pattern-safe, undoable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import icbs
from icbs.refit import Refitter, reconstruct_weights
from icbs.state import MaskPattern, PruningState


def _layer_state(seed: int, n_out: int = 5, n_in: int = 12, n_samples: int = 60):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=torch.float64))
    x = torch.randn(n_samples, n_in, generator=gen, dtype=torch.float64) @ torch.randn(n_in, n_in, generator=gen,
                                                                                     dtype=torch.float64)
    state = PruningState({"fc": layer}, MaskPattern.from_config(0.5, "per_output"))
    keep = torch.zeros(n_out, n_in, dtype=torch.bool)
    for r in range(n_out):
        keep[r, torch.randperm(n_in, generator=gen)[: n_in // 2]] = True
    state.set_masks({"fc": keep})
    state.apply()
    return state, layer, x


@pytest.mark.parametrize("seed", range(4))
def test_refit_rows_equal_numpy_least_squares(seed):
    state, layer, x = _layer_state(seed)
    w0 = state["fc"].w0.clone()
    refitter = Refitter({"fc": x.T @ x / x.shape[0]}, damping=0.0, max_iters=200, rtol=1e-13)
    refitter.refit_rows(state, "fc", torch.arange(5))
    X, W0 = x.numpy(), w0.numpy()
    for r in range(5):
        support = state["fc"].keep_mask[r].numpy()
        expected, *_ = np.linalg.lstsq(X[:, support], X @ W0[r], rcond=None)
        np.testing.assert_allclose(layer.weight.detach()[r].numpy()[support], expected, rtol=1e-8, atol=1e-10)
        assert np.all(layer.weight.detach()[r].numpy()[~support] == 0)
        # Pruned weights keep their dense value as the value-if-kept.
        np.testing.assert_array_equal(state["fc"].values[r].numpy()[~support], W0[r][~support])


def test_refit_rows_with_damping_solve_the_damped_system():
    state, layer, x = _layer_state(7)
    covariance = x.T @ x / x.shape[0]
    lam = 0.05 * float(torch.diagonal(covariance).mean())
    w0 = state["fc"].w0.clone()
    Refitter({"fc": covariance}, damping=0.05, max_iters=200, rtol=1e-13).refit_rows(state, "fc", torch.arange(5))
    damped = (covariance + lam * torch.eye(12, dtype=torch.float64)).numpy()
    for r in range(5):
        s = state["fc"].keep_mask[r].numpy()
        expected = np.linalg.solve(damped[np.ix_(s, s)], (damped @ w0[r].numpy())[s])
        np.testing.assert_allclose(layer.weight.detach()[r].numpy()[s], expected, rtol=1e-8, atol=1e-10)
    # Without damping the refit equals the end refit's least squares.
    state, layer, x = _layer_state(7)
    expected = reconstruct_weights(state["fc"].w0, state["fc"].keep_mask, covariance, damping=0.0)
    Refitter({"fc": covariance}, damping=0.0, max_iters=200, rtol=1e-13).refit_rows(state, "fc", torch.arange(5))
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-8, atol=1e-10)


def test_refit_undo_restores_values_and_weights():
    state, layer, x = _layer_state(3)
    before = layer.weight.detach().clone()
    refitter = Refitter({"fc": x.T @ x / x.shape[0]}, damping=0.01)
    refits = refitter.refit_moves(state, {"fc": torch.tensor([0, 13, 14])})  # rows 0 and 1
    assert not torch.equal(layer.weight.detach()[:2], before[:2])
    assert torch.equal(layer.weight.detach()[2:], before[2:])
    Refitter.undo(state, refits)
    assert torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bcd_refit_rounds_lowers_the_loss_and_keeps_the_pattern(mlp_problem, make_config, pattern):
    model, calib, loss_fn = mlp_problem(n_samples=64, hidden=16, n_in=8)
    cfg = make_config(pruning={"density": 0.5, "pattern": pattern}, derivatives={"estimator": "fisher", "n_samples": 32},
                      blocks={"block_size": 8, "k": 4}, bcd={"max_steps": 16, "refit": "rounds", "check": "calibration"})
    result = icbs.prune(model, cfg, calib, loss_fn)
    assert result.report.final_loss < result.report.init_loss
    assert result.report.timings["refit_s"] > 0
    pattern_obj = MaskPattern.from_config(0.5, pattern)
    for name, mask in result.masks.items():
        weight = dict(model.named_modules())[name].weight.detach()
        assert torch.equal(weight != 0, mask)  # pruned weights are exactly zero, kept ones non-zero
        counts = pattern_obj.kept_per_group(mask)
        assert bool((counts == pattern_obj.group_target(tuple(mask.shape))).all())


def test_bcd_refit_rounds_beats_frozen_weights(mlp_problem, make_config):
    losses = {}
    for mode in ("none", "rounds"):
        model, calib, loss_fn = mlp_problem(n_samples=64, hidden=16, n_in=8)
        cfg = make_config(derivatives={"estimator": "fisher", "n_samples": 32}, blocks={"block_size": 8, "k": 4},
                          bcd={"max_steps": 16, "refit": mode})
        losses[mode] = icbs.prune(model, cfg, calib, loss_fn).report.final_loss
    assert losses["rounds"] < losses["none"]


def test_bcd_validation_check_never_raises_the_validation_loss(mlp_problem, make_config):
    from icbs.pool import SamplePool, calibration_loss

    model, calib, loss_fn = mlp_problem(seed=2, n_samples=64)
    validation = SamplePool(calib, torch.device("cpu"), 0, 8, n_validation=16).validation
    assert sum(b["x"].shape[0] for b in validation) == 16
    losses = []
    cfg = make_config(calibration={"n_validation": 16}, derivatives={"estimator": "fisher", "n_samples": 8},
                      bcd={"max_steps": 40, "check": "validation", "refit": "rounds"})
    result = icbs.prune(model, cfg, calib, loss_fn,
                        callbacks=[lambda r: losses.append(calibration_loss(model, validation, loss_fn, torch.device("cpu")))])
    assert result.report.accepted > 0
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))


def test_config_validation_check_needs_a_validation_split():
    from icbs.config import load_config
    from icbs.exceptions import ConfigError

    with pytest.raises(ConfigError, match="'calibration.n_validation'"):
        load_config(None, overrides=["bcd.check=validation"])
    with pytest.raises(ConfigError, match="'calibration.n_validation'"):
        load_config(None, overrides=["calibration.n_samples=8", "calibration.n_validation=8"])


@pytest.mark.parametrize("init", ["sparsegpt", "alps"])
def test_bcd_refitting_init_starts_from_its_refitted_weights(mlp_problem, make_config, init):
    """A refitting init hands the driver its mask and its re-fitted kept weights (the value-if-kept)."""
    losses = {}
    for method in ("magnitude", init):
        model, calib, loss_fn = mlp_problem(n_samples=64, hidden=16, n_in=8)
        dense = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = make_config(scoring={"init_method": method}, blocks={"block_size": 8, "k": 4}, bcd={"max_steps": 0})
        result = icbs.prune(model, cfg, calib, loss_fn)
        losses[method] = result.report.init_loss
        kept = result.masks["fc1"]
        moved = model.fc1.weight.detach()[kept] != dense["fc1.weight"][kept]
        assert bool(moved.any()) == (method == init)
    assert losses[init] < losses["magnitude"]


@pytest.mark.parametrize("init", ["alps", "wanda"])
def test_init_n_samples_runs_the_init_on_the_first_samples_only(mlp_problem, make_config, init):
    """``scoring.init_n_samples``: the init on a 64-sample pool equals the init on its first 16 samples alone."""
    results = {}
    for label, n_samples, init_n in (("part", 64, 16), ("alone", 16, 0), ("all", 64, 0)):
        model, calib, loss_fn = mlp_problem(n_samples=64, hidden=16, n_in=8, seed=3)
        cfg = make_config(scoring={"init_method": init, "init_n_samples": init_n}, blocks={"block_size": 8, "k": 4},
                          calibration={"n_samples": n_samples}, bcd={"max_steps": 0})
        icbs.prune(model, cfg, calib[: n_samples // 8], loss_fn)
        results[label] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, weight in results["alone"].items():
        assert torch.equal(results["part"][name], weight), name
    assert any(not torch.equal(results["all"][n], w) for n, w in results["alone"].items())


def test_init_n_samples_above_the_estimation_split_is_a_config_error():
    from icbs.config import load_config
    from icbs.exceptions import ConfigError

    with pytest.raises(ConfigError, match="'scoring.init_n_samples'.*48 estimation samples"):
        load_config(None, overrides=["calibration.n_samples=64", "calibration.n_validation=16",
                                     "scoring.init_n_samples=49"])
    cfg = load_config(None, overrides=["calibration.n_samples=64", "calibration.n_validation=16",
                                       "scoring.init_n_samples=48"])
    assert cfg.scoring.init_n_samples == 48
    with pytest.raises(ConfigError, match="'scoring.init_n_samples'"):
        load_config(None, overrides=["scoring.init_n_samples=-1"])


def test_init_n_samples_above_the_passed_calibration_raises_before_the_model_changes(mlp_problem, make_config,
                                                                                     snapshot, assert_unchanged):
    model, calib, loss_fn = mlp_problem(n_samples=32)
    saved = snapshot(model)
    cfg = make_config(scoring={"init_method": "alps", "init_n_samples": 40}, calibration={"n_samples": 64})
    with pytest.raises(ValueError, match="'scoring.init_n_samples' \\(40\\).*32 estimation samples"):
        icbs.prune(model, cfg, calib, loss_fn)
    assert_unchanged(model, saved)


def test_reported_losses_average_the_init_samples(mlp_problem, make_config):
    """With ``init_n_samples`` the report's init and final losses are over the init's samples, not the pool."""
    from icbs.pool import calibration_loss

    model, calib, loss_fn = mlp_problem(n_samples=64, seed=5)
    cfg = make_config(scoring={"init_n_samples": 16}, calibration={"n_samples": 64}, bcd={"max_steps": 4})
    result = icbs.prune(model, cfg, calib, loss_fn)
    assert result.report.final_loss == pytest.approx(calibration_loss(model, calib[:2], loss_fn, torch.device("cpu")),
                                                     rel=1e-12)
    assert result.report.final_loss != pytest.approx(calibration_loss(model, calib, loss_fn, torch.device("cpu")),
                                                     rel=1e-6)


def test_bcd_patience_stops_after_rounds_in_a_row_that_kept_nothing(mlp_problem, make_config):
    model, calib, loss_fn = mlp_problem(seed=2, n_samples=64)
    records = []
    cfg = make_config(calibration={"n_validation": 16}, derivatives={"estimator": "fisher", "n_samples": 8},
                      bcd={"max_steps": 5000, "check": "validation", "patience": 3})
    result = icbs.prune(model, cfg, calib, loss_fn, callbacks=[records.append])
    report = result.report
    assert report.stop_reason == "patience" and report.steps < 5000
    assert report.accepted > 0
    assert report.timings["check_s"] > 0  # the validation forwards are timed apart from the estimates
    assert [r.accepted for r in records[-3:]] == [False] * 3
    kept_runs = "".join("k" if r.accepted else "." for r in records)
    assert "..." not in kept_runs[:-3]  # it stopped at the first three stale rounds in a row


def _round_check_with_losses(before, after, z):
    """A validation RoundCheck whose per-sample losses are ``before`` and then ``after``."""
    from types import SimpleNamespace

    from icbs.round_check import RoundCheck

    pool = SimpleNamespace(validation=[{}], batches=[{}], device=torch.device("cpu"))
    check = RoundCheck("validation", None, None, pool, z=z)
    answers = iter([[torch.tensor(before, dtype=torch.float64)], [torch.tensor(after, dtype=torch.float64)]])
    check._losses = lambda batches: next(answers)
    check_on, mean_before = check.before(0, {}, math.nan)
    return check.passes(check_on, mean_before)


def test_round_check_z_asks_for_a_fall_beyond_the_noise():
    before = [1.0, 1.0, 1.0, 1.0]
    noisy = [0.9, 1.1, 0.95, 1.0]  # mean change -0.0125, standard error 0.0427
    clear = [0.9, 0.91, 0.89, 0.9]  # mean change -0.1, standard error 0.0041
    assert _round_check_with_losses(before, noisy, z=0.0)[0]
    # The boundary: the change passes exactly when z <= 0.0125 / 0.0427 = 0.293.
    error = float(torch.tensor(noisy, dtype=torch.float64).sub(1.0).std()) / 2
    assert _round_check_with_losses(before, noisy, z=0.99 * 0.0125 / error)[0]
    assert not _round_check_with_losses(before, noisy, z=1.01 * 0.0125 / error)[0]
    assert _round_check_with_losses(before, clear, z=1.645) == (True, pytest.approx(0.9))
    assert not _round_check_with_losses(before, [1.0, 1.0, 1.0, 1.01], z=0.0)[0]  # a rise fails at any z


def test_bcd_check_z_undoes_rounds_within_the_noise(mlp_problem, make_config):
    """A strict check_z undoes rounds that z = 0 keeps, the loss still falls; a huge z keeps nothing."""
    reports = {}
    for z in (0.0, 1.645, 1e9):
        model, calib, loss_fn = mlp_problem(seed=5, n_samples=64)
        cfg = make_config(calibration={"n_validation": 16}, derivatives={"estimator": "fisher", "n_samples": 8},
                          bcd={"max_steps": 5000, "check": "validation", "patience": 3, "check_z": z})
        reports[z] = icbs.prune(model, cfg, calib, loss_fn).report
    assert reports[1.645].undone_rounds > reports[0.0].undone_rounds
    assert reports[1.645].accepted < reports[0.0].accepted
    assert reports[1.645].final_loss < reports[1.645].init_loss
    assert reports[1e9].accepted == 0
    assert reports[1e9].final_loss == pytest.approx(reports[1e9].init_loss, rel=1e-12)
