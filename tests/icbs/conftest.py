"""Helpers for the icbs tests: configs for quick runs and model snapshots."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import pytest

from icbs.config import config_from_dict


def quick_config(**sections: dict[str, Any]):
    """A validated config for a fast toy run: exhaustive solver, exact derivatives, small blocks.

    Keyword arguments are sections merged over the defaults (``bcd={"max_steps": 5}``).
    """
    base: dict[str, dict[str, Any]] = {
        "pruning": {"density": 0.5, "pattern": "unstructured"},
        "scoring": {"init_method": "magnitude", "init_scope": "per_layer", "selection_method": "magnitude",
                    "selection_scope": "per_layer"},
        "blocks": {"block_size": 8, "k": 4, "tabu_frac": 0.3},
        "derivatives": {"estimator": "exact", "n_samples": 16},
        "solver": {"name": "exhaustive"},
        "bcd": {"time_budget": None, "max_steps": 20, "checkpoint_every_s": None, "seed": 0},
        "eval": {"every_s": None},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Every parameter/buffer of ``model`` equals the snapshot exactly."""
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(current[key], value), key


@pytest.fixture
def make_config():
    """Factory for :func:`quick_config`."""
    return quick_config


@pytest.fixture(name="snapshot")
def snapshot_fixture():
    """:func:`snapshot` as a fixture."""
    return snapshot


@pytest.fixture(name="assert_unchanged")
def assert_unchanged_fixture():
    """:func:`assert_unchanged` as a fixture."""
    return assert_unchanged
