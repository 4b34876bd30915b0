"""Safety net for refactors: fixed-step runs of the MNIST example keep bit-identical masks and weights.

The digests in ``data/regression_masks.json`` were recorded on main before the driver was restructured
(issue 8). Each variant drives a different path through the driver: in-pass gradient selection with
the whole-calibration check; select-then-estimate with a fresh-batch check over two-layer rounds;
the layer-wise estimator with the end refit. A deliberate change of behaviour re-records the digests
(``python tests/icbs/test_regression_masks.py --record``) and names the fix in its commit.

Each variant keeps one digest set per machine kind it was recorded on: the same code on another CPU rounds
its float32 matmuls differently (measured: an AMD EPYC against the machine of the first recording), which flips
a close accept decision and changes every later digest. A run must match one recorded set exactly.
``--add-machine`` appends this machine's digests of unchanged code to the sets already recorded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DIGESTS = Path(__file__).with_name("data") / "regression_masks.json"
EXAMPLE = REPO / "examples" / "mnist_mlp.yaml"

COMMON = ["bcd.time_budget=null", "bcd.checkpoint_every_s=null", "eval.every_s=null", "calibration.n_samples=512"]
VARIANTS = {
    "example": ["bcd.max_steps=24"],
    "select_then_estimate_fresh": [
        "bcd.max_steps=24", "bcd.blocks_per_round=2", "bcd.check=fresh", "scoring.selection_method=wanda",
        "scoring.fix_frac_prune=0.3", "scoring.fix_frac_keep=0.2",
    ],
    "layerwise_refit": [
        "bcd.max_steps=16", "derivatives.estimator=layerwise", "bcd.check=batch", "bcd.refit=end",
        "scoring.selection_method=magnitude",
    ],
}


def _digest(tensors) -> dict[str, str]:
    return {name: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            for name, t in sorted(tensors.items())}


def run_variant(name: str) -> dict[str, dict[str, str]]:
    """Run one variant in-process and return the digests of its masks and final weights."""
    import icbs
    from icbs.data import build_data
    from icbs.models import load_model

    cfg = icbs.load_config(EXAMPLE, overrides=COMMON + VARIANTS[name])
    loaded = load_model(cfg.model)
    calibration, _evaluation = build_data(cfg.calibration, cfg.eval, loaded)
    layers = loaded.adapter.prunable_layers(loaded.model, include=cfg.model.include, exclude=cfg.model.exclude)
    result = icbs.prune(loaded.model, cfg, calibration, loaded.adapter.per_sample_loss, layers=layers)
    return {"masks": _digest(result.masks), "weights": _digest({n: m.weight for n, m in layers.items()}),
            "steps": {"n": len(result.history), "accepted": sum(bool(_accepted(r)) for r in result.history)}}


def _accepted(record) -> bool:
    return record["accepted"] if isinstance(record, dict) else record.accepted


@pytest.mark.integration
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_regression_masks_bit_identical(variant):
    pytest.importorskip("mlxtend")
    recorded = json.loads(DIGESTS.read_text())[variant]
    got = run_variant(variant)
    if got in recorded:
        return
    closest = next((r for r in recorded if r["masks"] == got["masks"]), recorded[0])  # a readable difference
    assert got["steps"] == closest["steps"]
    assert got["masks"] == closest["masks"]
    assert got["weights"] == closest["weights"]


if __name__ == "__main__":
    if "--record" in sys.argv or "--add-machine" in sys.argv:
        DIGESTS.parent.mkdir(exist_ok=True)
        sets = json.loads(DIGESTS.read_text()) if "--add-machine" in sys.argv else {}
        for v in sorted(VARIANTS):
            got = run_variant(v)
            if got not in sets.setdefault(v, []):
                sets[v].append(got)
        DIGESTS.write_text(json.dumps(sets, indent=1, sort_keys=True) + "\n")
        print(DIGESTS.read_text())
