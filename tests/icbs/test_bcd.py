"""Tests for icbs.bcd: the BCD driver on tiny models (exact derivatives, exact block solvers)."""

import math

import pytest
import torch

import icbs
import icbs.bcd as bcd
import icbs.moves as moves
import icbs.pool as pool
import icbs.round_check as round_check
import icbs.selection as selection
from icbs.refit import reconstruct_weights
from icbs.schedule import layer_schedule, step_seed
from icbs.state import round_half_up


class _Watch:
    """Wraps select_block to see the state; checks tabu/fixed/density invariants at every step."""

    def __init__(self, monkeypatch, layers):
        self.layers = layers
        self.state = None
        self.fixed = None
        self.selected = []
        original = selection.select_block

        def wrapped(state, layer, scores, block_size, k, generator=None):
            self.state = state
            if self.fixed is None:
                self.fixed = {n: (state[n].fixed_pruned.clone(), state[n].fixed_kept.clone()) for n in state}
            tabu = set(state[layer].tabu)
            idx = original(state, layer, scores, block_size, k, generator)
            chosen = set(idx.tolist())
            assert not chosen & tabu, "a tabu weight was selected"
            assert bool(state[layer].free_mask().view(-1)[idx].all()), "a fixed weight was selected"
            self.selected.append((layer, idx))
            return idx

        monkeypatch.setattr(selection, "select_block", wrapped)

    def check_step(self, record):
        if record.event != "step":
            return
        for name, module in self.layers.items():
            weight = module.weight.detach()
            state = self.state[name]
            assert torch.equal(weight != 0, state.keep_mask), "model and mask disagree"
            assert int(state.keep_mask.sum()) == self.state.target_kept(name)
            fixed_pruned, fixed_kept = self.fixed[name]
            assert not bool(state.keep_mask[fixed_pruned].any()) and bool(state.keep_mask[fixed_kept].all())


def test_layer_schedule_spreads_by_log_size_and_is_seeded():
    sizes = {"small": 16, "big": 16**3}
    one = layer_schedule(sizes, 1, seed=3, epoch=0)
    assert one.count("small") == 1 and one.count("big") == 3
    assert layer_schedule(sizes, 2, seed=3, epoch=0).count("small") == 2
    assert one == layer_schedule(sizes, 1, seed=3, epoch=0)
    assert step_seed(0, 5) == step_seed(0, 5) != step_seed(0, 6)


@pytest.mark.parametrize("solver", ["exhaustive", "cpsat"])
def test_bcd_every_applied_step_improves_quadratic_model_and_keeps_invariants(
    monkeypatch, mlp_problem, make_config, solver
):
    if solver == "cpsat":
        pytest.importorskip("ortools")
    model, calib, loss_fn = mlp_problem()
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    watch = _Watch(monkeypatch, layers)
    cfg = make_config(
        scoring={"fix_frac_prune": 0.2, "fix_frac_keep": 0.2, "selection_method": "gradient"},
        blocks={"block_size": 10, "k": 5, "tabu_frac": 0.3},
        solver={"name": solver, "params": {"num_workers": 1} if solver == "cpsat" else {}},
        bcd={"max_steps": 16},
    )
    result = icbs.prune(model, cfg, calib, loss_fn, callbacks=[watch.check_step])
    history = result.history
    assert len(history) == result.report.steps > 0
    accepted = [h for h in history if h.accepted]
    assert accepted, "no move accepted on a problem where init is far from optimal"
    assert all(h.predicted_delta < 0 for h in accepted)
    # An exact solver answers with the block optimum: a step it rejected (not one the loss check
    # undid) means no improving move existed.
    assert all(h.predicted_delta >= -1e-12 for h in history if not (h.accepted or h.undone))
    assert all(h.status == "OPTIMAL" for h in history)
    assert result.report.final_loss <= result.report.init_loss
    for name, module in layers.items():
        assert int(result.masks[name].sum()) == round_half_up(0.5 * module.weight.numel())
        assert torch.equal(module.weight.detach() != 0, result.masks[name])


