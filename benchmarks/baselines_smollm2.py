"""Perplexity of SmolLM2-135M-Instruct, dense and after one-shot baselines at density 0.5.

Calibration: 32 pydoc windows of 128 tokens (seed 0); evaluation: 64 held-out windows of 256 tokens.
Prints one row per method (perplexity, pruning wall time). Slow (minutes on CPU); not run by CI.

    python -P benchmarks/baselines_smollm2.py [--methods dense magnitude wanda sparsegpt] [--pattern 2:4] [-v]

(``-P`` keeps ``benchmarks/`` off ``sys.path``, where ``benchmarks/solvers.py`` would shadow the package.)
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from icbs.baselines import run_baseline
from icbs.config import CalibrationConfig, EvalConfig, ModelConfig
from icbs.data import build_data
from icbs.evaluation import density_report
from icbs.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dense", "magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (SparseGPT blocks)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    calib_cfg = CalibrationConfig(source="pydoc", n_samples=32, seq_len=128, batch_size=8, seed=0)
    eval_cfg = EvalConfig(n_samples=64, seq_len=256, batch_size=8)
    rows = []
    data = None
    for method in args.methods:
        start = time.perf_counter()
        loaded = load_model(ModelConfig(builtin="smollm2"))
        load_s = time.perf_counter() - start
        if data is None:
            data = build_data(calib_cfg, eval_cfg, loaded)
        calibration, evaluation = data
        layers = loaded.adapter.prunable_layers(loaded.model)
        prune_s = 0.0
        if method != "dense":
            start = time.perf_counter()
            run_baseline(method, loaded.model, layers, calibration, loaded.adapter.per_sample_loss,
                         density=args.density, pattern=args.pattern, seed=0)
            prune_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics = loaded.adapter.evaluate(loaded.model, evaluation)
        eval_s = time.perf_counter() - start
        density = density_report(loaded.model, layers)["global"]["density"]
        row = {"method": method, "perplexity": metrics["perplexity"], "density": density, "n_layers": len(layers),
               "load_s": load_s, "prune_s": prune_s, "eval_s": eval_s}
        rows.append(row)
        print(f"{method:10s} ppl {metrics['perplexity']:9.2f}  density {density:.4f}  "
              f"prune {prune_s:6.1f} s  eval {eval_s:5.1f} s  load {load_s:5.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
