"""Peak memory and throughput of ``icbs.prune`` on a random-initialised ~1B Llama-architecture model.

The model is built from a ``transformers.LlamaConfig`` in memory (nothing is downloaded): hidden 2048, 22
layers, MLP 5632, 32 heads with 4 KV heads, vocabulary 32000, untied head (TinyLlama-1.1B's shape), 1.1B
parameters. Calibration windows are random token ids. The run prunes the linears of the last
``--blocks`` decoder blocks (``model.include``) to 50 % with the ``fisher`` estimator, one block of 1024
weights per layer per round (after a warm-up on a tiny model, so compiling the solver kernel is not timed) (``bcd.blocks_per_round`` = the number of pruned layers), the round check on the
step batch, the default solver, for ``--budget`` seconds. Restricting the layers keeps the backward short
(it stops at the earliest pruned layer) while every round still pays a full forward of the 1.1B model;
it also keeps the pruning state (a weight copy and three masks per pruned weight) small.

Measured: parameters, model bytes, peak RSS while the prune runs (sampled every 0.1 s from /proc, and
``ru_maxrss`` of the whole process), blocks per minute, the forward+backward time of a round, the check
forward, the solve time per block, and one plain no-grad forward of the step batch (for per-layer costs).

Usage::

    python benchmarks/scale.py                       # ~1.1B, float32, 120 s of pruning
    python benchmarks/scale.py --size tiny --budget 5  # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from icbs import prune  # noqa: E402
from icbs.config import config_from_dict  # noqa: E402
from icbs.layers import find_prunable  # noqa: E402
from icbs.models import CausalLMAdapter  # noqa: E402

#: LlamaConfig keyword arguments per size name (``tiny`` is for smoke runs).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def build_llama(size: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A random-initialised ``LlamaForCausalLM`` of the named size, in ``dtype`` on ``device``, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype: no float32 copy of a 7B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_windows(vocab: int, n_samples: int, seq_len: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` random token windows in batches (all real tokens)."""
    ids = torch.randint(0, vocab, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
            for i in range(0, n_samples, batch_size)]


def include_pattern(n_layers: int, blocks: int) -> str:
    """``model.include`` regex of the last ``blocks`` decoder blocks."""
    return rf"model\.layers\.({'|'.join(str(i) for i in range(n_layers - blocks, n_layers))})\."


