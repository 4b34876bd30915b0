"""Accuracy of the MNIST-5k MLP pruned by magnitude, Wanda, gradient init and icbs, mean ± std over seeds.

For every density and seed: the cached dense ``mnist_mlp`` (784-300-100-10, trained once on the
MNIST-5k training split and reused unchanged by every repetition), a calibration draw of
``--n-calib`` training images (``calibration.seed`` = seed), three one-shot inits (magnitude,
Wanda, gradient ``|w g|``) and one icbs run of ``--budget`` seconds started from the init with the
lowest calibration loss at that seed (the choice never looks at held-out images), with
``bcd.refit: end`` (the kept weights are refitted by least squares at the end; ``--set
bcd.refit=none`` turns it off). The "init + refit" column applies the same refit to the init's
mask alone, so the share of the mask search in icbs's gain is visible. Accuracy is on all 1000
held-out images. ``bcd.seed`` = seed too, so the block schedule, the per-step samples and
the solver's random choices change with the seed. Magnitude ignores the data, so its std is 0.

Everything runs with ``torch.set_num_threads(1)``. Not run by CI (minutes to half an hour).

    python benchmarks/mnist.py [--densities 0.05 0.1 ...] [--seeds 0 1 2] [--budget 120] [--quick]
        [--json results.json] [--set blocks.k=32 ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pathlib import Path

# Run as a script, this folder comes first on sys.path, and benchmarks/solvers.py would shadow the
# `solvers` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import icbs  # noqa: E402
from icbs.baselines import run_baseline  # noqa: E402
from icbs.config import CalibrationConfig, EvalConfig, ModelConfig, config_from_dict  # noqa: E402
from icbs.data import build_data  # noqa: E402
from icbs.derivatives import collect_layer_inputs  # noqa: E402
from icbs.models import load_model  # noqa: E402
from icbs.scoring import collect_gradients, init_masks, score  # noqa: E402
from icbs.state import MaskPattern  # noqa: E402

INITS = ("magnitude", "wanda", "gradient")
#: Ranking scope of each one-shot init (magnitude/Wanda: the baselines' defaults).
SCOPES = {"magnitude": "per_layer", "wanda": "per_output", "gradient": "per_output"}
COLUMNS = ("dense", "magnitude", "wanda", "gradient", "icbs_init", "init_recon", "icbs")

#: icbs settings (examples/mnist_mlp.yaml without its export/eval plumbing, plus the final refit);
#: ``--set`` overrides them.
ICBS_SETTINGS: dict[str, Any] = {
    "model": {"kind": "classifier", "builtin": "mnist_mlp", "device": "cpu"},
    "scoring": {"selection_method": "gradient", "selection_scope": "per_layer"},
    "blocks": {"block_size": 128, "k": 64, "tabu_frac": 0.4},
    "derivatives": {"estimator": "fisher", "n_samples": 256},
    "solver": {"name": "anneal", "params": {}},
    "bcd": {"checkpoint_every_s": None, "refit": "end"},
    "eval": {"every_s": None},
}


def _evaluate(loaded: Any, batches: Sequence[dict[str, Tensor]]) -> float:
    with torch.no_grad():
        return float(loaded.adapter.evaluate(loaded.model, batches)["accuracy"])


def _calibration_loss(loaded: Any, batches: Sequence[dict[str, Tensor]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            losses = loaded.adapter.per_sample_loss(loaded.model, batch)
            total += float(losses.double().sum())
            count += int(losses.shape[0])
    return total / count


def _gradient_init(loaded: Any, layers: Mapping[str, nn.Module], calibration: Sequence[dict[str, Tensor]],
                   density: float) -> dict[str, Tensor]:
    """Prune ``layers`` in place by ``|w_ij g_ij|`` (mean calibration gradient), as icbs's ``gradient`` init."""
    grads = collect_gradients(loaded.model, layers, calibration, loaded.adapter.per_sample_loss)
    scope = SCOPES["gradient"]
    scores = {name: score("gradient", scope, module.weight.detach(), grad=grads[name])
              for name, module in layers.items()}
    masks = init_masks(scores, MaskPattern.from_config(density, "unstructured"), scope)
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.mul_(masks[name].to(module.weight.dtype))
    return masks


