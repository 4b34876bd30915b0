"""The solver contract (contract.py) applied to every registered solver."""

from __future__ import annotations

import numpy as np
import pytest

from solvers import CardinalityQP, available_solvers, get_solver, get_solver_class
from tests.solvers.contract import assert_valid_solution, contract_problem, make_solver

SOLVERS = available_solvers()


@pytest.fixture(params=SOLVERS)
def name(request) -> str:
    return request.param


def test_contract_empty_problem(name):
    problem = CardinalityQP(np.zeros((0, 0)), None, offset=1.5)
    solution = make_solver(name).solve(problem, seed=0)
    assert solution.x.shape == (0,)
    assert solution.energy == 1.5


@pytest.mark.parametrize("k", [0, 6])
def test_contract_k_zero_and_k_n(name, k):
    problem = contract_problem(name, 6, [(range(6), k)])
    solution = make_solver(name).solve(problem, seed=0)
    assert_valid_solution(problem, solution)
    assert int(solution.x.sum()) == k


def test_contract_one_variable(name):
    free = contract_problem(name, 1, None)
    assert_valid_solution(free, make_solver(name).solve(free, seed=0))
    fixed = contract_problem(name, 1, [([0], 1)])
    assert make_solver(name).solve(fixed, seed=0).x.tolist() == [1]


@pytest.mark.parametrize("structure", ["single", "2:4", "mixed"])
def test_contract_feasible_energy_and_not_below_optimum(name, structure):
    constraints = {
        "single": [(range(10), 4)],
        "2:4": [(range(i, i + 4), 2) for i in (0, 4, 8)],
        "mixed": [([0, 2, 4, 6, 8], 2), ([1, 3, 5], 1)],  # 9, 10, 11 free
    }[structure]
    n = 12 if structure != "single" else 10
    problem = contract_problem(name, n, constraints, seed=3)
    solution = make_solver(name).solve(problem, seed=1)
    assert_valid_solution(problem, solution)
    optimum = get_solver("exhaustive").solve(problem).energy
    assert solution.energy >= optimum - 1e-9 * max(1.0, abs(optimum))
    if get_solver_class(name).properties["exact"]:
        assert solution.energy == pytest.approx(optimum, rel=1e-9, abs=1e-12)
        assert solution.info["status"] == "OPTIMAL"


def test_contract_same_seed_same_result(name):
    problem = contract_problem(name, 12, [(range(12), 5)], seed=7)
    first = make_solver(name).solve(problem, seed=11)
    second = make_solver(name).solve(problem, seed=11)
    np.testing.assert_array_equal(first.x, second.x)
    assert first.energy == second.energy


def test_contract_unknown_parameter_raises(name):
    with pytest.raises(ValueError, match="valid parameters are"):
        get_solver(name, definitely_not_a_setting=1)


def test_contract_never_worse_than_initial_state(name):
    problem = contract_problem(name, 12, [(range(12), 6)], seed=5)
    best = get_solver("exhaustive").solve(problem)
    solution = make_solver(name).solve(problem, initial_state=best.x, seed=0)
    assert_valid_solution(problem, solution)
    assert solution.energy <= best.energy + 1e-12 * max(1.0, abs(best.energy))


def test_contract_rejects_infeasible_initial_state(name):
    problem = contract_problem(name, 6, [(range(6), 3)])
    with pytest.raises(ValueError, match="initial_state"):
        make_solver(name).solve(problem, initial_state=np.zeros(6, dtype=np.int8))


def test_contract_does_not_mutate_problem(name):
    problem = contract_problem(name, 8, [(range(8), 3)], seed=2)
    before = problem.Q.copy()
    make_solver(name).solve(problem, seed=0)
    np.testing.assert_array_equal(problem.Q, before)
