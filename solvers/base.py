"""The solver plugin interface: :class:`Solver` (an ABC in the spirit of dimod's Sampler) and
:class:`Solution` (the answer, like dimod's ``SampleSet.first`` plus ``info``).

A subclass sets ``name``, ``parameters`` (accepted settings and their defaults) and
``properties``, and implements :meth:`Solver._solve`; the public :meth:`Solver.solve` does the
shared work around it: checking the problem and the warm start, the trivial cases, timing,
re-scoring the answer with the problem's own energy, and never returning something worse than the
warm start. A minimal subclass::

    class AllZero(Solver):
        '''Set every free variable to 0 and take the first k of every group.'''
        name = "all-zero"
        parameters = {}

        def _solve(self, problem, initial_state, seed, time_limit_s):
            x = np.zeros(problem.n, dtype=np.int8)
            for group, k in zip(problem.groups, problem.ks):
                x[group[:k]] = 1
            return x, {"status": "FEASIBLE"}

Register it with :func:`solvers.register` to build it by name.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from solvers.exceptions import InfeasibleProblemError
from solvers.problems import CardinalityQP

__all__ = ["Solution", "Solver", "feasible_start", "check_positive_int", "check_positive_float", "is_positive_number"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Solution:
    """The answer of a solver.

    Attributes:
        x: (n,) int8 array of 0/1 values (1 = selected, i.e. pruned on the icbs side).
        energy: ``problem.energy(x)`` in the problem's units, offset included.
        feasible: whether every cardinality constraint holds.
        info: solver-specific details; always ``'solver'``, ``'wall_time_s'`` and ``'status'``
            (``'OPTIMAL'`` when proven optimal, else ``'FEASIBLE'``), plus ``'bound'`` (a lower
            bound on the energy) where known and ``'used_initial_state'``.
    """

    x: np.ndarray
    energy: float
    feasible: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Return ``value`` as an int or raise ``ValueError`` naming ``name``."""
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"'{name}' should be a {kind} int; got {value!r}")
    return int(value)


def is_positive_number(value: Any) -> bool:
    """Whether ``value`` is a finite positive int or float (numpy scalars included, bools not)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and value > 0
    )


def check_positive_float(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float (or ``None`` when allowed) or raise ``ValueError``."""
    if value is None and allow_none:
        return None
    if not is_positive_number(value):
        suffix = " or None" if allow_none else ""
        raise ValueError(f"'{name}' should be a positive float{suffix}; got {value!r}")
    return float(value)


def feasible_start(problem: CardinalityQP, rng: np.random.Generator) -> np.ndarray:
    """Return a random feasible (n,) int8 vector: k_G random ones per group, free variables random."""
    x = (rng.random(problem.n) < 0.5).astype(np.int8)
    for group, k in zip(problem.groups, problem.ks):
        x[group] = 0
        if k:
            x[rng.choice(group, size=int(k), replace=False)] = 1
    return x


