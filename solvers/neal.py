"""Penalty-BQM samplers: dwave-neal (``neal``) and any dimod sampler (``dimod``).

Both solve the penalty form of :meth:`CardinalityQP.to_bqm`,
:math:`x^\\top Q x + c + P \\sum_G (\\sum_{i \\in G} x_i - k_G)^2`, which is what a quantum annealer or
a generic QUBO sampler sees. Samples may break the constraints, so every read is repaired greedily
to exact cardinality (:func:`solvers.local_search.repair`), the best repaired read is polished by
swap descent, and ``info`` reports the penalty weight and how many raw reads were infeasible.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import numpy as np

from solvers.base import Solver, check_positive_float, check_positive_int
from solvers.exceptions import SolverUnavailableError
from solvers.local_search import group_layout, repair, swap_descent
from solvers.problems import CardinalityQP

try:
    import neal
except ImportError:  # reported when a NealSolver is built, so only users of 'neal' need dwave-neal
    neal = None

__all__ = ["DimodSolver", "NealSolver", "PenaltySamplerSolver", "load_sampler"]

logger = logging.getLogger(__name__)


def load_sampler(path: str, init_params: dict[str, Any] | None = None) -> Any:
    """Import and instantiate a dimod sampler from a dotted path such as ``"dimod.ExactSolver"``.

    Raises:
        ValueError: ``path`` is not a dotted ``module.Class`` string or names no such class.
        SolverUnavailableError: the module cannot be imported.
    """
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"'sampler' should be a dotted import path like 'dimod.ExactSolver'; got {path!r}")
    module_name, class_name = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.split(".")[0].replace("dwave", "dwave-samplers")
        raise SolverUnavailableError(
            f"cannot import {module_name!r} for sampler {path!r}; install it (e.g. 'pip install {package}')"
        ) from exc
    if not hasattr(module, class_name):
        raise ValueError(f"'sampler' names {class_name!r}, which {module_name!r} does not define")
    return getattr(module, class_name)(**(init_params or {}))


class PenaltySamplerSolver(Solver):
    """Common path: penalty BQM -> dimod sampler -> repair every read -> polish the best.

    Subclasses provide :meth:`_make_sampler` (called once, at construction, so a missing backend fails
    before any problem is built) and :meth:`_sample_kwargs`.
    """

    properties = {"exact": False, "native_cardinality": False, "max_variables": None, "needs_block": False}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.sampler = self._make_sampler()

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_float("penalty", params["penalty"], allow_none=True)
        return params

    def _make_sampler(self) -> Any:
        raise NotImplementedError

    def _sample_kwargs(self, seed: int, initial_state: np.ndarray | None) -> dict[str, Any]:
        raise NotImplementedError

    def _solve(self, problem, initial_state, seed, time_limit_s):
        # Sample the rescaled problem (unit mean |Q|); energies are re-scored in original units.
        scale = float(np.mean(np.abs(problem.Q))) or 1.0
        scaled = CardinalityQP(problem.Q / scale, problem.constraints)
        penalty = self.params["penalty"]
        penalty = scaled.default_penalty() if penalty is None else penalty / scale
        bqm = scaled.to_bqm(penalty)
        sampleset = self.sampler.sample(bqm, **self._sample_kwargs(seed, initial_state))
        order = [list(sampleset.variables).index(i) for i in range(problem.n)]
        reads = np.asarray(sampleset.record.sample)[:, order].astype(np.int8)
        layout = group_layout(problem)
        best_x, best_energy, infeasible, flips = None, np.inf, 0, 0
        for read in reads:
            if not problem.is_feasible(read):
                infeasible += 1
            fixed, used = repair(problem, read)
            flips += used
            energy = problem.energy(fixed)
            if energy < best_energy:
                best_x, best_energy = fixed, energy
        polished, moves = swap_descent(problem, best_x, layout=layout)
        if time_limit_s is not None:
            logger.debug("solver '%s' does not enforce 'time_limit_s'", self.name)
        info = {
            "status": "FEASIBLE",
            "penalty": penalty * scale,
            "num_reads": int(reads.shape[0]),
            "infeasible_reads": infeasible,
            "infeasible_fraction": infeasible / max(1, reads.shape[0]),
            "repair_flips": flips,
            "polish_moves": moves,
        }
        return polished, info


class NealSolver(PenaltySamplerSolver):
    """dwave-neal's ``SimulatedAnnealingSampler`` on the penalty BQM, then repair and polish.

    Settings:
        num_reads: independent anneals.
        num_sweeps: sweeps per anneal.
        penalty: penalty weight ``P`` in problem units (``None``: :meth:`CardinalityQP.default_penalty`,
            which guarantees feasible minima but is large).
    """

    name = "neal"
    parameters = {"num_reads": 16, "num_sweeps": 1000, "penalty": None}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        check_positive_int("num_reads", params["num_reads"])
        check_positive_int("num_sweeps", params["num_sweeps"])
        return params

    def _make_sampler(self) -> Any:
        if neal is None:
            raise SolverUnavailableError("solver 'neal' needs dwave-neal; install it with 'pip install dwave-neal'")
        return neal.SimulatedAnnealingSampler()

    def _sample_kwargs(self, seed, initial_state):
        return {"num_reads": self.params["num_reads"], "num_sweeps": self.params["num_sweeps"], "seed": seed}


class DimodSolver(PenaltySamplerSolver):
    """Any dimod sampler, named by import path, on the penalty BQM; then repair and polish.

    Use it to plug in D-Wave hardware or hybrid samplers (``"dwave.system.LeapHybridSampler"``)
    where available.

    Settings:
        sampler: dotted import path of the sampler class.
        sampler_init: keyword arguments for the sampler's constructor.
        sample_params: keyword arguments for ``sample()``; ``seed`` is added when the sampler
            declares it in its ``parameters`` and it is not given here.
        penalty: as for ``neal``.

    Example:
        >>> import numpy as np
        >>> from solvers import CardinalityQP, get_solver
        >>> qp = CardinalityQP(np.diag([3.0, 1.0, 2.0]), [([0, 1, 2], 1)])
        >>> get_solver("dimod", sampler="dimod.ExactSolver").solve(qp).x.tolist()
        [0, 1, 0]
    """

    name = "dimod"
    parameters = {
        "sampler": "dwave.samplers.TabuSampler",
        "sampler_init": None,
        "sample_params": None,
        "penalty": None,
    }

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = super()._check_params(params)
        if not isinstance(params["sampler"], str) or "." not in params["sampler"]:
            raise ValueError(
                f"'sampler' should be a dotted import path like 'dimod.ExactSolver'; got {params['sampler']!r}"
            )
        for key in ("sampler_init", "sample_params"):
            if params[key] is not None and not isinstance(params[key], dict):
                raise ValueError(f"'{key}' should be a dict or None; got {params[key]!r}")
        return params

    def _make_sampler(self) -> Any:
        return load_sampler(self.params["sampler"], self.params["sampler_init"])

    def _sample_kwargs(self, seed, initial_state):
        kwargs = dict(self.params["sample_params"] or {})
        sampler_parameters = getattr(self.sampler, "parameters", {})
        if "seed" in sampler_parameters and "seed" not in kwargs:
            kwargs["seed"] = seed
        return kwargs
