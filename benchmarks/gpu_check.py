"""A device check: icbs on one GPU with random-initialised ~1B and ~7B Llama-architecture models in bf16.

Nothing is downloaded: the models are built from ``transformers.LlamaConfig`` straight on the GPU (the 1.1B
TinyLlama shape and the 6.7B Llama-2-7B shape of ``benchmarks/scale.py``), calibration windows are random
token ids. Each model is pruned for ``--budget`` seconds (default 100) with the ``fisher`` estimator, every
decoder block's linears included, ``--per-round`` blocks per round, the round check on the step batch.
The whole check is sized to finish in 8 minutes on one H200 (two builds, two prunes, the parity checks).

Printed per model: blocks per second, forward+backward (estimate) time per round, solve time per block,
peak GPU memory (``torch.cuda.max_memory_allocated`` during the prune, model included), peak host RSS.
Then estimator parity on a small float32 model: ``fisher`` and ``layerwise`` g and H of the same blocks on
the GPU against the CPU (max |difference| / max |CPU value|), and the same with the model sharded by
``model.device_map`` over ``cuda:0`` and the CPU (accelerate moves activations between them), which
exercises the cross-device statistics.

Usage::

    python benchmarks/gpu_check.py            # on a GPU machine, ~6-8 minutes
    python benchmarks/gpu_check.py --smoke    # tiny sizes on the CPU, seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/scale.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import scale  # noqa: E402

from icbs.config import ModelConfig  # noqa: E402
from icbs.derivatives import estimate_blocks  # noqa: E402
from icbs.models import CausalLMAdapter, load_model  # noqa: E402
from icbs.models.builtin import byte_level_tokenizer  # noqa: E402


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def throughput_rows(sizes: list[str], device: str, dtype: torch.dtype, *, budget_s: float | None, per_round: int,
                    n_samples: int, seq_len: int, block_size: int, max_steps: int | None = None) -> list[dict[str, Any]]:
    """Prune each size for ``budget_s`` seconds or ``max_steps`` (every decoder block included); the rows."""
    rows = []
    for size in sizes:
        n_layers = scale.SIZES[size]["num_hidden_layers"]
        row = scale.measure(size, dtype, device, budget_s=budget_s, blocks=n_layers, n_samples=n_samples,
                            seq_len=seq_len, block_size=block_size, per_round=per_round, max_steps=max_steps)
        rows.append(row)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`throughput_rows`."""
    lines = [
        ("| model | params | dtype | device | blocks | blocks/s | fwd+bwd per round (s) | solve per block (s) "
         "| peak GPU (GiB) | peak RSS (GiB) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['parameters'] / 1e9:.2f} B | {row['dtype']} | {row['device']} | {row['steps']} "
            f"| {row['steps'] / max(row['elapsed_s'], 1e-9):.2f} | {row['estimate_per_round_s']:.3f} "
            f"| {row['solve_per_block_s']:.3f} | {_gib(row['gpu_peak'])} | {_gib(row['rss_peak_prune'])} |"
        )
    return "\n".join(lines)


def _estimates(model: torch.nn.Module, batch: dict[str, torch.Tensor], estimator: str) -> dict[str, Any]:
    """g and H of one fixed block in three layers of different types and depths."""
    adapter = CausalLMAdapter()
    n = model.config.num_hidden_layers
    names = ["model.layers.0.self_attn.q_proj", f"model.layers.{n // 2}.mlp.down_proj",
             f"model.layers.{n - 1}.self_attn.o_proj"]
    modules = dict(model.named_modules())
    blocks = {}
    for i, name in enumerate(names):
        weight = modules[name].weight
        idx = torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(i))[:64]
        blocks[name] = (modules[name], idx)
    reference = {name: modules[name].weight.detach() * 0.9 for name in names}  # a deviation for layerwise's g
    return estimate_blocks(estimator, model, blocks, batch, adapter.per_sample_loss, reference_weights=reference)


def _max_rel(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    g = max(float(np.abs(a[k].g - b[k].g).max() / max(np.abs(b[k].g).max(), 1e-30)) for k in b)
    h = max(float(np.abs(a[k].H - b[k].H).max() / max(np.abs(b[k].H).max(), 1e-30)) for k in b)
    return g, h


def parity_rows(size: str, device: str) -> list[tuple[str, str, float, float]]:
    """Estimator parity of a float32 model: ``device`` vs CPU, and sharded over ``device`` + CPU vs CPU."""
    cpu_model = scale.build_llama(size, torch.float32, "cpu", seed=7)
    batch = scale.random_windows(cpu_model.config.vocab_size, 4, 64, 4, seed=3)[0]
    batch["attention_mask"][1, 40:] = 0  # one padded window: the masks must agree too
    reference = {est: _estimates(cpu_model, batch, est) for est in ("fisher", "layerwise")}
    rows = []
    moved = copy.deepcopy(cpu_model).to(device)  # the same weights (a CUDA generator would draw others)
    for est in ("fisher", "layerwise"):
        rows.append((est, f"{device} vs cpu", *_max_rel(_estimates(moved, batch, est), reference[est])))
    del moved
    n = cpu_model.config.num_hidden_layers
    gpu = 0 if device.startswith("cuda") else "cpu"
    split = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": "cpu", "lm_head": "cpu"}
    split.update({f"model.layers.{i}": gpu if i < n // 2 else "cpu" for i in range(n)})
    with tempfile.TemporaryDirectory() as folder:
        CausalLMAdapter().save(cpu_model, folder, byte_level_tokenizer())
        loaded = load_model(ModelConfig(kind="causal_lm", path=folder, device_map=split), progress=False)
    for est in ("fisher", "layerwise"):
        rows.append((est, f"sharded {gpu}+cpu vs cpu", *_max_rel(_estimates(loaded.model, batch, est), reference[est])))
    return rows


def parity_table(rows: list[tuple[str, str, float, float]]) -> str:
    """Markdown table of :func:`parity_rows`."""
    lines = ["| estimator | placement | max rel. diff g | max rel. diff H |", "|---|---|---|---|"]
    lines += [f"| {est} | {where} | {g:.2e} | {h:.2e} |" for est, where, g, h in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds (checks the script)")
    parser.add_argument("--budget", type=float, default=100.0, help="seconds of pruning per model")
    parser.add_argument("--per-round", type=int, default=14, help="blocks (layers) per round")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.smoke:  # one round per model whatever the machine's speed; nothing here is timed seriously
        sizes, device, dtype = ["tiny", "tiny"], "cpu", torch.float32
        budget, max_steps, n_samples, seq_len, block_size = None, args.per_round, 2, 16, 64
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --smoke to check the script on the CPU", file=sys.stderr)
            return 2
        sizes, device, dtype = ["1b", "7b"], "cuda", torch.bfloat16
        budget, max_steps, n_samples, seq_len, block_size = args.budget, None, 8, 128, 1024
        print(torch.cuda.get_device_name(0), f"torch {torch.__version__}")
        scale.warm_up(device)
    rows = throughput_rows(sizes, device, dtype, budget_s=budget, per_round=args.per_round, n_samples=n_samples,
                           seq_len=seq_len, block_size=block_size, max_steps=max_steps)
    print(throughput_table(rows))
    print()
    print(parity_table(parity_rows("tiny", device)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
