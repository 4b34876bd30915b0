"""Exceptions raised by the :mod:`solvers` package.

Bad input (wrong shapes, out-of-range values, unknown names) raises the builtin
``ValueError``/``TypeError``; the classes here are for domain failures: a solver
that cannot produce a feasible answer, or an optional backend that is not installed.
"""

from __future__ import annotations

__all__ = ["InfeasibleProblemError", "SolverUnavailableError"]


class InfeasibleProblemError(RuntimeError):
    """A solver could not produce an assignment that satisfies every constraint."""


class SolverUnavailableError(ImportError):
    """An optional backend needed by the requested solver is not installed.

    The message names the package (pip extra) that provides it.
    """
