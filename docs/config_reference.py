"""Generate the config reference table of README.md from the dataclasses in :mod:`icbs.config`.

``python docs/config_reference.py`` prints the Markdown; ``python docs/config_reference.py --write`` replaces
the block between the ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` markers
in README.md. ``tests/icbs/test_examples.py`` checks that README.md is up to date and that every key
has a description here.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from icbs.config import IcbsConfig

__all__ = ["DESCRIPTIONS", "render", "update_readme", "START", "END"]

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"

DESCRIPTIONS: dict[str, str] = {
    "model.kind": "`classifier`, `causal_lm` or `image_classifier`",
    "model.builtin": "a model icbs builds: `mnist_mlp`, `deit_tiny` (trained and cached on first use), `smollm2`, `tiny_llama`; the default when `path` and `gguf_file` are unset",
    "model.path": "local folder/file or hub id (used when `builtin` is not set)",
    "model.gguf_file": "GGUF file inside `path` (or an absolute path); de-quantised on load",
    "model.dtype": "`float32`, `float16`, `bfloat16` or `float64`",
    "model.device": "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`",
    "model.device_map": "shard a Hugging Face model over devices with accelerate: `auto`, `balanced`, `balanced_low_0`, `sequential`, or a mapping module name -> device (`{\"\": cpu}`, `{model.layers.0: 0}`); replaces `device`",
    "model.include": "regexes (`re.search`) over `nn.Linear` module names to prune; empty = all but the output head (`lm_head`, `classifier`, `head`, `score`, else a classifier's last `nn.Linear`, e.g. `fc3` of `mnist_mlp`); naming the head includes it",
    "model.exclude": "regexes of layers to leave dense",
    "model.cache_dir": "where built-in models are cached (default `~/.cache/icbs`)",
    "calibration.source": "`pydoc`, `text`, `mnist`, `npz`, `hf_dataset` or `random_tokens`",
    "calibration.path": "file for `text`/`npz` sources",
    "calibration.hf_name": "dataset id for `hf_dataset`",
    "calibration.hf_config": "dataset config name for `hf_dataset`",
    "calibration.hf_split": "dataset split for `hf_dataset`",
    "calibration.text_column": "text column for `hf_dataset`",
    "calibration.n_samples": "calibration samples (token windows or images)",
    "calibration.seq_len": "tokens per calibration window",
    "calibration.batch_size": "samples per calibration batch",
    "calibration.split": "fraction of the corpus used for calibration; evaluation uses the rest",
    "calibration.seed": "seed of the sample draw",
    "calibration.n_validation": "the last this many calibration samples are a validation split: never estimated on, read only by `bcd.check: validation`",
    "calibration.targets": "what the loss compares outputs with: `labels` (the data's next tokens or classes) `dense` (KL divergence to the dense model's outputs, computed once before pruning), or `dense_check` (estimates on the labels, round check and reported losses on that KL)",
    "calibration.top_k": "with `targets: dense`/`dense_check`, the dense model's most likely outcomes kept per position (the rest are lumped into one)",
    "eval.n_samples": "held-out samples (text windows or images; 0 = all images)",
    "eval.seq_len": "tokens per evaluation window",
    "eval.batch_size": "samples per evaluation batch",
    "eval.every_s": "seconds between evaluations during a run (`null` = only before/after)",
    "eval.before": "evaluate the dense model first",
    "eval.lm_eval_tasks": "lm-eval-harness tasks run on the final (and, with `eval.before`, the dense) causal LM: "
                          "task names, task YAML files, folders that define tasks (see Zero-shot tasks; needs the `eval` extra)",
    "pruning.density": "fraction of weights KEPT in every pruned layer (with `allocation: owl`, over all of them), in (0, 1)",
    "pruning.pattern": "`unstructured`, `per_output` or `N:M` (e.g. `2:4`; then density must be N/M)",
    "pruning.allocation": "`uniform` (every layer at `density`) or `owl`: each decoder block (a layer outside blocks alone) at a density in `density ± owl_lambda`, higher where more of its Wanda scores are outliers, the total kept count the uniform one (not with N:M; docs/INTERNALS.md, Layer densities)",
    "pruning.owl_lambda": "`owl`: half-width of the layer density range; `density ± owl_lambda` must stay in (0, 1)",
    "pruning.owl_threshold": "`owl`: a weight is an outlier when its Wanda score exceeds this many times its block's mean",
    "scoring.init_method": "one-shot initial mask: `magnitude`, `wanda`, `gradient`, `random`, `sparsegpt` or `alps` (the last two also re-fit the kept weights)",
    "scoring.init_scope": "where the initial mask is ranked: `per_layer`, `per_output` or `per_input`",
    "scoring.selection_method": "score that picks each step's block candidates",
    "scoring.selection_scope": "ranking scope of the selection score",
    "scoring.fix_frac_prune": "lowest-scored fraction of the pruned set that stays pruned for good",
    "scoring.fix_frac_keep": "highest-scored fraction of the kept set that stays kept for good",
    "scoring.init_damping_frac": "Hessian damping (fraction of the mean diagonal) of the refitting inits `sparsegpt`/`alps`, also in `icbs baseline`; was `derivatives.damping_frac`",
    "scoring.init_n_samples": "calibration samples the init reads (the first of the estimation split; 0 = all): a large pool for the rounds without the init's cost growing with it",
    "blocks.block_size": "weights per block problem (QUBO variables)",
    "blocks.k": "currently-pruned weights in a block (the cardinality `Σx = k`); `k <= block_size`",
    "blocks.tabu_frac": "FIFO tabu memory as a fraction of a layer's free weights",
    "derivatives.estimator": "`fisher`, `exact`, `gradient_mean` or `layerwise` (DESIGN §4)",
    "derivatives.n_samples": "calibration samples per gradient/Hessian estimate",
    "derivatives.grad_multiplier": "α, the weight of the gradient term",
    "derivatives.ridge": "λ, the ridge term `λ‖Δ‖²`",
    "solver.name": "registered block solver (see the solver table)",
    "solver.params": "the solver's settings; unknown names are an error",
    "bcd.time_budget": "wall-clock budget: seconds or `90s`, `10m`, `2h`; `null` = none",
    "bcd.max_steps": "stop after this many steps",
    "bcd.max_epochs": "stop after this many passes over the layer schedule",
    "bcd.min_steps_per_layer": "minimum steps per layer in a pass",
    "bcd.blocks_per_round": "blocks (in different layers) solved from one derivative estimate",
    "bcd.check": "where a round must not raise the loss or is undone: `validation` (the `calibration.n_validation` split, never fitted on), `calibration` (every calibration "
    "sample; the calibration loss never rises), `fresh` (a random batch apart from the one the moves "
    "were fitted on), `batch` (the fitting batch: cheapest, but the loss drifts up late in long runs)",
    "bcd.check_z": "a round is kept only when its mean per-sample loss change on the checked samples plus this many standard errors is ≤ 0 (a one-sided paired test; 1.645 = the 5 % level); 0 keeps any round whose loss did not rise",
    "bcd.patience": "stop (reason `patience`) after this many rounds in a row kept no move: with `check: validation` the early stop once the validation loss stops falling; `null` = never",
    "bcd.workers": "block solves of a round run at the same time (masks do not depend on it)",
    "bcd.executor": "where those solves run: `thread` (a local pool) or `ray` (a Ray cluster)",
    "bcd.ray_address": "Ray cluster address for `bcd.executor: ray` (`null` starts a local runtime); checked before the model loads",
    "bcd.refit": "re-fit kept weights by damped least squares on each layer's reconstruction objective: `none`, `end` (once, at the end) or `rounds` (the rows each round's moves touched, before the round check)",
    "bcd.refit_damping": "damping of that refit (fraction of the mean diagonal of X Xᵀ/N)",
    "bcd.seed": "seed of every random choice of the run",
    "bcd.checkpoint_every_s": "seconds between checkpoints (`null` = none)",
    "export.dir": "output folder (`--out` overrides)",
    "export.overwrite": "replace the icbs outputs of an existing folder (`--overwrite`)",
    "export.save_model": "write the pruned model",
    "export.save_masks": "write `masks.safetensors`",
    "export.plots": "write the PNG plots",
}


def _type_text(tp: typing.Any) -> str:
    text = str(tp).replace("typing.", "").replace("collections.abc.", "")
    text = {"<class 'str'>": "str", "<class 'int'>": "int", "<class 'float'>": "float",
            "<class 'bool'>": "bool"}.get(text, text)
    return text.replace("NoneType", "None").replace(" | ", " or ")


def _default_text(value: typing.Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def render() -> str:
    """The Markdown table: key, type, default, meaning (one row per config key)."""
    defaults = IcbsConfig()
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section in dataclasses.fields(IcbsConfig):
        section_obj = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(section_obj))
        for item in dataclasses.fields(section_obj):
            key = f"{section.name}.{item.name}"
            default = getattr(section_obj, item.name)
            rows.append(f"| `{key}` | {_type_text(hints[item.name])} | {_default_text(default)} | "
                        f"{DESCRIPTIONS.get(key, '')} |")
    return "\n".join(rows)


def update_readme(readme: Path) -> bool:
    """Replace the marked block of ``readme`` with :func:`render`; return whether it changed."""
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":
    if "--write" in sys.argv:
        changed = update_readme(Path(__file__).resolve().parents[1] / "README.md")
        print("README.md updated" if changed else "README.md already up to date")
    else:
        print(render())
