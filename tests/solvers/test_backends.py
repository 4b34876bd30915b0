"""Optional backends are imported with their solver module and a missing one fails at construction."""

from __future__ import annotations

import importlib
import sys

import pytest

from solvers import SolverUnavailableError, get_solver


def _hide(monkeypatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail as if it were not installed."""
    for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


@pytest.fixture
def reload_after(monkeypatch):
    """Reload the given solver modules after ``sys.modules`` is restored."""
    modules = []
    yield modules.append
    monkeypatch.undo()
    for module in modules:
        importlib.reload(module)


@pytest.mark.parametrize(
    ("solver", "module_name", "package", "pip_name"),
    [("cpsat", "solvers.cpsat", "ortools", "ortools"), ("neal", "solvers.neal", "neal", "dwave-neal")],
)
def test_backends_missing_backend_fails_at_construction(monkeypatch, reload_after, solver, module_name, package, pip_name):
    module = importlib.import_module(module_name)
    reload_after(module)
    _hide(monkeypatch, package)
    importlib.reload(module)
    with pytest.raises(SolverUnavailableError, match=f"solver '{solver}' needs .*'pip install {pip_name}'"):
        get_solver(solver)


def test_backends_missing_dimod_sampler_fails_at_construction(monkeypatch):
    _hide(monkeypatch, "dwave.samplers")
    with pytest.raises(SolverUnavailableError, match="cannot import 'dwave.samplers'.*pip install dwave-samplers"):
        get_solver("dimod", sampler="dwave.samplers.TabuSampler")


def test_backends_present_backend_builds():
    assert get_solver("cpsat").params["num_workers"] == 2
    assert type(get_solver("neal").sampler).__name__ == "SimulatedAnnealingSampler"
