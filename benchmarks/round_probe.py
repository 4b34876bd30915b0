"""What a round does to a text the round check never reads: the evidence behind ``bcd.check_z`` (issue 11).

Runs icbs on SmolLM2-135M-Instruct from ``examples/smollm2.yaml`` for ``--steps`` blocks and, after every
checked round and before the check's verdict is applied, measures the perplexity on the second held-out domain
(the docstrings of ``benchmarks/llm.py``) and on text sampled from the dense model. So every round, kept or
undone, gets the validation statistics the check saw (mean per-window change, its paired t statistic, the share
of windows that improved) next to its effect on the other texts.

    python benchmarks/round_probe.py --sparsity 2:4 --steps 1000 --json round_probe.json

Prints one line per round and a summary by the round's t statistic. Measurements are outside the budget: the
run is bounded by ``--steps`` (its rounds are the same as a timed run's, the schedule does not depend on time).
The evaluation inside each round makes the run several times slower than the search alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

# Run as a script, this folder would shadow the `solvers` package with benchmarks/solvers.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import icbs  # noqa: E402
import icbs.bcd  # noqa: E402
from icbs.round_check import RoundCheck  # noqa: E402

# benchmarks/llm.py, loaded by path: the same model, data and second domain as the table.
_spec = importlib.util.spec_from_file_location("benchmarks_llm", Path(__file__).resolve().parent / "llm.py")
llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm)


def sampled_text(bench: llm._Bench, n: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of ``length`` tokens sampled from the dense model (temperature 1, from BOS), in batches of 8."""
    tokenizer = bench.loaded.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = bench.model.generate(input_ids=torch.full((n, 1), start), attention_mask=torch.ones(n, 1, dtype=torch.long),
                                   do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=length - 1,
                                   pad_token_id=tokenizer.eos_token_id)
    return [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])} for i in range(0, n, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(llm.EXAMPLE))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--steps", type=int, default=1000, help="blocks to run (the run's bound instead of time)")
    parser.add_argument("--json", help="write every round's record here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # 32 held-out windows, as the table's command (--set eval.n_samples=32) reads them
    cfg = icbs.load_config(args.config, overrides=["eval.n_samples=32", *args.set])
    bench = llm._Bench(cfg, cfg.eval.n_samples, cfg.eval.seq_len)
    texts = {"docstrings": bench.texts["docstrings"], "sampled": sampled_text(bench, 32, 128, seed=0)}

    def measure() -> dict[str, float]:
        return {name: float(bench.adapter.evaluate(bench.model, batches)["perplexity"]) for name, batches in texts.items()}

    print("dense", measure())
    rounds: list[dict[str, float | bool]] = []
    current: dict[str, float] = {}

    class ProbedCheck(RoundCheck):
        """The driver's round check, measuring the other texts while the round's moves are still applied."""

        def _losses(self, batches):  # noqa: ANN001, ANN202
            self.last = super()._losses(batches)
            return self.last

        def passes(self, check_on, before):  # noqa: ANN001, ANN202
            earlier = torch.cat(self._before)
            passed, after = super().passes(check_on, before)
            change = torch.cat(self.last) - earlier
            error = float(change.std()) / math.sqrt(change.numel())
            now = measure()
            record = {"passed": passed, "mean": float(change.mean()), "t": float(change.mean()) / error,
                      "better": float((change < 0).float().mean()),
                      **{f"d_{k}": v - current[k] for k, v in now.items()}, **now}
            rounds.append(record)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
            if passed:
                current.update(now)
            return passed, after

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        if not current:  # after the init
            current.update(measure())
            print("init", current, flush=True)
        return {}

    icbs.bcd.RoundCheck = ProbedCheck  # the driver builds its check from this name
    cfg = llm._pruning(cfg, args.sparsity)
    cfg = cfg.replace(bcd=dataclasses.replace(cfg.bcd, time_budget=None, max_steps=args.steps, checkpoint_every_s=None))
    result = icbs.prune(bench.model, cfg, bench.search_calibration, bench.adapter.per_sample_loss, layers=bench.layers,
                        evaluate=evaluate, eval_every_s=math.inf)
    print("end", result.report.stop_reason, result.report.steps, "steps")
    print("| validation t of the round | rounds | kept | mean change, docstrings ppl | mean change, sampled ppl |")
    print("|---|---:|---:|---:|---:|")
    for low, high in ((-math.inf, -3.0), (-3.0, -1.645), (-1.645, math.inf)):
        group = [r for r in rounds if low <= r["t"] < high]
        if group:
            print(f"| [{low:g}, {high:g}) | {len(group)} | {sum(bool(r['passed']) for r in group)} | "
                  f"{statistics.mean(r['d_docstrings'] for r in group):+.3f} | "
                  f"{statistics.mean(r['d_sampled'] for r in group):+.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"sparsity": args.sparsity, "settings": cfg.to_dict(), "rounds": rounds},
                                              indent=1))


if __name__ == "__main__":
    main()
