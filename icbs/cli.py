"""The ``icbs`` command line: parse arguments, load the config, call a pipeline in :mod:`icbs.runner`, print a summary.

Commands::

    icbs prune CONFIG [--set k=v ...] [--resume] [--overwrite] [--out DIR] [--debug]
    icbs evaluate CONFIG [--model-dir DIR]
    icbs baseline {magnitude,wanda,sparsegpt,random} CONFIG [--out DIR] [--overwrite]
    icbs export-blocks CONFIG --out DIR [--n-blocks N]

Exit codes: 0 success, 2 bad config or input (the message names the key or file), 1 any other failure.
Errors are one line on stderr (``icbs: error: ...``); ``--debug`` adds the traceback and debug logging.
This is the only module that configures logging handlers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icbs.runner import RunOutcome

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

logger = logging.getLogger("icbs.cli")


class _TqdmHandler(logging.StreamHandler):
    """Write log lines through ``tqdm.write`` so they do not break an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(debug: bool, quiet: bool) -> None:
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    for name in ("icbs", "solvers"):
        logging.getLogger(name).setLevel(level)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see README: config reference)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set solver.name=cpsat (repeatable)")
    parser.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final summary")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``icbs`` command."""
    from icbs import __version__
    from icbs.runner import BASELINE_METHODS

    parser = argparse.ArgumentParser(
        prog="icbs", description="Prune neural networks with the iterative Combinatorial Brain Surgeon.")
    parser.add_argument("--version", action="version", version=f"icbs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser("prune", help="prune a model with icbs (block coordinate descent)")
    _add_common(prune)
    prune.add_argument("--out", help="output folder (default: export.dir)")
    prune.add_argument("--overwrite", action="store_true", help="replace the icbs outputs of an existing folder")
    prune.add_argument("--resume", action="store_true", help="continue the run checkpointed in the output folder")
    prune.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="metric and density of the configured or a saved model")
    _add_common(evaluate)
    evaluate.add_argument("--model-dir", help="a run's output folder (or its model/ folder) to evaluate")

    baseline = commands.add_parser("baseline", help="prune with a one-shot baseline, same data and density")
    baseline.add_argument("method", choices=BASELINE_METHODS, help="the baseline method")
    _add_common(baseline)
    baseline.add_argument("--out", help="output folder (default: export.dir + '-' + METHOD)")
    baseline.add_argument("--overwrite", action="store_true", help="replace the icbs outputs of an existing folder")

    blocks = commands.add_parser("export-blocks", help="dump the block problems of a short run as files")
    _add_common(blocks)
    blocks.add_argument("--out", required=True, help="output folder for the problem files")
    blocks.add_argument("--n-blocks", type=int, default=8, help="how many block problems to write (default 8)")
    blocks.add_argument("--overwrite", action="store_true", help="replace the icbs outputs of an existing folder")
    return parser


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if metric == "accuracy" else f"{value:.3f}"


def _summary(outcome: RunOutcome, command: str) -> str:
    metric = outcome.metric
    lines = []
    if command == "evaluate":
        lines.append(f"{metric}: {_fmt(outcome.final.get(metric), metric)}")
        if outcome.density is not None:
            lines.append(f"density of prunable layers: {outcome.density:.4f}")
        return "\n".join(lines)
    label = "icbs" if command == "prune" else outcome.report.get("method", command)
    rows = [("dense", outcome.dense), ("init", outcome.init), (label, outcome.final)]
    for name, metrics in rows:
        if command != "prune" and name == "init":
            continue
        lines.append(f"{metric} {name:>9}: {_fmt((metrics or {}).get(metric), metric)}")
    if outcome.density is not None:
        lines.append(f"density: {outcome.density:.4f} (target {outcome.report['density']['target']:g})")
    lines.append(f"outputs: {outcome.out_dir}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from icbs import runner
    from icbs.config import load_config

    cfg = load_config(args.config, overrides=args.overrides)
    if args.command == "prune":
        outcome = runner.run_prune(cfg, out_dir=args.out, overwrite=args.overwrite, resume=args.resume,
                                   progress=not (args.no_progress or args.quiet))
    elif args.command == "evaluate":
        outcome = runner.run_evaluate(cfg, model_dir=args.model_dir)
    elif args.command == "baseline":
        outcome = runner.run_baseline(args.method, cfg, out_dir=args.out, overwrite=args.overwrite)
    else:
        paths = runner.run_export_blocks(cfg, out_dir=args.out, n_blocks=args.n_blocks, overwrite=args.overwrite)
        print(f"wrote {len(paths)} block problems to {args.out}")
        return EXIT_OK
    print(_summary(outcome, args.command))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icbs`` console script; returns the exit code.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug, args.quiet)
    from icbs.exceptions import OutputExistsError

    try:
        return _run(args)
    except (ValueError, FileNotFoundError, OutputExistsError) as err:
        # Bad config or input: ConfigError (a ValueError), input checks, missing files, a refused folder.
        return _fail(err, args.debug, EXIT_USAGE)
    except KeyboardInterrupt:
        print("icbs: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's job is to turn any failure into one line and code 1
        return _fail(err, args.debug, EXIT_FAILURE)


def _fail(err: BaseException, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exception(err)
    message = " ".join(str(err).split()) or type(err).__name__
    if code == EXIT_FAILURE:
        message = f"{type(err).__name__}: {message}"
    print(f"icbs: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