def test_bcd_predicted_delta_equals_true_loss_change_on_quadratic_loss(linear_problem, make_config):
    model, calib, loss_fn = linear_problem()
    cfg = make_config(blocks={"block_size": 8, "k": 4, "tabu_frac": 0.2}, derivatives={"n_samples": 24},
                      bcd={"max_steps": 8})
    result = icbs.prune(model, cfg, calib, loss_fn)
    losses = [h.batch_loss for h in result.history] + [result.report.final_loss]
    assert math.isclose(losses[0], result.report.init_loss, rel_tol=1e-9)
    n_checked = 0
    for i, h in enumerate(result.history):
        true_change = losses[i + 1] - losses[i]
        expected = h.predicted_delta if h.accepted else 0.0
        assert true_change == pytest.approx(expected, rel=1e-6, abs=1e-10)
        n_checked += h.accepted
    assert n_checked >= 1


@pytest.mark.parametrize("pattern", ["per_output", "2:4"])
def test_bcd_structured_patterns_keep_exact_counts(monkeypatch, transformer_problem, make_config, pattern):
    model, calib, loss_fn = transformer_problem()
    layers = icbs.find_prunable(model, include=["up_proj", "down_proj"])
    watch = _Watch(monkeypatch, layers)
    cfg = make_config(
        pruning={"density": 0.5, "pattern": pattern},
        scoring={"init_method": "wanda", "init_scope": "per_output", "selection_method": "wanda"},
        blocks={"block_size": 12, "k": 6, "tabu_frac": 0.2},
        derivatives={"estimator": "fisher", "n_samples": 8},
        bcd={"max_steps": 6},
    )
    result = icbs.prune(model, cfg, calib, loss_fn, layers=layers, callbacks=[watch.check_step])
    for name, mask in result.masks.items():
        if pattern == "per_output":
            assert mask.sum(dim=1).eq(mask.shape[1] // 2).all()
        else:
            assert mask.reshape(-1, 4).sum(dim=1).eq(2).all()
    assert all(h.block_size <= 12 for h in result.history)
    assert all(h.predicted_delta < 0 for h in result.history if h.accepted)


def test_bcd_blocks_per_round_undoes_rounds_that_raise_the_batch_loss(mlp_problem, make_config):
    model, calib, loss_fn = mlp_problem()
    # All 32 samples in every round: the batch loss at the start of each round must never rise.
    cfg = make_config(blocks={"block_size": 8, "k": 4, "tabu_frac": 0.2},
                      derivatives={"estimator": "fisher", "n_samples": 32},
                      bcd={"max_steps": 12, "blocks_per_round": 2})
    result = icbs.prune(model, cfg, calib, loss_fn)
    report, history = result.report, result.history
    rounds = [history[i : i + 2] for i in range(0, len(history), 2)]
    assert all(len({h.layer for h in r}) == len(r) for r in rounds)  # one block per layer per round
    undone = [r for r in rounds if any(h.undone for h in r)]
    assert report.undone_rounds == len(undone) >= 1
    assert all(not h.accepted for r in undone for h in r)
    losses = [r[0].batch_loss for r in rounds] + [report.final_loss]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert report.final_loss < report.init_loss
    assert report.accepted == sum(h.accepted for h in history)
    for mask in result.masks.values():
        assert int(mask.sum()) == round_half_up(0.5 * mask.numel())


def test_bcd_evaluate_callbacks_progress_and_report(mlp_problem, make_config):
    model, calib, loss_fn = mlp_problem()
    evaluations, events, ticks = [], [], []

    def evaluate(m):
        evaluations.append(1)
        with torch.no_grad():
            return {"loss": float(loss_fn(m, calib[0]).mean())}

    cfg = make_config(bcd={"max_steps": 4})
    result = icbs.prune(model, cfg, calib, loss_fn, evaluate=evaluate, eval_every_s=1e-9,
                        callbacks=[events.append], progress=lambda e, b, s: ticks.append((e, b, s)))
    assert len(evaluations) >= 2  # after init, periodically, at the end
    assert result.report.init_metrics["loss"] > 0
    assert [e.step for e in events if e.event == "step"] == [0, 1, 2, 3]
    assert any(e.event == "eval" and "loss" in e.metrics for e in events)
    assert [s for _, _, s in ticks] == [1, 2, 3, 4] and all(b is None for _, b, _ in ticks)
    report = result.report
    assert report.stop_reason == "max_steps" and report.steps == 4
    assert set(report.layers) == {"fc1", "fc2"}
    assert report.layers["fc1"].density == 0.5
    assert sum(v.steps for v in report.layers.values()) == 4
    assert report.solver.calls + sum(h.status == "SKIPPED" for h in result.history) == 4


def test_bcd_time_budget_stops_the_run_and_caps_the_solver(monkeypatch, transformer_problem, make_config):
    import time

    model, calib, loss_fn = transformer_problem()
    limits = []
    original = moves.solve_jobs

    def spy(solver, jobs, seed, time_limit_s, executor):
        limits.append(time_limit_s)
        return original(solver, jobs, seed, time_limit_s, executor)

    monkeypatch.setattr(bcd, "solve_jobs", spy)
    cfg = make_config(derivatives={"estimator": "fisher"},
                      bcd={"max_steps": None, "time_budget": 3.0, "max_epochs": 100})
    result = icbs.prune(model, cfg, calib, loss_fn, callbacks=[lambda record: time.sleep(1.0)])
    # One pass has 6+ steps, so only the budget can stop the run before a pass ends.
    assert result.report.stop_reason == "time_budget"
    assert 1 <= result.report.steps < 6
    assert 3.0 <= result.report.elapsed_s < 3.0 + 1.0 + 5.0  # the budget, one sleep, one slow round
    assert limits and all(limit <= 3.0 for limit in limits)


def test_reconstruct_weights_solves_masked_least_squares():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=gen) > 0.5
    out = reconstruct_weights(w0, mask, x.T @ x / 50, damping=0.0)
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    for r in range(3):
        cols = mask[r]
        expected = torch.linalg.lstsq(x[:, cols], x @ w0[r]).solution
        assert torch.allclose(out[r, cols], expected, atol=1e-8)


