"""Bad input through the real ``icbs`` command line: each case must be refused before anything is written.

Every case runs ``python -m icbs ...`` in a fresh temporary folder (the working directory, so the default
``export.dir`` lands there too) against this repository's ``icbs``. A case passes when the command exits with
2, prints exactly one ``icbs: error:`` line and no traceback, and the folder holds exactly what it held
before (an absent output folder stays absent, an existing one is untouched). Two cases simulate a full disk
by patching ``os.fsync`` or ``torch.save`` to raise ``OSError(ENOSPC)`` in a launcher that then calls
``icbs.cli.main``. Prints a markdown table (case, exit code, the error line) and the count of cases that
left files behind. Not run by CI (a few minutes: each case is a fresh process).

    python benchmarks/bad_inputs.py [--only SUBSTRING] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path (benchmarks/solvers.py would shadow the `solvers`
# package, and an installed icbs could shadow this one): put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))

BASE = """\
model: {builtin: mnist_mlp, device: cpu}
calibration: {source: mnist, n_samples: 256, batch_size: 128}
eval: {n_samples: 200, batch_size: 200, every_s: null, before: false}
pruning: {density: 0.5}
blocks: {block_size: 32, k: 16}
derivatives: {n_samples: 64}
bcd: {time_budget: null, max_steps: 2, checkpoint_every_s: null}
export: {dir: out}
"""
LLM = """\
model: {kind: causal_lm, builtin: tiny_llama, device: cpu}
calibration: {source: pydoc, n_samples: 8, seq_len: 32, batch_size: 4}
eval: {n_samples: 4, seq_len: 32, batch_size: 4, every_s: null, before: false}
blocks: {block_size: 32, k: 16}
derivatives: {n_samples: 8}
bcd: {time_budget: null, max_steps: 2, checkpoint_every_s: null}
export: {dir: out}
"""
_ENOSPC_LAUNCHER = (
    "import errno, os, sys, torch; from icbs import cli\n"
    "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
    "setattr({target}, full)\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


@dataclasses.dataclass
class Case:
    """One bad input: the CLI arguments, the files to create first, and what the error line must name."""

    name: str
    args: list[str]
    expect: str
    files: dict[str, str | bytes] = dataclasses.field(default_factory=dict)
    setup: Callable[[Path], Callable[[], None] | None] | None = None
    launcher: str | None = None


def _base(**changes: str) -> dict[str, str | bytes]:
    """``c.yaml`` = the base config with some lines of YAML appended (later keys win inside --set only)."""
    return {"c.yaml": BASE + "".join(f"{line}\n" for line in changes.values())}


def _yaml(text: str) -> dict[str, str | bytes]:
    return {"c.yaml": text}


def _prune(*extra: str) -> list[str]:
    return ["prune", "c.yaml", "--no-progress", *extra]


def _set(*overrides: str) -> list[str]:
    return _prune(*[arg for item in overrides for arg in ("--set", item)])




def _npz(tmp: Path, **arrays: Any) -> None:
    import numpy as np

    np.savez(tmp / "data.npz", **arrays)


def _make_out(files: dict[str, str | bytes]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for name, content in files.items():
            path = tmp / "out" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def _checkpoint(config_changes: dict[str, Any]) -> Callable[[Path], None]:
    """An ``out/checkpoint.pt`` that loads, made under the base config with ``config_changes``."""

    def setup(tmp: Path) -> None:
        import yaml

        from icbs.checkpoint import save_checkpoint
        from icbs.config import config_from_dict

        data = yaml.safe_load(BASE)
        for section, values in config_changes.items():
            data[section].update(values)
        (tmp / "out").mkdir()
        (tmp / "out" / "config.yaml").write_text(BASE)
        save_checkpoint(tmp / "out" / "checkpoint.pt",
                        {"state": {"layers": {}}, "driver": {"step": 3}, "rng": {}, "config": config_from_dict(data).to_dict()})

    return setup


def _torch_file(obj_factory: Callable[[], Any]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import torch

        (tmp / "out").mkdir()
        (tmp / "out" / "config.yaml").write_text(BASE)
        torch.save(obj_factory(), tmp / "out" / "checkpoint.pt")

    return setup


def _read_only_parent(tmp: Path) -> Callable[[], None]:
    """``locked/`` that nobody may write into: ``chattr +i`` for root (permissions do not stop root), else 0o555."""
    locked = tmp / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
        return lambda: subprocess.run(["chattr", "-i", str(locked)], check=True)
    locked.chmod(0o555)
    return lambda: locked.chmod(0o755)


def cases() -> list[Case]:
    """The bad inputs, grouped: config file, values, --set, model, data, layer fit, output folder, CLI, I/O."""
    llm_text = {"c.yaml": LLM}
    out: list[Case] = [
        # --- the config file itself
        Case("config file missing", ["prune", "nope.yaml"], "nope.yaml"),
        Case("config path is a folder", ["prune", "cfgdir"], "cfgdir", setup=lambda t: (t / "cfgdir").mkdir() and None),
        Case("invalid YAML (unclosed bracket)", _prune(), "c.yaml", _yaml("blocks: [unclosed\n")),
        Case("invalid YAML (bad indentation)", _prune(), "c.yaml", _yaml("blocks:\n  k: 3\n block_size: 8\n")),
        Case("binary config file", _prune(), "c.yaml", {"c.yaml": b"\xff\xfe\x00\x01binary"}),
        Case("config is a list", _prune(), "c.yaml", _yaml("- a\n- b\n")),
        Case("config is a scalar", _prune(), "c.yaml", _yaml("42\n")),
        Case("duplicate section", _prune(), "'pruning'", _yaml(BASE + "pruning: {density: 0.9}\n")),
        Case("duplicate key in a section", _prune(), "'pruning.density'",
             _yaml("pruning:\n  density: 0.1\n  density: 0.9\n")),
        Case("python tag in YAML", _prune(), "c.yaml", _yaml("model: !!python/object/apply:os.system ['echo hi']\n")),
        Case("unknown section", _prune(), "'bloks'", _yaml("bloks: {block_size: 8}\n")),
        Case("unknown key", _prune(), "'blocks.blok_size'", _yaml("blocks: {blok_size: 8}\n")),
        # --- wrong types and values
        Case("string for an int", _prune(), "'blocks.block_size'", _yaml("blocks: {block_size: big}\n")),
        Case("float for an int", _prune(), "'blocks.block_size'", _yaml("blocks: {block_size: 1.5}\n")),
        Case("bool for an int", _prune(), "'blocks.block_size'", _yaml("blocks: {block_size: true}\n")),
        Case("string for a bool", _prune(), "'export.plots'", _yaml("export: {plots: maybe}\n")),
        Case("number for a list", _prune(), "'model.include'", _yaml("model: {include: 3}\n")),
        Case("list for a mapping", _prune(), "'solver.params'", _yaml("solver: {params: [1, 2]}\n")),
        Case("scalar for a section", _prune(), "'blocks'", _yaml("blocks: 5\n")),
        Case("density 0", _prune(), "'pruning.density'", _yaml("pruning: {density: 0}\n")),
        Case("density above 1", _prune(), "'pruning.density'", _yaml("pruning: {density: 1.5}\n")),
        Case("density NaN", _prune(), "'pruning.density'", _yaml("pruning: {density: .nan}\n")),
        Case("pattern 4:2", _prune(), "'pruning.pattern'", _yaml("pruning: {pattern: 4:2}\n")),
        Case("pattern 2:4 with density 0.3", _prune(), "'pruning.density'",
             _yaml("pruning: {pattern: 2:4, density: 0.3}\nblocks: {block_size: 32, k: 16}\n")),
        Case("unknown pattern", _prune(), "'pruning.pattern'", _yaml("pruning: {pattern: diagonal}\n")),
        Case("block_size 1", _prune(), "'blocks.block_size'", _yaml("blocks: {block_size: 1, k: 1}\n")),
        Case("blocks.k 0", _prune(), "'blocks.k'", _yaml("blocks: {block_size: 8, k: 0}\n")),
        Case("blocks.k = block_size", _prune(), "'blocks.k'", _yaml("blocks: {block_size: 8, k: 8}\n")),
        Case("block_size not a multiple of M", _prune(), "'blocks.block_size'",
             _yaml("pruning: {pattern: 2:4, density: 0.5}\nblocks: {block_size: 30, k: 15}\n")),
        Case("tabu_frac 1", _prune(), "'blocks.tabu_frac'", _yaml("blocks: {tabu_frac: 1.0}\n")),
        Case("fix_frac_prune above 1", _prune(), "'scoring.fix_frac_prune'", _yaml("scoring: {fix_frac_prune: 1.2}\n")),
        Case("unparsable duration", _prune(), "'bcd.time_budget'", _yaml("bcd: {time_budget: 10 minutes}\n")),
        Case("negative duration", _prune(), "'bcd.time_budget'", _yaml("bcd: {time_budget: -5}\n")),
        Case("no stop condition", _prune(), "'bcd.time_budget'", _yaml("bcd: {time_budget: null}\n")),
        Case("negative max_steps", _prune(), "'bcd.max_steps'", _yaml("bcd: {max_steps: -1}\n")),
        Case("unknown solver", _prune(), "'solver.name'", _yaml("solver: {name: quantum}\n")),
        Case("unknown solver parameter", _prune(), "'solver.params'", _yaml("solver: {name: anneal, params: {sweeps: 5}}\n")),
        Case("bad solver parameter value", _prune(), "'solver.params'",
             _yaml("solver: {name: anneal, params: {num_sweeps: -1}}\n")),
        Case("unknown estimator", _prune(), "'derivatives.estimator'", _yaml("derivatives: {estimator: newton}\n")),
        Case("unknown check mode", _prune(), "'bcd.check'", _yaml("bcd: {check: sometimes}\n")),
        Case("unknown dtype", _prune(), "'model.dtype'", _yaml("model: {dtype: float8}\n")),
        Case("device string", _prune(), "'model.device'", _yaml("model: {device: gpu}\n")),
        Case("invalid regex in include", _prune(), "'model.include'", _yaml("model: {include: ['fc(']}\n")),
        Case("text source without a path", _prune(), "'calibration.path'", _yaml("calibration: {source: text}\n")),
        Case("eval.batch_size 0", _prune(), "'eval.batch_size'", _yaml("eval: {batch_size: 0}\n")),
        Case("builtin and path both set", _prune(), "'model.builtin'", _yaml("model: {builtin: mnist_mlp, path: x}\n")),
        # --- --set
        Case("--set without '='", _set("blocks.k"), "blocks.k", _base()),
        Case("--set with an empty key", _set("=3"), "'=3'", _base()),
        Case("--set value is invalid YAML", _set("solver.params={a: [1,"), "'solver.params'", _base()),
        Case("--set through a scalar", _set("pruning.density.x=1"), "'pruning.density.x'", _base()),
        Case("--set unknown key", _set("bcd.budget=10m"), "'bcd.budget'", _base()),
        Case("--set duplicate key in its value", _set("solver.params={a: 1, a: 2}"), "'solver.params.a'", _base()),
        Case("--set pattern 2:4 with density 0.1 (read as 2:4)", _set("pruning.pattern=2:4", "pruning.density=0.1"),
             "2/4", _base()),
        # --- the model (checked before the output folder is created)
        Case("unknown builtin", _set("model.builtin=resnet9000"), "'model.builtin'", _base()),
        Case("classifier model.path missing", _set("model.builtin=null", "model.path=./nowhere"), "'model.path'", _base()),
        Case("causal_lm model.path missing", _set("model.builtin=null", "model.kind=causal_lm", "model.path=./nowhere"),
             "'model.path'", _base()),
        Case("gguf_file missing", _set("model.builtin=null", "model.kind=causal_lm", "model.gguf_file=/nowhere/m.gguf"),
             "'model.gguf_file'", _base()),
        Case("kind does not fit the builtin", _set("model.kind=image_classifier"), "'model.kind'", llm_text),
        Case("model.device=cuda without a GPU", _set("model.device=cuda"), "'model.device'", _base()),
        Case("model.device=mps on Linux", _set("model.device=mps"), "'model.device'", _base()),
        Case("include matches nothing", _set("model.include=[attention]"), "'model.include'", _base()),
        Case("exclude leaves nothing", _set("model.exclude=[fc]"), "'model.include'/'model.exclude'", _base()),
        # --- the data
        Case("more calibration samples than the corpus", _set("calibration.n_samples=5000"), "'calibration.n_samples'",
             _base()),
        Case("npz file missing", _set("calibration.source=npz", "calibration.path=missing.npz"), "'calibration.path'",
             _base()),
        Case("npz without a y array", _set("calibration.source=npz", "calibration.path=data.npz"), "'calibration.path'",
             _base(), setup=lambda t: _npz(t, x=__import__("numpy").zeros((10, 784), "float32"))),
        Case("npz x and y of different lengths", _set("calibration.source=npz", "calibration.path=data.npz"),
             "'calibration.path'", _base(),
             setup=lambda t: _npz(t, x=__import__("numpy").zeros((10, 784), "float32"), y=__import__("numpy").zeros(9))),
        Case("text source for a classifier", _set("calibration.source=pydoc"), "'calibration.source'", _base()),
        Case("image source for a causal LM", _set("calibration.source=mnist"), "'calibration.source'", llm_text),
        Case("text file missing", _set("calibration.source=text", "calibration.path=nowhere.txt"),
             "'calibration.path'", llm_text),
        Case("empty text file", _set("calibration.source=text", "calibration.path=empty.txt"), "'calibration.path'",
             {**llm_text, "empty.txt": "  \n"}),
        Case("window longer than the corpus", _set("calibration.source=text", "calibration.path=short.txt"),
             "'calibration.seq_len'", {**llm_text, "short.txt": "a few words only\n"}),
        Case("more calibration windows than the text holds", _set("calibration.n_samples=100000"),
             "'calibration.n_samples'", llm_text),
        Case("singular X X^T under zero damping (sparsegpt init)",
             _set("scoring.init_method=sparsegpt", "scoring.init_damping_frac=0", "calibration.n_samples=8",
                  "calibration.batch_size=8", "derivatives.n_samples=8"), "'scoring.init_damping_frac'", _base()),
        Case("more samples per estimate than calibration samples", _set("derivatives.n_samples=512"),
             "'derivatives.n_samples'", _base()),
        # --- settings against the layers (need the model)
        Case("block_size larger than a layer", _set("blocks.block_size=40000", "blocks.k=100"), "'blocks.block_size'",
             _base()),
        Case("tiny density", _set("pruning.density=1e-6"), "'pruning.density'", _base()),
        Case("density that keeps whole rows", _set("pruning.pattern=per_output", "pruning.density=0.999"),
             "'pruning.density'", _base()),
        Case("N:M that does not divide a layer", _set("pruning.pattern=1:3", "pruning.density=0.3333333333333333",
                                                      "blocks.block_size=33"), "'pruning.pattern'", _base()),
        Case("block_size above the solver's limit", _set("solver.name=exhaustive"), "'blocks.block_size'", _base()),
        # --- the output folder
        Case("output folder not empty", _prune(), "already exists", _base(), setup=_make_out({"notes.txt": "mine"})),
        Case("output path is a file", _prune("--out", "file.txt"), "file.txt", {**_base(), "file.txt": "x"}),
        Case("output folder under a file", _prune("--out", "file.txt/out"), "file.txt", {**_base(), "file.txt": "x"}),
        Case("output folder in a read-only folder", _prune("--out", "locked/out"), "locked/out", _base(),
             setup=_read_only_parent),
        Case("--overwrite with --resume", _prune("--overwrite", "--resume"), "--overwrite", _base()),
        Case("--resume without a run", _prune("--resume"), "checkpoint", _base()),
        Case("--resume of a finished run", _prune("--resume"), "has finished", _base(),
             setup=_make_out({"config.yaml": BASE, "report.json": "{}"})),
        Case("--resume with an empty checkpoint", _prune("--resume"), "checkpoint.pt", _base(),
             setup=_make_out({"config.yaml": BASE, "checkpoint.pt": b""})),
        Case("--resume with a text file as checkpoint", _prune("--resume"), "checkpoint.pt", _base(),
             setup=_make_out({"config.yaml": BASE, "checkpoint.pt": b"not a checkpoint"})),
        Case("--resume with an unrelated torch file", _prune("--resume"), "checkpoint.pt", _base(),
             setup=_torch_file(lambda: {"version": 1, "weights": __import__("torch").zeros(3)})),
        Case("--resume with pickled objects", _prune("--resume"), "checkpoint.pt", _base(),
             setup=_torch_file(lambda: {"version": 1, "model": __import__("torch").nn.Linear(2, 2)})),
        Case("--resume with a changed setting", _prune("--resume"), "'pruning.density'", _base(),
             setup=_checkpoint({"pruning": {"density": 0.3}})),
        Case("baseline into a non-empty folder", ["baseline", "magnitude", "c.yaml", "--out", "out"], "--overwrite",
             _base(), setup=_make_out({"notes.txt": "mine"})),
        Case("export-blocks --n-blocks 0", ["export-blocks", "c.yaml", "--out", "out", "--n-blocks", "0"], "'n_blocks'",
             _base()),
        # --- the command line
        Case("unknown command", ["frobnicate", "c.yaml"], "frobnicate", _base()),
        Case("config argument missing", ["prune"], "config", _base()),
        Case("unknown option", ["prune", "c.yaml", "--fast"], "--fast", _base()),
        Case("unknown baseline method", ["baseline", "obs", "c.yaml"], "'obs'", _base()),
        Case("--n-blocks not an int", ["export-blocks", "c.yaml", "--out", "out", "--n-blocks", "many"], "many", _base()),
        Case("evaluate a missing --model-dir", ["evaluate", "c.yaml", "--model-dir", "gone"], "gone", _base()),
        Case("evaluate a folder icbs did not write", ["evaluate", "c.yaml", "--model-dir", "empty"], "'model.path'",
             _base(), setup=lambda t: (t / "empty").mkdir() and None),
        # --- I/O failures after the pre-flight (simulated full disk)
        Case("disk full writing config.yaml", _prune(), "config.yaml", _base(),
             launcher=_ENOSPC_LAUNCHER.format(target="os, 'fsync'")),
        Case("disk full writing the first checkpoint", _prune(), "checkpoint.pt", _base(),
             launcher=_ENOSPC_LAUNCHER.format(target="torch, 'save'")),
    ]
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (files) or -1 (folders: the write probe of the
    output-folder check creates and deletes a file, which changes only a folder's mtime)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(folder.rglob("*"))}


def run_case(case: Case, timeout: float = 300) -> dict[str, Any]:
    """Run one case in a fresh folder; returns its exit code, error lines, and whether files were left behind."""
    with tempfile.TemporaryDirectory(prefix="icbs-bad-") as name:
        tmp = Path(name)
        for rel, content in case.files.items():
            (tmp / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
        cleanup = case.setup(tmp) if case.setup is not None else None
        try:
            before = _snapshot(tmp)
            env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            command = [sys.executable, "-c", case.launcher] if case.launcher else [sys.executable, "-m", "icbs"]
            started = time.perf_counter()
            result = subprocess.run(command + case.args, cwd=tmp, env=env, capture_output=True, text=True,
                                    timeout=timeout, check=False)
            seconds = time.perf_counter() - started
            after = _snapshot(tmp)
        finally:
            if cleanup is not None:
                cleanup()
    errors = [line for line in result.stderr.splitlines() if line.startswith("icbs: error:")]
    return {
        "case": case.name,
        "exit": result.returncode,
        "errors": errors,
        "traceback": "Traceback" in result.stderr,
        "names_expected": bool(errors) and case.expect in errors[0],
        "left_behind": sorted(set(after) ^ set(before) | {k for k in after if k in before and after[k] != before[k]}),
        "seconds": seconds,
        "stderr_tail": result.stderr[-600:] if len(errors) != 1 else "",
    }


def _ok(row: dict[str, Any]) -> bool:
    return row["exit"] == 2 and len(row["errors"]) == 1 and not row["traceback"] and row["names_expected"] \
        and not row["left_behind"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if shutil.which("chattr") is None and os.geteuid() == 0:
        print("note: chattr missing; the read-only case cannot lock its folder", file=sys.stderr)
    rows = [run_case(case) for case in cases() if args.only is None or args.only in case.name]
    print("| # | bad input | exit | message | ok |")
    print("|---|---|---|---|---|")
    for i, row in enumerate(rows, 1):
        message = (row["errors"][0] if row["errors"] else row["stderr_tail"].strip().splitlines()[-1:] or [""])
        message = message if isinstance(message, str) else message[0]
        message = message.replace("|", "\\|")
        print(f"| {i} | {row['case']} | {row['exit']} | `{message}` | {'yes' if _ok(row) else '**no**'} |")
    left = sum(bool(row["left_behind"]) for row in rows)
    print(f"\n{len(rows)} cases; {sum(_ok(r) for r in rows)} refused cleanly (exit 2, one line naming the key or "
          f"file, no traceback); {left} left files behind.")
    for row in rows:
        if not _ok(row):
            print(f"- {row['case']}: exit {row['exit']}, errors {row['errors']}, left {row['left_behind']}, "
                  f"tail {row['stderr_tail']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(_ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
