"""Quality–time benchmark on a real LLM: SmolLM2-135M-Instruct at density 0.5 (issue 5).

Rows: dense; magnitude; Wanda (per-output); SparseGPT (unstructured, blocksize 128, damping 0.01,
sequential); icbs at several time budgets (one run, evaluated when its elapsed pruning time crosses each
budget: the driver's schedule does not depend on the budget, so the state at 10 minutes of a 20-minute run
is the state a 10-minute run ends in, up to the length of the round in flight); icbs with 2:4 next to the
2:4 baselines. Evaluation time is not counted as pruning time; the init (e.g. SparseGPT inside icbs) is.

Data: the stdlib ``pydoc_data.topics`` corpus, values joined in sorted-key order and tokenised; the first
70 % of tokens give 32 calibration windows of 128 tokens (seed 0), the last 30 % up to 64 consecutive
256-token windows for perplexity = exp(mean token NLL). float32 on the CPU, ``torch.set_num_threads(2)``.

    python benchmarks/llm.py                          # the full table (about 45 minutes on 2 cores)
    python benchmarks/llm.py --budgets 1 --skip 2:4   # a quick look
    python benchmarks/llm.py --set blocks.block_size=512 --set scoring.init_method=wanda

Writes ``--json`` (rows and settings) and ``--plot`` (perplexity against elapsed pruning time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Run as a script, this folder would shadow the `solvers` package with benchmarks/solvers.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import icbs  # noqa: E402
from icbs.baselines import run_baseline  # noqa: E402
from icbs.models import load_model  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2.yaml"
logger = logging.getLogger("benchmarks.llm")


def _zeros_density(layers: Mapping[str, torch.nn.Module]) -> float:
    """Global density of the pruned layers, by counting non-zero weights."""
    kept = sum(int((m.weight != 0).sum()) for m in layers.values())
    return kept / sum(m.weight.numel() for m in layers.values())


class _Bench:
    """The model loaded once; dense weights kept aside so every row starts from the same dense model."""

    def __init__(self, cfg: icbs.IcbsConfig) -> None:
        from icbs.data import build_data

        start = time.perf_counter()
        self.loaded = load_model(cfg.model)
        self.load_s = time.perf_counter() - start
        self.model = self.loaded.model
        self.adapter = self.loaded.adapter
        self.calibration, self.evaluation = build_data(cfg.calibration, cfg.eval, self.loaded)
        self.layers = self.adapter.prunable_layers(self.model, cfg.model.include, cfg.model.exclude)
        self.dense = {name: m.weight.detach().clone() for name, m in self.layers.items()}
        self.eval_s = 0.0

    @torch.no_grad()
    def reset(self) -> None:
        for name, module in self.layers.items():
            module.weight.copy_(self.dense[name])

    def perplexity(self) -> float:
        start = time.perf_counter()
        value = float(self.adapter.evaluate(self.model, self.evaluation)["perplexity"])
        self.eval_s += time.perf_counter() - start
        return value


def _baseline_row(bench: _Bench, method: str, pattern: str) -> dict[str, Any]:
    bench.reset()
    start = time.perf_counter()
    if method != "dense":
        run_baseline(method, bench.model, bench.layers, bench.calibration, bench.adapter.per_sample_loss,
                     density=0.5, pattern=pattern, seed=0)
    prune_s = time.perf_counter() - start
    row = {"method": method, "pattern": pattern, "perplexity": bench.perplexity(), "prune_s": prune_s,
           "density": _zeros_density(bench.layers)}
    logger.info("%-10s %-12s ppl %8.2f  density %.4f  %.0f s", method, pattern, row["perplexity"], row["density"], prune_s)
    return row


def _icbs_rows(bench: _Bench, cfg: icbs.IcbsConfig, budgets_s: list[float], label: str) -> tuple[list[dict], dict]:
    """One icbs run of ``max(budgets_s)`` seconds, evaluated at init and when it crosses each budget."""
    bench.reset()
    cfg = cfg.replace(bcd=dataclasses.replace(cfg.bcd, time_budget=max(budgets_s), checkpoint_every_s=None))
    pending = sorted(budgets_s)
    clock = {"elapsed": 0.0, "step": 0, "calls": 0}
    rows: list[dict[str, Any]] = []

    def progress(elapsed: float, budget: float | None, step: int) -> None:
        clock["elapsed"], clock["step"] = elapsed, step

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        clock["calls"] += 1
        if clock["calls"] == 1:  # right after init
            ppl = bench.perplexity()
            rows.append({"method": f"{label} init", "budget_s": 0.0,
                         "elapsed_s": clock["elapsed"], "step": 0, "perplexity": ppl})
            logger.info("%s init: ppl %.2f", label, ppl)
            return {"perplexity": ppl}
        crossed = [b for b in pending if clock["elapsed"] >= b]
        if not crossed:
            return {}
        return snapshot(crossed)

    def snapshot(crossed: list[float]) -> dict[str, float]:
        for b in crossed:
            pending.remove(b)
        ppl = bench.perplexity()
        for b in crossed:
            rows.append({"method": f"{label} {b / 60:g} min", "budget_s": b, "elapsed_s": clock["elapsed"],
                         "step": clock["step"], "perplexity": ppl, "density": _zeros_density(bench.layers)})
            logger.info("%s at %.0f s (budget %g min, step %d): ppl %.2f", label, clock["elapsed"], b / 60,
                        clock["step"], ppl)
        return {"perplexity": ppl}

    result = icbs.prune(bench.model, cfg, bench.calibration, bench.adapter.per_sample_loss, layers=bench.layers,
                        evaluate=evaluate, eval_every_s=1e-3, progress=progress)
    report = result.report
    for row in rows:  # the init's evaluation comes before the first round reports the clock
        if row["budget_s"] == 0.0:
            row["elapsed_s"] = float(report["timings"]["init_s"])
    if pending:  # budgets the run ended at or before (e.g. the last one): the final model
        clock["elapsed"], clock["step"] = report["elapsed_s"], report["steps"]
        snapshot(list(pending))
    summary = {k: report[k] for k in ("steps", "accepted", "undone_rounds", "stop_reason", "elapsed_s", "timings")}
    logger.info("%s: %s", label, summary)
    summary["init_loss"], summary["final_loss"] = report["init_loss"], report["final_loss"]
    return rows, summary


def _plot(path: Path, rows: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in enumerate(sorted({r["method"].split(" ")[0] for r in rows})):
        curve = sorted((r["elapsed_s"] / 60, r["perplexity"]) for r in rows if r["method"].split(" ")[0] == label)
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", color=f"C{3 + i}", label=label)
    styles = {"wanda": ("C0", "--"), "sparsegpt": ("C2", "-."), "dense": ("k", ":")}
    for row in baselines:
        if row["pattern"] == "unstructured" and row["method"] in styles:
            color, style = styles[row["method"]]
            ax.axhline(row["perplexity"], color=color, linestyle=style, label=f"{row['method']} ({row['perplexity']:.1f})")
    ax.set_xlabel("elapsed pruning time (min, 2-core CPU)")
    ax.set_ylabel("held-out perplexity (pydoc)")
    ax.set_title("SmolLM2-135M at density 0.5")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(EXAMPLE), help="icbs settings (default examples/smollm2.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--runs", nargs="+", default=["wanda:2,5,10,20", "sparsegpt:5,10"],
                        help="icbs runs as INIT:MINUTES,...; one run per init, evaluated at each budget")
    parser.add_argument("--run-24", default="wanda:5", help="icbs with 2:4 as INIT:MINUTES")
    parser.add_argument("--skip", nargs="*", default=[], help="any of: baselines 2:4 icbs")
    parser.add_argument("--json", default="benchmarks/llm_results.json")
    parser.add_argument("--plot", default="docs/llm_curve.png")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", metavar="JSON", help="print the table of a saved run and exit")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(markdown(saved))
        if args.plot and saved.get("icbs"):
            _plot(Path(args.plot), saved["icbs"], saved.get("baselines", []))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("icbs.bcd", "icbs.derivatives", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = icbs.load_config(args.config, overrides=args.set)
    bench = _Bench(cfg)
    out: dict[str, Any] = {
        "settings": cfg.to_dict(), "threads": args.threads, "machine": platform.machine(),
        "n_layers": len(bench.layers), "load_s": bench.load_s, "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    baselines: list[dict[str, Any]] = []
    if "baselines" not in args.skip:
        for method in ("dense", "magnitude", "wanda", "sparsegpt"):
            baselines.append(_baseline_row(bench, method, "unstructured"))
            _write(args.json, {**out, "baselines": baselines})
    out["baselines"] = baselines
    out["icbs"], out["icbs_summary"] = [], {}
    if "icbs" not in args.skip:
        for spec in args.runs:
            init, budgets = _parse_run(spec)
            run_cfg = cfg.replace(scoring=dataclasses.replace(cfg.scoring, init_method=init))
            rows, summary = _icbs_rows(bench, run_cfg, budgets, f"icbs[{init}]")
            out["icbs"] += rows
            out["icbs_summary"][init] = summary
            _write(args.json, out)
        if args.plot:
            _plot(Path(args.plot), out["icbs"], baselines)
    if "2:4" not in args.skip:
        for method in ("wanda", "sparsegpt"):
            baselines.append(_baseline_row(bench, method, "2:4"))
        init, budgets = _parse_run(args.run_24)
        cfg24 = cfg.replace(pruning=dataclasses.replace(cfg.pruning, pattern="2:4"),
                            scoring=dataclasses.replace(cfg.scoring, init_method=init))
        rows24, summary24 = _icbs_rows(bench, cfg24, budgets, f"icbs 2:4[{init}]")
        out["icbs_24"], out["icbs_24_summary"] = rows24, summary24
    out["eval_s"] = bench.eval_s
    _write(args.json, out)
    print(markdown(out))


def markdown(out: Mapping[str, Any]) -> str:
    """The results table (markdown) of a run's JSON."""
    lines = ["| method | pattern | perplexity | elapsed pruning time (min) | steps |", "|---|---|---:|---:|---:|"]
    for row in out.get("baselines", []):
        lines.append(f"| {row['method']} | {row['pattern']} | {row['perplexity']:.2f} | {row['prune_s'] / 60:.1f} | – |")
    for key, pattern in (("icbs", "unstructured"), ("icbs_24", "2:4")):
        for row in out.get(key, []):
            lines.append(f"| {row['method']} | {pattern} | {row['perplexity']:.2f} | {row['elapsed_s'] / 60:.1f} | {row['step']} |")
    return "\n".join(lines)


def _parse_run(spec: str) -> tuple[str, list[float]]:
    """``"wanda:2,5,10"`` -> ``("wanda", [120.0, 300.0, 600.0])``."""
    init, _, minutes = spec.partition(":")
    if not init or not minutes:
        raise SystemExit(f"a run should look like INIT:MINUTES,...; got {spec!r}")
    return init, [60 * float(m) for m in minutes.split(",")]


def _write(path: str | None, out: Mapping[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
