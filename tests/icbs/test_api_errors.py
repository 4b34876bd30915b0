"""Bad input to icbs.prune raises a clear error naming the setting, and the model keeps its weights."""

import math

import numpy as np
import pytest

import icbs
import solvers
from icbs.config import BlocksConfig, PruningConfig
from icbs.exceptions import ConfigError, InfeasibleSolutionError, NonFiniteDerivativeError


class _BrokenAnswerSolver(solvers.Solver):
    """Returns an answer that prunes one weight too many (bypassing the base-class checks)."""

    name = "test-broken-answer"
    parameters = {}

    def solve(self, problem, *, initial_state=None, seed=None, time_limit_s=None):
        x = np.asarray(initial_state, dtype=np.int8).copy()
        x[np.flatnonzero(x == 0)[0]] = 1
        return solvers.Solution(x=x, energy=-1.0, feasible=True, info={"status": "FEASIBLE"})

    def _solve(self, problem, initial_state, seed, time_limit_s):  # pragma: no cover - solve is overridden
        raise NotImplementedError


class _InfeasibleSolver(solvers.Solver):
    """An inner solver whose answer the base class rejects (all zeros)."""

    name = "test-infeasible"
    parameters = {}

    def _solve(self, problem, initial_state, seed, time_limit_s):
        return np.zeros(problem.n, dtype=np.int8), {"status": "FEASIBLE"}


@pytest.fixture(scope="module", autouse=True)
def _broken_solvers():
    """Register the broken solvers for this module only: the solver contract suite must not see them."""
    for cls in (_BrokenAnswerSolver, _InfeasibleSolver):
        solvers.register(cls)
    yield
    for cls in (_BrokenAnswerSolver, _InfeasibleSolver):
        solvers.unregister(cls.name)


def _expect(mlp_problem, snapshot, assert_unchanged, cfg, error, match, **kwargs):
    model, calib, loss_fn = mlp_problem()
    saved = snapshot(model)
    with pytest.raises(error, match=match):
        icbs.prune(model, cfg, calib, kwargs.pop("loss_fn", loss_fn), **kwargs)
    assert_unchanged(model, saved)


@pytest.mark.parametrize("density", [0.0, 1.0, 1.5, -0.2])
def test_density_outside_open_interval(mlp_problem, make_config, snapshot, assert_unchanged, density):
    with pytest.raises(ConfigError, match="'pruning.density' should be in \\(0, 1\\)"):
        make_config(pruning={"density": density})
    cfg = make_config().replace(pruning=PruningConfig(density=density))  # unvalidated: prune validates
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, ConfigError, "'pruning.density'")


def test_k_larger_than_block_size(mlp_problem, make_config, snapshot, assert_unchanged):
    with pytest.raises(ConfigError, match="'blocks.k' should be <= blocks.block_size"):
        make_config(blocks={"block_size": 8, "k": 9})
    cfg = make_config().replace(blocks=BlocksConfig(block_size=8, k=9))
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, ConfigError, "'blocks.k'")


def test_block_size_larger_than_free_weights(mlp_problem, make_config, snapshot, assert_unchanged):
    # fc2 has 24 weights; with 25% of each side fixed only 18 stay free.
    cfg = make_config(scoring={"fix_frac_prune": 0.25, "fix_frac_keep": 0.25}, blocks={"block_size": 20, "k": 10},
                      solver={"name": "anneal"})
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, ValueError,
            "'blocks.block_size' \\(20\\) is larger than the 18 free weights of layer 'fc2'")


def test_block_size_above_the_solver_limit(mlp_problem, make_config, snapshot, assert_unchanged):
    cfg = make_config(blocks={"block_size": 30, "k": 10})
    model, calib, loss_fn = mlp_problem(n_in=16, hidden=16)
    saved = snapshot(model)
    with pytest.raises(ValueError, match="'blocks.block_size' \\(30\\) exceeds the 24 variables solver 'exhaustive'"):
        icbs.prune(model, cfg, calib, loss_fn)
    assert_unchanged(model, saved)


def test_unknown_layer_patterns(mlp_problem, make_config, snapshot, assert_unchanged):
    cfg = make_config(model={"builtin": "x", "include": ["attention\\.nowhere"]})
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, ValueError, "'model.include' pattern 'attention")
    with pytest.raises(ConfigError, match="'pruning.pattern'"):
        make_config(pruning={"pattern": "3of4"})


def test_non_prunable_layer(transformer_problem, make_config, snapshot, assert_unchanged):
    model, calib, loss_fn = transformer_problem()
    saved = snapshot(model)
    with pytest.raises(TypeError, match="layer 'embed' is not prunable"):
        icbs.prune(model, make_config(), calib, loss_fn, layers={"embed": model.embed, "up": model.up_proj})
    assert_unchanged(model, saved)


@pytest.mark.parametrize("estimator", ["exact", "fisher"])
def test_non_finite_derivatives(mlp_problem, make_config, snapshot, assert_unchanged, estimator):
    def nan_loss(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1) * math.nan

    cfg = make_config(derivatives={"estimator": estimator})
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, NonFiniteDerivativeError, "fc[12]", loss_fn=nan_loss)


def test_solver_answer_breaking_a_constraint(mlp_problem, make_config, snapshot, assert_unchanged):
    cfg = make_config(solver={"name": "test-broken-answer"})
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, InfeasibleSolutionError,
            "solver 'test-broken-answer' broke a cardinality constraint in layer")
    cfg = make_config(solver={"name": "test-infeasible"})
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, InfeasibleSolutionError, "test-infeasible")


def test_error_raised_mid_run_restores_dense_weights(mlp_problem, make_config, snapshot, assert_unchanged):
    def explode(record):
        if record.step == 3:
            raise RuntimeError("callback failed")

    model, calib, loss_fn = mlp_problem()
    saved = snapshot(model)
    with pytest.raises(RuntimeError, match="callback failed"):
        icbs.prune(model, make_config(), calib, loss_fn, callbacks=[explode])
    assert_unchanged(model, saved)


def test_bad_arguments(mlp_problem, make_config, snapshot, assert_unchanged):
    cfg = make_config()
    _expect(mlp_problem, snapshot, assert_unchanged, {"pruning": {}}, TypeError, "'config' should be an IcbsConfig")
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, ValueError, "'resume' needs 'checkpoint_path'", resume=True)
    _expect(mlp_problem, snapshot, assert_unchanged, cfg, ValueError, "'eval_every_s'", eval_every_s=-1)
    model, _, loss_fn = mlp_problem()
    with pytest.raises(ValueError, match="'calibration'"):
        icbs.prune(model, cfg, [], loss_fn)