def prune_config(per_round: int, budget_s: float | None, n_samples: int, block_size: int,
                 max_steps: int | None = None) -> Any:
    """The benchmark's icbs config: fisher, ``per_round`` blocks (layers) per round, the check on the step batch."""
    return config_from_dict({
        "pruning": {"density": 0.5},
        "blocks": {"block_size": block_size, "k": block_size // 2},
        "derivatives": {"estimator": "fisher", "n_samples": n_samples},
        "bcd": {"time_budget": budget_s, "max_steps": max_steps, "blocks_per_round": per_round, "check": "batch",
                "checkpoint_every_s": None, "seed": 0},
        "eval": {"every_s": None},
    })


def current_rss() -> int:
    """Resident set size of this process in bytes (``/proc/self/statm``; the lifetime peak where there is no /proc)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Samples this process's resident set size in a thread; ``peak`` is the largest value seen (bytes)."""

    def __init__(self, every_s: float = 0.1) -> None:
        self._every_s = every_s
        self._stop = threading.Event()
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(device: str) -> None:
    """Prune a tiny model for a few steps so that compiled solver kernels and torch are warm before timing."""
    model = build_llama("tiny", torch.float32, device, seed=1)
    windows = random_windows(model.config.vocab_size, 2, 16, 2)
    cfg = config_from_dict({"pruning": {"density": 0.5}, "blocks": {"block_size": 64, "k": 32},
                            "derivatives": {"estimator": "fisher", "n_samples": 2},
                            "bcd": {"time_budget": None, "max_steps": 2, "checkpoint_every_s": None}, "eval": {"every_s": None}})
    prune(model, cfg, windows, CausalLMAdapter().per_sample_loss)


def measure(size: str, dtype: torch.dtype, device: str, *, budget_s: float | None, blocks: int, n_samples: int,
            seq_len: int, block_size: int, per_round: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Build, time one forward, prune for ``budget_s`` seconds (or ``max_steps``); return the measured numbers.

    ``blocks`` last decoder blocks are pruned, ``per_round`` layers per round (default: all of them). Call
    :func:`warm_up` first so that compiling the solver kernel is not timed.
    """
    rss_before = current_rss()
    t0 = time.perf_counter()
    model = build_llama(size, dtype, device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = current_rss()
    windows = random_windows(model.config.vocab_size, n_samples, seq_len, n_samples)
    adapter = CausalLMAdapter()
    batch = {key: value.to(device) for key, value in windows[0].items()}
    with torch.no_grad():
        adapter.per_sample_loss(model, batch)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        adapter.per_sample_loss(model, batch)
        _sync(device)
        forward_s = time.perf_counter() - t0
    cfg = prune_config(per_round or blocks * LINEARS_PER_BLOCK, budget_s, n_samples, block_size, max_steps)
    layers = find_prunable(model, include=(include_pattern(model.config.num_hidden_layers, blocks),))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        result = prune(model, cfg, windows, adapter.per_sample_loss, layers=layers)
        prune_s = time.perf_counter() - t0
    report = result.report.to_dict()
    steps = int(report["steps"])
    timings = report["timings"]
    rounds = max(1, -(-steps // cfg.bcd.blocks_per_round))
    pruned = sum(layer["shape"][0] * layer["shape"][1] for layer in report["layers"].values())
    return {
        "size": size, "dtype": str(dtype).replace("torch.", ""), "device": device,
        "parameters": n_params, "model_bytes": model_bytes, "pruned_weights": pruned,
        "build_s": build_s, "rss_before": rss_before, "rss_model": rss_model, "rss_peak_prune": rss.peak,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_peak": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "forward_s": forward_s, "tokens": n_samples * seq_len, "prune_s": prune_s,
        "elapsed_s": float(report["elapsed_s"]), "steps": steps, "rounds": rounds,
        "accepted": int(report["accepted"]), "timings": dict(timings),
        "estimate_per_round_s": float(timings.get("estimate_s", 0.0)) / rounds,
        "solve_per_block_s": float(timings.get("solve_s", 0.0)) / max(steps, 1),
        "blocks_per_minute": 60.0 * steps / max(float(report["elapsed_s"]), 1e-9),
    }


def _gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def table(row: dict[str, Any]) -> str:
    """The measured numbers as a markdown table."""
    timings = row["timings"]
    other = row["elapsed_s"] - sum(float(timings.get(k, 0.0)) for k in ("estimate_s", "solve_s", "select_s"))
    lines = [
        "| quantity | value |", "|---|---|",
        f"| model | random Llama ({row['size']}), {row['dtype']} on {row['device']} |",
        f"| parameters | {row['parameters']:,} |",
        f"| model size | {row['model_bytes']:,} bytes ({_gib(row['model_bytes'])}) |",
        f"| pruned weights (model.include) | {row['pruned_weights'] / 1e6:.1f} M |",
        f"| RSS after building the model | {_gib(row['rss_model'])} |",
        f"| peak RSS during the prune | {_gib(row['rss_peak_prune'])} |",
        f"| peak RSS of the process (ru_maxrss) | {_gib(row['ru_maxrss'])} |",
        f"| peak GPU memory allocated | {_gib(row['gpu_peak'])} |",
        f"| prune wall time (budget) | {row['prune_s']:.1f} s ({row['elapsed_s']:.1f} s counted) |",
        f"| blocks (steps) / rounds / accepted | {row['steps']} / {row['rounds']} / {row['accepted']} |",
        f"| blocks per minute | {row['blocks_per_minute']:.1f} |",
        f"| forward+backward (estimate) per round | {row['estimate_per_round_s']:.2f} s |",
        f"| solve time per block | {row['solve_per_block_s']:.3f} s |",
        f"| rest of the run (selection excluded: check forward, init, bookkeeping) | {other:.1f} s |",
        f"| plain no-grad forward of the step batch ({row['tokens']} tokens) | {row['forward_s']:.2f} s |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of pruning")
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks pruned (the last ones)")
    parser.add_argument("--n-samples", type=int, default=2, help="windows per step batch (= calibration set)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many blocks (with --budget)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warm_up(args.device)
    row = measure(args.size, DTYPES[args.dtype], args.device, budget_s=args.budget, blocks=args.blocks,
                  n_samples=args.n_samples, seq_len=args.seq_len, block_size=args.block_size, max_steps=args.max_steps)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table(row))
    print("timings:", {k: round(float(v), 2) for k, v in row["timings"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
