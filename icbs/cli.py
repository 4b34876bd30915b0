"""The ``icbs`` command line: parse arguments, load the config, call a pipeline in :mod:`icbs.runner`, print a summary.

Commands::

    icbs prune CONFIG [--set k=v ...] [--resume] [--overwrite] [--out DIR] [--debug]
    icbs evaluate CONFIG [--model-dir DIR]
    icbs baseline {magnitude,wanda,sparsegpt,random,alps} CONFIG [--out DIR] [--overwrite] [--no-progress]
    icbs export-blocks CONFIG --out DIR [--n-blocks N]

Exit codes: 0 success, 2 bad config or input or a file that cannot be read or written (the message names
the key or file), 130 interrupted (Ctrl-C or SIGTERM; a checkpoint is kept for ``--resume``), 1 any other
failure. Errors are one line on stderr (``icbs: error: ...``); ``--debug`` adds the traceback and debug
logging. This is the only module that configures logging handlers and signal handlers.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icbs.runner import RunOutcome

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

logger = logging.getLogger("icbs.cli")


class _TqdmHandler(logging.StreamHandler):
    """Write log lines through ``tqdm.write`` so they do not break an active progress bar.

    The stream is ``sys.stderr`` as it is when a line is written (not when the handler was made), so a
    caller that swaps ``sys.stderr`` (tests, embedding code) never gets lines written to a closed stream.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(debug: bool, quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    for name in ("icbs", "solvers"):
        logging.getLogger(name).setLevel(level)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``icbs: error:`` line, exit code 2 (subcommands inherit it)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"icbs: error: {message} (see '{self.prog} --help')\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see README: config reference)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set solver.name=cpsat (repeatable)")
    parser.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``icbs`` command."""
    from icbs import __version__
    from icbs.runner import BASELINE_METHODS

    parser = _Parser(
        prog="icbs", description="Prune neural networks with the iterative Combinatorial Brain Surgeon.")
    parser.add_argument("--version", action="version", version=f"icbs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser("prune", help="prune a model with icbs (block coordinate descent)")
    _add_common(prune)
    prune.add_argument("--out", help="output folder (default: export.dir)")
    prune.add_argument("--overwrite", action="store_true", help="replace the icbs outputs of an existing folder")
    prune.add_argument("--resume", action="store_true", help="continue the run checkpointed in the output folder")

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

    SIGTERM is turned into ``KeyboardInterrupt`` while a command runs, so that ``kill`` stops a run the way
    Ctrl-C does (the driver keeps a checkpoint; the command exits with 130 and says how to resume).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug, args.quiet)
    from icbs.exceptions import OutputExistsError

    previous = _catch_sigterm()
    try:
        return _run(args)
    except (ValueError, OSError, OutputExistsError) as err:
        # Bad config or input (ConfigError is a ValueError), a refused folder, a file that cannot be
        # read or written (OSError, whose message names the file).
        return _fail(err, args.debug, EXIT_USAGE)
    except KeyboardInterrupt as err:
        print(f"icbs: interrupted; {_interrupted(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the CLI's job is to turn any failure into one line and code 1
        return _fail(err, args.debug, EXIT_FAILURE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _catch_sigterm() -> object | None:
    """Install the SIGTERM handler (main thread only); return the previous one."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _interrupted(err: KeyboardInterrupt) -> str:
    """What an interrupted command left behind and how to go on, in one line."""
    from icbs.runner import Interrupted

    if not isinstance(err, Interrupted):
        return "nothing was written"
    if err.checkpoint is None:
        return f"stopped before the first checkpoint; {str(err.out_dir)!r} is left as it was"
    return (f"checkpoint kept in {str(err.checkpoint)!r}; continue with the same command and --resume")


def _fail(err: BaseException, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exception(err)
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        message = " ".join(str(err.strerror).split())
        if err.filename is not None and str(err.filename) not in message:
            message = f"{str(err.filename)!r}: {message}"
    if code == EXIT_FAILURE:
        message = f"{type(err).__name__}: {message}"
    print(f"icbs: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
