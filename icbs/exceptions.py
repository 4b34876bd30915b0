"""Project exceptions for the torch side of icbs.

Bad user input raises ``ValueError``/``TypeError`` subclasses so that callers who only know the
standard library still catch it; failures of the method itself (a non-finite Hessian, a solver that
broke a constraint) raise :class:`PruningError` subclasses.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "PruningError",
    "NonFiniteDerivativeError",
    "InfeasibleSolutionError",
    "StatisticsError",
    "OutputExistsError",
]


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range.

    The message names the dotted key (``blocks.block_size``), what was expected and what was given.
    """


class PruningError(RuntimeError):
    """The pruning run could not continue; the model is restored to its dense weights first."""


class NonFiniteDerivativeError(PruningError):
    """A gradient or Hessian estimate holds NaN or Inf values."""


class StatisticsError(PruningError, ValueError):
    """A layer's input second moment X X^T is non-finite, or singular under the configured damping.

    Also a ``ValueError``: the remedy is a setting (the message names the damping key, or ``model.dtype``),
    so the CLI reports it as bad input (exit code 2).
    """


class InfeasibleSolutionError(PruningError):
    """A block solver returned an assignment that breaks a cardinality constraint."""


class OutputExistsError(FileExistsError):
    """The output folder exists and ``--overwrite`` was not given."""
