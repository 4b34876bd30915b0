"""CardinalityQP: the §3 formula, conversions, files, and input validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from solvers import BlockData, CardinalityQP
from solvers.exact import enumerate_feasible


def _block_problem(seed: int, n: int = 8, constraints=None) -> CardinalityQP:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    H = A @ A.T
    w0 = rng.normal(size=n)
    d = -w0 * (rng.random(n) < 0.5)
    constraints = constraints if constraints is not None else [(range(n), n // 2)]
    return CardinalityQP.from_block(
        H, rng.normal(size=n), w0, d, constraints, alpha=float(rng.uniform(0.1, 2)),
        ridge=float(rng.uniform(0, 1)),
    )


@pytest.mark.parametrize("seed", range(10))
def test_problem_from_block_matches_quadratic_model(seed):
    problem = _block_problem(seed)
    block = problem.block
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        x = rng.integers(0, 2, size=problem.n)
        delta = -(block.d + block.w0 * x)
        direct = (
            block.alpha * block.g @ delta + 0.5 * delta @ block.H @ delta + block.ridge * delta @ delta
        )
        assert problem.energy(x) == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_problem_current_mask_has_zero_energy():
    rng = np.random.default_rng(0)
    n = 10
    A = rng.normal(size=(n, n))
    w0 = rng.normal(size=n)
    x_cur = (rng.random(n) < 0.5).astype(int)
    problem = CardinalityQP.from_block(A @ A.T, rng.normal(size=n), w0, -w0 * x_cur, None, ridge=0.3)
    assert problem.energy(x_cur) == pytest.approx(0.0, abs=1e-12)


def test_problem_energy_is_direct_quadratic_form():
    rng = np.random.default_rng(1)
    Q = rng.normal(size=(6, 6))
    problem = CardinalityQP(Q, None, offset=2.5)
    for x in itertools.product([0, 1], repeat=6):
        xv = np.array(x, dtype=float)
        assert problem.energy(x) == pytest.approx(xv @ Q @ xv + 2.5, rel=1e-12)


def test_problem_asymmetric_q_is_symmetrised():
    Q = np.array([[1.0, 4.0], [0.0, 2.0]])
    problem = CardinalityQP(Q)
    np.testing.assert_array_equal(problem.Q, [[1.0, 2.0], [2.0, 2.0]])
    assert not problem.Q.flags.writeable
    assert problem.energy([1, 1]) == 7.0


def test_problem_is_feasible_and_groups():
    problem = CardinalityQP(np.zeros((5, 5)), [([0, 1], 1), ([3, 4], 2)])
    assert problem.is_feasible([1, 0, 0, 1, 1]) and problem.is_feasible([0, 1, 1, 1, 1])
    assert not problem.is_feasible([1, 1, 0, 1, 1])
    assert problem.group_of.tolist() == [0, 0, -1, 1, 1]
    assert problem.ks.tolist() == [1, 2]


def _all_feasible(problem):
    return np.concatenate([X for X, _ in enumerate_feasible(problem)]).astype(np.int8)


@pytest.mark.parametrize("suffix", [".qp", ".txt", ".cqm"])
def test_problem_file_round_trip_preserves_energies(tmp_path, suffix):
    problem = _block_problem(3, n=9, constraints=[([0, 1, 2, 3], 2), ([4, 5, 6, 7], 2)])
    path = tmp_path / f"block{suffix}"
    problem.write(path)
    loaded = CardinalityQP.read(path)
    assert loaded.n == problem.n
    assert [g.tolist() for g in loaded.groups] == [g.tolist() for g in problem.groups]
    for x in _all_feasible(problem):
        assert loaded.energy(x) == pytest.approx(problem.energy(x), rel=1e-12, abs=1e-12)
    if suffix != ".cqm":
        np.testing.assert_array_equal(loaded.Q, problem.Q)
        np.testing.assert_array_equal(loaded.block.H, problem.block.H)
        assert loaded.block.alpha == problem.block.alpha


def test_problem_write_unknown_suffix_raises(tmp_path):
    with pytest.raises(ValueError, match="'path' should end in one of"):
        CardinalityQP(np.eye(2)).write(tmp_path / "p.json")


def test_problem_read_malformed_text_raises(tmp_path):
    path = tmp_path / "bad.qp"
    path.write_text("n 3 offset 0\ngroups 1\n")
    with pytest.raises(ValueError, match="not a CardinalityQP text file"):
        CardinalityQP.read(path)


def test_problem_bqm_round_trip_preserves_feasible_energies():
    problem = _block_problem(4, n=8, constraints=[(range(8), 3)])
    bqm = problem.to_bqm()
    back = CardinalityQP.from_bqm(bqm, problem.constraints)
    for x in _all_feasible(problem):
        sample = {i: int(v) for i, v in enumerate(x)}
        assert bqm.energy(sample) == pytest.approx(problem.energy(x), rel=1e-9, abs=1e-12)
        assert back.energy(x) == pytest.approx(problem.energy(x), rel=1e-9, abs=1e-12)


def test_problem_bqm_penalty_makes_minimum_feasible():
    rng = np.random.default_rng(9)
    problem = CardinalityQP(rng.normal(size=(8, 8)), [(range(8), 3)])
    bqm = problem.to_bqm()
    energies = {
        x: bqm.energy({i: v for i, v in enumerate(x)}) for x in itertools.product([0, 1], repeat=8)
    }
    best = min(energies, key=energies.get)
    assert problem.is_feasible(best)
    infeasible = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert bqm.energy(dict(enumerate(infeasible))) == pytest.approx(
        problem.energy(infeasible) + problem.default_penalty(), rel=1e-9
    )


def test_problem_cqm_has_native_constraints():
    problem = _block_problem(5, n=8, constraints=[([0, 1, 2, 3], 2), ([4, 5, 6, 7], 1)])
    cqm = problem.to_cqm()
    assert len(cqm.constraints) == 2
    for x in _all_feasible(problem):
        sample = {i: int(v) for i, v in enumerate(x)}
        assert cqm.check_feasible(sample)
        assert cqm.objective.energy(sample) == pytest.approx(problem.energy(x), rel=1e-9, abs=1e-12)
    assert not cqm.check_feasible({i: 0 for i in range(8)})
    back = CardinalityQP.from_cqm(cqm)
    assert back.ks.tolist() == [2, 1]


def test_problem_ising_matches_penalty_bqm():
    problem = _block_problem(6, n=7, constraints=[(range(5), 2)])
    h, J, offset = problem.to_ising()
    bqm = problem.to_bqm()
    for x in itertools.product([0, 1], repeat=7):
        s = 2 * np.array(x) - 1
        assert s @ J @ s + h @ s + offset == pytest.approx(bqm.energy(dict(enumerate(x))), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"Q": np.ones((2, 3))}, "'Q' should be a square matrix"),
        ({"Q": np.array([[1.0, np.nan], [0.0, 1.0]])}, "'Q' should contain only finite values"),
        ({"Q": np.array([[np.inf]])}, "'Q' should contain only finite values"),
        ({"Q": np.eye(5), "constraints": [(range(5), 7)]}, r"'k' for group 0 should be in \[0, 5\]; got 7"),
        ({"Q": np.eye(5), "constraints": [(range(5), -1)]}, r"'k' for group 0 should be in \[0, 5\]; got -1"),
        ({"Q": np.eye(5), "constraints": [([0, 1], 1), ([1, 2], 1)]}, "groups should be disjoint"),
        ({"Q": np.eye(5), "constraints": [([0, 5], 1)]}, r"'indices' of group 0 should be in \[0, 4\]; got 5"),
        ({"Q": np.eye(5), "constraints": [([-1], 1)]}, r"should be in \[0, 4\]; got -1"),
        ({"Q": np.eye(5), "constraints": [([0, 0], 1)]}, "should not repeat"),
        ({"Q": np.eye(5), "constraints": [([0, 1], 1.5)]}, "'k' for group 0 should be an int"),
        ({"Q": np.eye(2), "offset": float("nan")}, "'offset' should be finite"),
    ],
)
def test_problem_bad_input_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CardinalityQP(**kwargs)


def test_problem_bad_block_raises():
    with pytest.raises(ValueError, match="'g' should have shape"):
        BlockData(H=np.eye(3), g=np.zeros(2), w0=np.zeros(3), d=np.zeros(3))
    with pytest.raises(ValueError, match="'ridge' should be a non-negative float"):
        CardinalityQP.from_block(np.eye(2), np.zeros(2), np.ones(2), np.zeros(2), None, ridge=-1.0)


def test_problem_energy_rejects_bad_x():
    problem = CardinalityQP(np.eye(3))
    with pytest.raises(ValueError, match="'x' should have shape"):
        problem.energy([0, 1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        problem.energy([0, 2, 1])
