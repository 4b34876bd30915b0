"""Export a set of real block problems from SmolLM2-135M pruning runs, for solver benchmarks and research.

Each run starts from the dense model of ``examples/smollm2.yaml`` (Fisher estimator, density 0.5, 7 blocks per
round) with one block size, and records the block problems the driver hands its solver: the first rounds
("early": blocks around the one-shot init) and the round after ``--late-after`` steps ("late": blocks of a
mask that BCD has already improved; 42 steps at n = 1024, 14 at n = 4096 by default). Runs: block_size 1024 (k = 512) and 4096 (k = 2048). The run's own
solver (``--solver``, default ``swap-descent``) only moves the mask along; every recorded problem is solved
again by ``benchmarks/solvers.py``.

Written to ``OUT`` (not committed: per n = 1024 block 12 MB of ``.npz`` and 40 MB of ``.qp``; a 4096 block's
``.npz`` holds 256 MB of float64 before compression):

* ``n<size>_call<NNNN>.npz`` (the run's block size and the 0-based solver call): the exact float64 problem: ``Q``, ``offset``, the constraints (``group_ks``,
  ``group_sizes``, ``group_members``) and the continuous block data (``H``, ``g``, ``w0``, ``d``, ``alpha``,
  ``ridge``); read it with :func:`load_block`;
* ``n<size>_call<NNNN>.qp`` (for n <= ``--text-max-n``): the plain-text format of :meth:`CardinalityQP.write`,
  readable without numpy's npz (``CardinalityQP.read``); ``.cqm`` with ``--formats npz,qp,cqm``;
* ``index.json``: per block the file, run, phase (early/late), layer, step, n, k and ``x_cur`` (the
  current mask, 1 = pruned; energy 0 by construction), and the run solver's energy.

Usage::

    python benchmarks/export_real_blocks.py --out /tmp/real_blocks            # both sizes, the defaults
    # the two folders of docs/BENCHMARKS.md's real-block table (each with the example of its day):
    python benchmarks/export_real_blocks.py --out /tmp/rb1024 --sizes 1024
    python benchmarks/export_real_blocks.py --out /tmp/rb4096 --sizes 4096 --late-rounds 1
    python benchmarks/export_real_blocks.py --out /tmp/rb --sizes 1024 --early-rounds 1 --late-after 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers  # noqa: E402
from solvers import CardinalityQP, Solution  # noqa: E402
from solvers.composites import RecordingComposite  # noqa: E402
from solvers.problems import BlockData  # noqa: E402

__all__ = ["load_block", "main", "save_block"]

logger = logging.getLogger("export_real_blocks")

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("npz", "qp", "cqm")


def save_block(problem: CardinalityQP, path: Path) -> None:
    """Write ``problem`` (with its block data, if any) exactly to the compressed ``.npz`` at ``path``."""
    arrays: dict[str, Any] = {
        "Q": problem.Q,
        "offset": np.float64(problem.offset),
        "group_ks": np.asarray(problem.ks, dtype=np.int64),
        "group_sizes": np.array([group.size for group in problem.groups], dtype=np.int64),
        "group_members": np.concatenate(problem.groups).astype(np.int64) if problem.groups else np.zeros(0, np.int64),
    }
    block = problem.block
    if block is not None:
        arrays.update(H=block.H, g=block.g, w0=block.w0, d=block.d, alpha=np.float64(block.alpha),
                      ridge=np.float64(block.ridge))
    np.savez_compressed(path, **arrays)


def load_block(path: str | Path) -> CardinalityQP:
    """Read a problem written by :func:`save_block` (the same float64 values)."""
    with np.load(path) as data:
        bounds = np.cumsum(data["group_sizes"])[:-1]
        groups = np.split(data["group_members"], bounds) if data["group_sizes"].size else []
        constraints = list(zip(groups, data["group_ks"].tolist()))
        block = None
        if "H" in data:
            block = BlockData(H=data["H"], g=data["g"], w0=data["w0"], d=data["d"], alpha=float(data["alpha"]),
                              ridge=float(data["ridge"]))
        return CardinalityQP(data["Q"], constraints, offset=float(data["offset"]), block=block)


@dataclasses.dataclass
class _Run:
    """One pruning run: its block size, and which solver calls (0-based) to record as which phase."""

    name: str
    block_size: int
    max_steps: int
    phases: dict[int, str]


def _runs(args: argparse.Namespace) -> list[_Run]:
    per_round = args.blocks_per_round
    runs = []
    for size in args.sizes:
        early = range(args.early_rounds * per_round)
        late_start = args.late_after if size <= 1024 else args.late_after_large
        late = range(late_start, late_start + args.late_rounds * per_round) if late_start > 0 else range(0)
        phases = {call: "early" for call in early} | {call: "late" for call in late}
        runs.append(_Run(f"n{size}", size, max(phases) + 1, phases))
    return runs


class _Writer:
    """Writes the recorded calls of one run to ``out`` as they happen (a 4096 block holds 256 MB)."""

    def __init__(self, out: Path, run: _Run, formats: tuple[str, ...], text_max_n: int) -> None:
        self.out, self.run, self.formats, self.text_max_n = out, run, formats, text_max_n
        self.rows: list[dict[str, Any]] = []

    def __call__(self, call: int, problem: CardinalityQP, x_cur: np.ndarray | None, solution: Solution) -> None:
        phase = self.run.phases.get(call)
        if phase is None:
            return
        stem = self.out / f"{self.run.name}_call{call:04d}"
        files = []
        for fmt in self.formats:
            if fmt != "npz" and problem.n > self.text_max_n:
                continue
            path = stem.with_suffix("." + fmt)
            save_block(problem, path) if fmt == "npz" else problem.write(path)
            files.append(path.name)
        x_cur = np.zeros(problem.n, dtype=np.int8) if x_cur is None else x_cur
        self.rows.append({
            "id": stem.name, "files": files, "run": self.run.name, "phase": phase, "call": call,
            "n": problem.n, "k": [int(k) for k in problem.ks], "x_cur": x_cur.astype(int).tolist(),
            "energy_x_cur": problem.energy(x_cur), "run_solver": solution.info.get("solver"),
            "energy_run_solver": solution.energy,
        })
        logger.info("%s call %d (%s): n=%d, %s", self.run.name, call, phase, problem.n, ", ".join(files))


def _export_run(args: argparse.Namespace, run: _Run, loaded: Any, dense: dict, calibration: list,
                rows: list[dict[str, Any]]) -> None:
    """Prune a fresh copy of the dense model with ``run``'s settings, appending its blocks to ``rows``."""
    import icbs
    from icbs.runner import _layers

    loaded.model.load_state_dict(dense)
    cfg = icbs.load_config(args.config, [
        f"blocks.block_size={run.block_size}", f"blocks.k={run.block_size // 2}", f"solver.name={args.solver}",
        f"solver.params={args.solver_params}", f"bcd.max_steps={run.max_steps}", "bcd.time_budget=null",
        "bcd.checkpoint_every_s=null", "eval.every_s=null", f"bcd.blocks_per_round={args.blocks_per_round}",
    ])
    writer = _Writer(args.out, run, args.formats, args.text_max_n)
    recorder = RecordingComposite(solvers.get_solver(cfg.solver.name, **dict(cfg.solver.params)), writer)
    solved: list[dict[str, Any]] = []

    def on_event(event: Any) -> None:
        # Solver calls and non-skipped step records come in the same order (one record per solved block).
        if event.event != "step" or event.status == "SKIPPED":
            return
        solved.append(event.to_dict())
        for row in writer.rows:
            if row["call"] == len(solved) - 1:
                row.update(layer=event.layer, step=event.step, accepted=event.accepted)
                _write_index(args, rows + writer.rows)

    started = time.perf_counter()
    icbs.prune(loaded.model, cfg, calibration, loaded.adapter.per_sample_loss, layers=_layers(cfg, loaded),
               solver=recorder, callbacks=[on_event])
    rows += writer.rows
    _write_index(args, rows)
    logger.info("%s: %d steps in %.0f s, %d blocks written", run.name, len(solved), time.perf_counter() - started,
                len(writer.rows))