def test_bcd_reconstruct_lowers_layerwise_error(mlp_problem, make_config):
    model, calib, loss_fn = mlp_problem()
    cfg = make_config(derivatives={"estimator": "layerwise"}, bcd={"max_steps": 4, "refit": "end",
                                                                   "refit_damping": 0.01})
    dense = model.fc2.weight.detach().clone()
    result = icbs.prune(model, cfg, calib, loss_fn)
    w = model.fc2.weight.detach()
    mask = result.masks["fc2"]
    assert torch.equal(w != 0, mask)
    assert not torch.equal(w[mask], dense[mask])  # kept weights got new values
    assert result.report.final_loss < result.report.init_loss


def test_bcd_sparsegpt_init_takes_baseline_masks_and_updated_values(mlp_problem, make_config):
    from icbs.baselines import run_baseline

    reference, calib, loss_fn = mlp_problem()
    layers = {"fc1": reference.fc1, "fc2": reference.fc2}
    expected = run_baseline("sparsegpt", reference, layers, calib, loss_fn, density=0.5, seed=0)
    model, calib, loss_fn = mlp_problem()
    dense = {n: getattr(model, n).weight.detach().clone() for n in layers}
    cfg = make_config(scoring={"init_method": "sparsegpt"}, bcd={"max_steps": 0})
    result = icbs.prune(model, cfg, calib, loss_fn)
    assert result.report.steps == 0
    for name in layers:
        assert torch.equal(result.masks[name], expected[name].cpu())
        # The init is SparseGPT's whole result: its mask and its OBS-updated kept weights.
        assert torch.allclose(getattr(model, name).weight.detach(), getattr(reference, name).weight.detach(), atol=1e-6)
        assert not torch.equal(getattr(model, name).weight.detach(), dense[name] * result.masks[name])


def test_bcd_steps_after_sparsegpt_init_keep_its_values(mlp_problem, make_config):
    """Moves on top of SparseGPT swap kept/pruned with the updated values; never lose them."""
    model, calib, loss_fn = mlp_problem()
    cfg = make_config(scoring={"init_method": "sparsegpt"}, bcd={"max_steps": 12})
    result = icbs.prune(model, cfg, calib, loss_fn)
    assert result.report.steps >= 2
    assert result.report.final_loss <= result.report.init_loss + 1e-9
    for name in ("fc1", "fc2"):
        weight = getattr(model, name).weight.detach()
        kept = result.masks[name]
        assert int(kept.sum()) == round(0.5 * kept.numel())
        assert torch.all(weight[~kept] == 0)


