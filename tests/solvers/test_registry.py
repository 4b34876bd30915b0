"""Registry, construction from config, parameter validation, and the torch-free import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import solvers
from solvers import Solver, available_solvers, get_solver, register, solver_from_config

BUILTIN = ["auto", "anneal", "neal", "dimod", "cpsat", "exhaustive", "obs", "iobs", "swap-descent"]


def test_registry_lists_builtin_solvers():
    assert set(BUILTIN) <= set(available_solvers())


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown solver 'annealing'; valid names are \['anneal'"):
        get_solver("annealing")


def test_registry_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['num_restart'\].*'num_restarts'"):
        get_solver("anneal", num_restart=3)


def test_registry_from_config_both_layouts():
    inline = solver_from_config({"name": "anneal", "num_restarts": 8})
    nested = solver_from_config({"name": "anneal", "params": {"num_restarts": 8}})
    assert inline.params["num_restarts"] == nested.params["num_restarts"] == 8
    with pytest.raises(ValueError, match="'name' key"):
        solver_from_config({"num_restarts": 8})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("anneal", {"num_restarts": -4}, "'num_restarts' should be a positive int; got -4"),
        ("anneal", {"num_sweeps": 0}, "'num_sweeps' should be a positive int; got 0"),
        ("anneal", {"beta_range": (2.0, 1.0)}, "'beta_range' should be None or a pair"),
        ("anneal", {"warm_heats": []}, "'warm_heats' should be None or a non-empty list of positive numbers"),
        ("anneal", {"warm_heats": [1.0, -2.0]}, "'warm_heats' should be None or a non-empty list of positive numbers"),
        ("anneal", {"random_restarts": 5, "num_restarts": 4}, "'random_restarts' should be at most num_restarts=4"),
        ("anneal", {"population_steps": 0}, "'population_steps' should be a positive int; got 0"),
        ("anneal", {"focus_window": 0}, "'focus_window' should be None or a positive number; got 0"),
        ("anneal", {"patience": 1.5}, "'patience' should be None or a number in \\(0, 1\\]; got 1.5"),
        ("anneal", {"focus_window": "wide"}, "'focus_window' should be None or a positive number"),
        ("cpsat", {"time_limit_s": -1}, "'time_limit_s' should be a positive float or None; got -1"),
        ("exhaustive", {"max_variables": 0}, "'max_variables' should be a positive int; got 0"),
        ("iobs", {"variant": "best"}, "'variant' should be 'practical' or 'optimal'; got 'best'"),
        ("dimod", {"sampler": "TabuSampler"}, "'sampler' should be a dotted import path"),
        ("auto", {"max_coupling": -1}, "'max_coupling' should be a number >= 0 \\(or inf\\); got -1"),
        ("auto", {"anneal": 3}, "'anneal' should be a dict of anneal settings or None; got 3"),
        ("auto", {"anneal": {"num_sweeps": 0}}, "'num_sweeps' should be a positive int; got 0"),
    ],
)
def test_registry_bad_parameter_values_raise(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_solver(name, **params)


def test_registry_register_third_party_solver():
    @register
    class FirstK(Solver):
        name = "test-first-k"
        parameters = {}

        def _solve(self, problem, initial_state, seed, time_limit_s):
            x = np.zeros(problem.n, dtype=np.int8)
            for group, k in zip(problem.groups, problem.ks):
                x[group[:k]] = 1
            return x, {"status": "FEASIBLE"}

    assert "test-first-k" in available_solvers()
    problem = solvers.CardinalityQP(np.eye(4), [(range(4), 2)])
    assert get_solver("test-first-k").solve(problem).x.tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="already registered|reserved for a built-in"):
        register(type("Fake", (FirstK,), {"name": "anneal"}))
    solvers.registry._REGISTERED.pop("test-first-k")


def test_registry_exhaustive_refuses_large_problem():
    problem = solvers.CardinalityQP(np.eye(30), [(range(30), 3)])
    with pytest.raises(ValueError, match="refuses n=30"):
        get_solver("exhaustive").solve(problem)


def test_registry_obs_family_needs_block():
    problem = solvers.CardinalityQP(np.eye(6), [(range(6), 3)])
    for name in ("obs", "iobs"):
        with pytest.raises(ValueError, match="CardinalityQP.from_block"):
            get_solver(name).solve(problem)


def test_registry_solvers_context_manager():
    with get_solver("anneal") as solver:
        assert solver.name == "anneal"


def test_import_solvers_does_not_import_torch():
    code = (
        "import sys, solvers, numpy as np;"
        "qp = solvers.CardinalityQP(np.eye(4), [(range(4), 2)]);"
        "solvers.get_solver('exhaustive').solve(qp); qp.to_bqm();"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'icbs' not in sys.modules, 'icbs imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_unregister_removes_a_third_party_solver_but_not_a_builtin():
    import solvers

    class _Mine(solvers.get_solver_class("swap-descent")):
        name = "test-unregister-me"

    solvers.register(_Mine)
    assert "test-unregister-me" in solvers.available_solvers()
    solvers.unregister("test-unregister-me")
    assert "test-unregister-me" not in solvers.available_solvers()
    with pytest.raises(ValueError, match="no solver 'test-unregister-me' is registered"):
        solvers.unregister("test-unregister-me")
    with pytest.raises(ValueError, match="built in"):
        solvers.unregister("anneal")