def _reconstructed(loaded: Any, dense_state: Mapping[str, Tensor], layers: Mapping[str, nn.Module],
                   masks: Mapping[str, Tensor], covariances: Mapping[str, Tensor], damping: float) -> None:
    """Write ``masks`` with the kept weights refitted as ``bcd.refit: end`` does (icbs.reconstruct_weights)."""
    loaded.model.load_state_dict(dense_state)
    with torch.no_grad():
        for name, module in layers.items():
            module.weight.copy_(icbs.reconstruct_weights(module.weight.detach().clone(), masks[name].bool(),
                                                         covariances[name], damping))


def _icbs_config(density: float, seed: int, budget: float, n_calib: int, init: str,
                 overrides: Sequence[str]) -> icbs.IcbsConfig:
    data = json.loads(json.dumps(ICBS_SETTINGS))
    data["calibration"] = {"source": "mnist", "n_samples": n_calib, "batch_size": 256, "seed": seed}
    data["pruning"] = {"density": density}
    data["scoring"].update({"init_method": init, "init_scope": SCOPES[init]})
    data["bcd"].update({"time_budget": budget, "seed": seed})
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return config_from_dict(data)


def run_one(loaded: Any, dense_state: Mapping[str, Tensor], density: float, seed: int, budget: float, n_calib: int,
            overrides: Sequence[str], evaluation: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """All methods at one density and seed; returns accuracies, calibration losses and timings."""
    calib_cfg = CalibrationConfig(source="mnist", n_samples=n_calib, batch_size=256, seed=seed)
    calibration, _ = build_data(calib_cfg, EvalConfig(n_samples=0, batch_size=500), loaded)
    layers = loaded.adapter.prunable_layers(loaded.model)
    row: dict[str, Any] = {"density": density, "seed": seed}
    losses, masks = {}, {}
    for method in INITS:
        loaded.model.load_state_dict(dense_state)
        if method == "gradient":
            masks[method] = _gradient_init(loaded, layers, calibration, density)
        else:
            masks[method] = run_baseline(method, loaded.model, layers, calibration, loaded.adapter.per_sample_loss,
                         density=density, seed=seed, scope=SCOPES[method])
        row[method] = _evaluate(loaded, evaluation)
        losses[method] = _calibration_loss(loaded, calibration)
    row["calib_loss"] = losses
    init = min(INITS, key=lambda m: losses[m])
    row["icbs_init_method"] = init
    loaded.model.load_state_dict(dense_state)
    cfg = _icbs_config(density, seed, budget, n_calib, init, overrides)
    if cfg.bcd.refit == "end":
        # The same least-squares refit icbs applies at the end, on the init's mask alone: how much of
        # icbs's gain is the refit and how much the mask search.
        covariances = collect_layer_inputs(loaded.model, layers, calibration, loaded.adapter.per_sample_loss)
        _reconstructed(loaded, dense_state, layers, masks[init], covariances, cfg.bcd.refit_damping)
        row["init_recon"] = _evaluate(loaded, evaluation)
        loaded.model.load_state_dict(dense_state)
    start = time.perf_counter()
    result = icbs.prune(loaded.model, cfg, calibration, loaded.adapter.per_sample_loss, layers=layers,
                        evaluate=lambda model: {"accuracy": _evaluate(loaded, evaluation)})
    report = result.report.to_dict()
    row["icbs_wall_s"] = time.perf_counter() - start
    row["icbs_init"] = report["init_metrics"]["accuracy"]
    row["icbs"] = report["final_metrics"]["accuracy"]
    row["icbs_steps"] = report["steps"]
    row["icbs_accepted"] = report["accepted"]
    row["icbs_stop"] = report["stop_reason"]
    row["icbs_loss"] = [report["init_loss"], report["final_loss"]]
    row["icbs_density"] = report["density"]["total"]
    loaded.model.load_state_dict(dense_state)
    return row


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: Sequence[Mapping[str, Any]], dense: float) -> list[dict[str, Any]]:
    """Per density: mean and std (sample std, n-1) of each column, and whether icbs beats the best init."""
    table = []
    for density in sorted({r["density"] for r in rows}):
        sub = [r for r in rows if r["density"] == density]
        entry: dict[str, Any] = {"density": density, "n": len(sub), "dense": (dense, 0.0)}
        for column in COLUMNS[1:]:
            values = [r[column] for r in sub if column in r]
            entry[column] = _stats(values) if values else None
        best = max(INITS, key=lambda m: entry[m][0])
        margin = entry["icbs"][0] - entry[best][0]
        entry["best_init"] = best
        entry["margin"] = margin
        entry["beats_by_1std"] = margin > max(entry["icbs"][1], entry[best][1])
        entry["inits_used"] = sorted({r["icbs_init_method"] for r in sub})
        entry["icbs_steps"] = statistics.fmean(r["icbs_steps"] for r in sub)
        table.append(entry)
    return table