class Solver(abc.ABC):
    """Base class of every block solver.

    Constructor keyword arguments are settings: each must be a key of ``parameters`` (an unknown
    one raises ``ValueError`` listing the valid ones); missing ones take the default there.

    Attributes:
        name: registry name.
        parameters: accepted settings and their defaults.
        properties: capabilities: ``exact`` (proves optimality), ``native_cardinality`` (keeps the
            constraints without a penalty), ``max_variables`` (``None`` for no limit),
            ``needs_block`` (needs :attr:`CardinalityQP.block`).
        params: the settings of this instance (defaults filled in), read-only.
    """

    name: ClassVar[str] = ""
    parameters: ClassVar[Mapping[str, Any]] = {}
    properties: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"exact": False, "native_cardinality": True, "max_variables": None, "needs_block": False}
    )

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for solver '{self.name}'; "
                f"valid parameters are {sorted(self.parameters)}"
            )
        merged = {**self.parameters, **params}
        merged = self._check_params(merged)
        self.params: Mapping[str, Any] = MappingProxyType(merged)

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate settings; return them (possibly normalised). Override to add checks."""
        if "time_limit_s" in params:
            params["time_limit_s"] = check_positive_float(
                "time_limit_s", params["time_limit_s"], allow_none=True
            )
        return params

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({settings})"

    # ------------------------------------------------------------------ public
    def solve(
        self,
        problem: CardinalityQP,
        *,
        initial_state: np.ndarray | None = None,
        seed: int | None = None,
        time_limit_s: float | None = None,
    ) -> Solution:
        """Solve ``problem`` and return a feasible answer.

        Args:
            problem: the problem; never modified.
            initial_state: optional feasible (n,) 0/1 warm start (hint); the answer is never worse.
            seed: random seed; the same seed and inputs give the same answer.
            time_limit_s: per-call wall-time cap; the smaller of it and the ``time_limit_s``
                setting (if the solver has one) applies.

        Returns:
            A :class:`Solution` with ``feasible=True``.

        Raises:
            TypeError: ``problem`` is not a :class:`CardinalityQP`.
            ValueError: ``initial_state`` has the wrong shape, is not 0/1 or is infeasible.
            InfeasibleProblemError: the solver found no feasible assignment.
        """
        if not isinstance(problem, CardinalityQP):
            raise TypeError(f"'problem' should be a CardinalityQP; got {type(problem).__name__}")
        start = time.perf_counter()
        limit = check_positive_float("time_limit_s", time_limit_s, allow_none=True)
        setting = self.params.get("time_limit_s")
        if setting is not None:
            limit = setting if limit is None else min(limit, setting)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"'seed' should be an int or None; got {seed!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        seed = int(seed) % (2**31 - 1)
        x0: np.ndarray | None = None
        if initial_state is not None:
            x0 = np.asarray(initial_state)
            if x0.shape != (problem.n,):
                raise ValueError(f"'initial_state' should have shape ({problem.n},); got {x0.shape}")
            if x0.size and not np.all((x0 == 0) | (x0 == 1)):
                raise ValueError("'initial_state' should contain only 0 and 1")
            x0 = x0.astype(np.int8)
            if not problem.is_feasible(x0):
                raise ValueError(
                    f"'initial_state' should satisfy every constraint; violations "
                    f"{problem.violations(x0).tolist()}"
                )
        if self._is_trivial(problem):
            x = self._trivial_answer(problem)
            info: dict[str, Any] = {"status": "OPTIMAL", "bound": problem.energy(x)}
        else:
            raw_x, info = self._solve(problem, x0, seed, limit)
            x = np.asarray(raw_x).astype(np.int8)
        if x.shape != (problem.n,) or not problem.is_feasible(x):
            raise InfeasibleProblemError(
                f"solver '{self.name}' returned an assignment that violates the constraints"
            )
        energy = problem.energy(x)
        info = dict(info)
        info["used_initial_state"] = False
        if x0 is not None:
            start_energy = problem.energy(x0)
            if start_energy < energy:
                x, energy = x0, start_energy
                info["used_initial_state"] = True
                if info.get("status") == "OPTIMAL":
                    info["status"] = "FEASIBLE"
        info.setdefault("status", "FEASIBLE")
        info["solver"] = self.name
        info["seed"] = seed
        info["wall_time_s"] = time.perf_counter() - start
        return Solution(x=x.copy(), energy=float(energy), feasible=True, info=info)

    def close(self) -> None:
        """Release resources held by the solver (worker pools); a no-op by default."""

    def __enter__(self) -> Solver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ for subclasses
    @staticmethod
    def _is_trivial(problem: CardinalityQP) -> bool:
        """True when no variable can move: every variable is in a group with k in {0, |G|}."""
        if np.any(problem.group_of < 0):
            return False
        return all(k in (0, group.size) for group, k in zip(problem.groups, problem.ks))

    @staticmethod
    def _trivial_answer(problem: CardinalityQP) -> np.ndarray:
        x = np.zeros(problem.n, dtype=np.int8)
        for group, k in zip(problem.groups, problem.ks):
            if k == group.size:
                x[group] = 1
        return x

    @abc.abstractmethod
    def _solve(
        self,
        problem: CardinalityQP,
        initial_state: np.ndarray | None,
        seed: int,
        time_limit_s: float | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Return ``(x, info)`` for a non-trivial problem.

        Args:
            problem: the problem (n >= 1, at least one variable can change).
            initial_state: checked feasible int8 warm start, or ``None``.
            seed: int seed in ``[0, 2**31 - 1)``.
            time_limit_s: effective wall-time limit or ``None``.

        Returns:
            A feasible 0/1 vector and an info dict (at least ``'status'``).
        """