def _write_index(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """(Re)write ``index.json``; called after every recorded step, so an interrupted export stays usable."""
    import torch

    config = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    index = {"config": str(config), "command": " ".join(["python", "benchmarks/export_real_blocks.py", *args.argv]),
             "torch": torch.__version__, "blocks": [row for row in rows if "layer" in row]}
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; existing blocks replaced)")
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "smollm2.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="block sizes (k = size / 2)")
    parser.add_argument("--solver", default="swap-descent", help="the solver that moves the run along")
    parser.add_argument("--solver-params", default="{num_restarts: 0}", help="its settings (YAML mapping)")
    parser.add_argument("--blocks-per-round", type=int, default=7)
    parser.add_argument("--early-rounds", type=int, default=1, help="rounds recorded from the init")
    parser.add_argument("--late-after", type=int, default=42, help="steps before the late rounds (n <= 1024)")
    parser.add_argument("--late-after-large", type=int, default=14, help="steps before the late rounds (n > 1024)")
    parser.add_argument("--late-rounds", type=int, default=2)
    parser.add_argument("--formats", default="npz,qp", help=f"comma-separated subset of {FORMATS}")
    parser.add_argument("--text-max-n", type=int, default=1024, help="write .qp/.cqm only up to this n")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.formats = tuple(fmt for fmt in args.formats.split(",") if fmt)
    if not args.formats or set(args.formats) - set(FORMATS):
        parser.error(f"--formats should be a comma-separated subset of {FORMATS}; got {','.join(args.formats)!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import icbs
    from icbs.runner import _data, _load

    args.out.mkdir(parents=True, exist_ok=True)
    base = icbs.load_config(args.config)
    loaded = _load(base.model)
    calibration, _ = _data(base, loaded)
    dense = {key: value.detach().clone() for key, value in loaded.model.state_dict().items()}
    rows: list[dict[str, Any]] = []
    for run in _runs(args):
        _export_run(args, run, loaded, dense, calibration, rows)
    logger.info("wrote %d blocks and index.json to %s", len(rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