def markdown(table: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| density | dense | magnitude | wanda | gradient | icbs init | icbs init + refit | icbs "
             "| icbs − best init |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in table:
        cells = ["–" if e[c] is None else f"{e[c][0]:.3f} ± {e[c][1]:.3f}" for c in COLUMNS]
        cells = [f"**{c}**" if col == "icbs" and e["beats_by_1std"] else c for col, c in zip(COLUMNS, cells)]
        lines.append(f"| {e['density']:g} | " + " | ".join(cells)
                     + f" | {e['margin']:+.3f} ({e['best_init']}; init {'/'.join(e['inits_used'])}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=120.0, help="icbs time budget per run, seconds")
    parser.add_argument("--n-calib", type=int, default=1024, help="calibration images per seed")
    parser.add_argument("--quick", action="store_true", help="smoke test: budget 10 s, seed 0 only")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="icbs setting overrides, e.g. blocks.k=32")
    parser.add_argument("--json", default=None, help="also write every row and the summary to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.seeds = 10.0, args.seeds[:1]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  python {' '.join(sys.argv)}", flush=True)
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"densities {args.densities}, seeds {args.seeds}, budget {args.budget:g} s, overrides {args.overrides}",
          flush=True)
    loaded = load_model(ModelConfig(builtin="mnist_mlp", device="cpu"))
    loaded.model.eval()
    dense_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    _, evaluation = build_data(CalibrationConfig(source="mnist", n_samples=1, batch_size=1),
                               EvalConfig(n_samples=0, batch_size=500), loaded)
    dense = _evaluate(loaded, evaluation)
    print(f"dense accuracy {dense:.4f} on {sum(b['y'].shape[0] for b in evaluation)} held-out images", flush=True)
    rows = []
    for density in args.densities:
        for seed in args.seeds:
            row = run_one(loaded, dense_state, density, seed, args.budget, args.n_calib, args.overrides, evaluation)
            rows.append(row)
            print(f"density {density:g} seed {seed}: magnitude {row['magnitude']:.3f} wanda {row['wanda']:.3f} "
                  f"gradient {row['gradient']:.3f} | init+refit {row.get('init_recon', float('nan')):.3f} | "
                  f"icbs from {row['icbs_init_method']} {row['icbs_init']:.3f} -> {row['icbs']:.3f} "
                  f"({row['icbs_steps']} steps, {row['icbs_accepted']} accepted, stop {row['icbs_stop']}, "
                  f"calib loss {row['icbs_loss'][0]:.4f} -> {row['icbs_loss'][1]:.4f}, {row['icbs_wall_s']:.0f} s)",
                  flush=True)
    table = summarise(rows, dense)
    total = time.perf_counter() - started
    print(markdown(table))
    print(f"total wall time {total:.0f} s")
    for e in table:
        if e["density"] <= 0.3:
            print(f"density {e['density']:g}: icbs beats best init ({e['best_init']}) by > 1 std: {e['beats_by_1std']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "dense": dense, "rows": rows, "summary": table, "total_s": total,
                       "torch_threads": torch.get_num_threads()}, handle, indent=2)


if __name__ == "__main__":
    main()