def test_bcd_gradient_selection_in_the_estimating_pass_matches_a_separate_pass(mlp_problem, make_config, monkeypatch):
    """Selecting blocks from the fisher pass's own gradient changes the cost, not the run."""
    cfg = make_config(
        scoring={"selection_method": "gradient"}, derivatives={"estimator": "fisher", "n_samples": 16},
        bcd={"max_steps": 16, "blocks_per_round": 2},
    )
    model_a, calib, loss_fn = mlp_problem()
    passes = {"estimate": 0, "gradients": 0}
    original_collect = selection.collect_gradients

    def counting_collect(*args, **kwargs):
        passes["gradients"] += 1
        return original_collect(*args, **kwargs)

    monkeypatch.setattr(selection, "collect_gradients", counting_collect)
    one_pass = icbs.prune(model_a, cfg, calib, loss_fn)
    assert passes["gradients"] == 0, "in-pass selection must not run a separate gradient pass"
    monkeypatch.setattr(selection.BlockChooser, "_select_in_pass", lambda self, names: False)
    model_b, calib, loss_fn = mlp_problem()
    two_pass = icbs.prune(model_b, cfg, calib, loss_fn)
    assert passes["gradients"] > 0
    for name, mask in one_pass.masks.items():
        assert torch.equal(mask, two_pass.masks[name])
    deltas_a = [r.predicted_delta for r in one_pass.history]
    deltas_b = [r.predicted_delta for r in two_pass.history]
    assert deltas_a == pytest.approx(deltas_b, rel=1e-9, abs=1e-12)


def test_bcd_single_block_moves_that_raise_the_true_loss_are_undone(mlp_problem, make_config):
    """The quadratic model is local: a move it likes but the batch loss does not is taken back."""
    model, calib, loss_fn = mlp_problem()  # 32 samples: the step batch below is all of them
    cfg = make_config(
        derivatives={"estimator": "gradient_mean", "n_samples": 32},
        bcd={"max_steps": 24, "blocks_per_round": 1, "min_steps_per_layer": 12},
    )
    result = icbs.prune(model, cfg, calib, loss_fn)
    undone = [r for r in result.history if r.undone]
    assert undone, "a rank-one model on this MLP should propose moves the true loss rejects"
    assert all(r.predicted_delta < 0 for r in undone)
    # Every kept move lowered the loss on the whole calibration set, so the run never ends worse.
    assert result.report.final_loss <= result.report.init_loss + 1e-12


def _calibration_losses_per_step(mlp_problem, make_config, check, seed):
    """Run 60 fisher steps fitted on 8-sample batches of 64; the calibration loss after every step."""
    model, calib, loss_fn = mlp_problem(seed=seed, n_samples=64)
    losses = []

    def record_loss(record):
        losses.append(pool.calibration_loss(model, calib, loss_fn, torch.device("cpu")))

    cfg = make_config(derivatives={"estimator": "fisher", "n_samples": 8}, bcd={"max_steps": 60, "check": check})
    result = icbs.prune(model, cfg, calib, loss_fn, callbacks=[record_loss])
    return [result.report.init_loss] + losses, result


def test_bcd_check_on_the_fitting_batch_lets_the_calibration_loss_rise(mlp_problem, make_config):
    # The old check: moves fitted on a small batch and checked on it drift (seed 1 ends higher than it began).
    losses, result = _calibration_losses_per_step(mlp_problem, make_config, "batch", seed=1)
    assert any(b > a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert result.report.final_loss > result.report.init_loss


@pytest.mark.parametrize("seed", [1, 2])
def test_bcd_check_on_calibration_never_raises_the_calibration_loss(mlp_problem, make_config, seed):
    losses, result = _calibration_losses_per_step(mlp_problem, make_config, "calibration", seed=seed)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert result.report.final_loss == pytest.approx(losses[-1], rel=1e-12)
    if seed == 2:
        assert result.report.final_loss < 0.8 * result.report.init_loss
        assert result.report.undone_rounds >= 1


def test_bcd_fresh_check_batch_is_apart_from_the_fitting_batch(mlp_problem, make_config, monkeypatch):
    seen = []
    original = round_check.RoundCheck.before

    def spy(self, first_step, batch, batch_loss):
        check_on, before = original(self, first_step, batch, batch_loss)
        seen.append((batch["x"], check_on))
        return check_on, before

    monkeypatch.setattr(round_check.RoundCheck, "before", spy)
    model, calib, loss_fn = mlp_problem(n_samples=64)
    cfg = make_config(derivatives={"estimator": "fisher", "n_samples": 8}, bcd={"max_steps": 10, "check": "fresh"})
    icbs.prune(model, cfg, calib, loss_fn)
    assert len(seen) >= 3  # rounds with an estimate are checked
    for fitted, check_on in seen:
        assert len(check_on) == 1 and check_on[0]["x"].shape == fitted.shape
        # No calibration row is in both (rows are distinct random vectors).
        assert not (check_on[0]["x"][:, None, :] == fitted[None, :, :]).all(-1).any()
