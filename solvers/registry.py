"""Name -> solver class table, :func:`get_solver`, :func:`solver_from_config` and :func:`register`.

The built-in table is an explicit dict of ``name -> "module:Class"``; modules are imported when a
solver is first requested, so ``import solvers`` stays light and an optional backend that is not
installed only matters when its solver is asked for. Third-party solvers join with
:func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from solvers.base import Solver

__all__ = ["available_solvers", "get_solver", "get_solver_class", "register", "solver_from_config", "unregister"]

_BUILTIN: dict[str, str] = {
    "auto": "solvers.auto:AutoSolver",
    "anneal": "solvers.anneal:AnnealSolver",
    "neal": "solvers.neal:NealSolver",
    "dimod": "solvers.neal:DimodSolver",
    "cpsat": "solvers.cpsat:CpSatSolver",
    "exhaustive": "solvers.exact:ExhaustiveSolver",
    "obs": "solvers.obs:ObsSolver",
    "iobs": "solvers.obs:IObsSolver",
    "swap-descent": "solvers.local_search:SwapDescentSolver",
}
_REGISTERED: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Register a solver class under ``cls.name`` (usable as a class decorator).

    Raises:
        TypeError: ``cls`` is not a :class:`Solver` subclass.
        ValueError: the name is empty or already taken by a different class.
    """
    if not isinstance(cls, type) or not issubclass(cls, Solver):
        raise TypeError(f"'cls' should be a Solver subclass; got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"'name' of {cls.__name__} should be a non-empty str; got {cls.name!r}")
    existing = _REGISTERED.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"solver name '{cls.name}' is already registered to {existing.__name__}")
    if existing is None and cls.name in _BUILTIN and f"{cls.__module__}:{cls.__qualname__}" != _BUILTIN[cls.name]:
        raise ValueError(f"solver name '{cls.name}' is reserved for a built-in solver")
    _REGISTERED[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a solver registered with :func:`register` (built-in solvers cannot be removed).

    Raises:
        ValueError: ``name`` is built in or not registered.
    """
    if name in _BUILTIN:
        raise ValueError(f"solver '{name}' is built in and cannot be unregistered")
    if name not in _REGISTERED:
        raise ValueError(f"no solver '{name}' is registered; registered: {', '.join(sorted(_REGISTERED)) or '(none)'}")
    del _REGISTERED[name]


def available_solvers() -> list[str]:
    """Return the sorted names of all registered solvers (built-in and third-party)."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_solver_class(name: str) -> type[Solver]:
    """Return the solver class registered under ``name``.

    Raises:
        ValueError: ``name`` is unknown (the message lists the valid names).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if not isinstance(name, str) or name not in _BUILTIN:
        raise ValueError(f"unknown solver {name!r}; valid names are {available_solvers()}")
    module_name, class_name = _BUILTIN[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    _REGISTERED[name] = cls
    return cls


def get_solver(name: str, **params: Any) -> Solver:
    """Build the solver registered under ``name`` with the given settings.

    Raises:
        ValueError: unknown name or parameter (the message lists the valid ones), or a bad value.
    """
    return get_solver_class(name)(**params)


def solver_from_config(config: Mapping[str, Any]) -> Solver:
    """Build a solver from a plain mapping.

    Accepts ``{"name": "anneal", "num_restarts": 8}`` (settings next to the name) and
    ``{"name": "anneal", "params": {"num_restarts": 8}}`` (the icbs config layout).

    Raises:
        ValueError: ``name`` is missing or unknown, or a setting is unknown or bad.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"'config' should be a mapping; got {type(config).__name__}")
    if "name" not in config:
        raise ValueError(f"solver config should have a 'name' key; got keys {sorted(config)}")
    settings = {key: value for key, value in config.items() if key not in ("name", "params")}
    nested = config.get("params") or {}
    if not isinstance(nested, Mapping):
        raise TypeError(f"'params' should be a mapping; got {type(nested).__name__}")
    overlap = sorted(set(settings) & set(nested))
    if overlap:
        raise ValueError(f"solver settings {overlap} given both inline and under 'params'")
    return get_solver(config["name"], **settings, **nested)
