"""The device check script runs end to end on the CPU (``--smoke``), so it is not broken when a GPU is at hand."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_gpu_check_smoke_prunes_two_models_and_reports_exact_cpu_parity(capsys):
    gpu_check = _load("gpu_check")
    assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[4]) == 14  # one round of --per-round blocks
        assert float(cells[5]) > 0  # blocks per second
    parity = re.findall(r"^\| (fisher|layerwise) \| (.+?) \| (\S+) \| (\S+) \|$", out, flags=re.MULTILINE)
    assert [(est, where) for est, where, _, _ in parity] == [
        ("fisher", "cpu vs cpu"), ("layerwise", "cpu vs cpu"),
        ("fisher", "sharded cpu+cpu vs cpu"), ("layerwise", "sharded cpu+cpu vs cpu"),
    ]
    # On one device the same float32 computation must give the same numbers; a GPU run shows its own.
    assert all(float(g) == 0.0 and float(h) == 0.0 for _, _, g, h in parity)
