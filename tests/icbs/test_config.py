"""Tests for icbs.config: every error names the key, overrides, durations, patterns, round trips."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from icbs.config import (
    IcbsConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_duration,
    parse_pattern,
)
from icbs.exceptions import ConfigError


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_config_defaults_are_valid():
    cfg = config_from_dict({})
    assert isinstance(cfg, IcbsConfig)
    assert cfg.model.builtin == "mnist_mlp"
    assert cfg.blocks.k <= cfg.blocks.block_size


def test_config_unknown_key_names_key_and_valid_keys():
    message = _error({"blocks": {"blok_size": 64}})
    assert "'blocks.blok_size'" in message
    assert "block_size" in message and "tabu_frac" in message


def test_config_unknown_section_names_valid_sections():
    message = _error({"bloks": {"block_size": 64}})
    assert "'bloks'" in message
    assert "blocks" in message and "solver" in message


@pytest.mark.parametrize(
    ("data", "key", "got"),
    [
        ({"blocks": {"block_size": "big"}}, "blocks.block_size", "'big'"),
        ({"blocks": {"block_size": 1.5}}, "blocks.block_size", "1.5"),
        ({"pruning": {"density": "half"}}, "pruning.density", "'half'"),
        ({"export": {"overwrite": "yes"}}, "export.overwrite", "'yes'"),
        ({"model": {"include": 3}}, "model.include", "3"),
        ({"solver": {"params": [1, 2]}}, "solver.params", "[1, 2]"),
        ({"blocks": 5}, "blocks", "5"),
    ],
)
def test_config_wrong_type_names_key_and_value(data, key, got):
    message = _error(data)
    assert f"'{key}'" in message
    assert message.endswith(f"got {got}")


def test_config_bool_is_not_an_int():
    assert "'blocks.block_size'" in _error({"blocks": {"block_size": True}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"blocks": {"block_size": -4}}, "blocks.block_size"),
        ({"blocks": {"block_size": 0}}, "blocks.block_size"),
        ({"blocks": {"block_size": 8, "k": 9}}, "blocks.k"),
        ({"blocks": {"tabu_frac": 1.0}}, "blocks.tabu_frac"),
        ({"pruning": {"density": 0.0}}, "pruning.density"),
        ({"pruning": {"density": 1.0}}, "pruning.density"),
        ({"pruning": {"density": 1.5}}, "pruning.density"),
        ({"pruning": {"pattern": "2:4", "density": 0.3}}, "pruning.density"),
        ({"pruning": {"pattern": "4:2"}}, "pruning.pattern"),
        ({"pruning": {"allocation": "greedy"}}, "pruning.allocation"),
        ({"pruning": {"allocation": "owl", "pattern": "2:4", "density": 0.5}}, "pruning.allocation"),
        ({"pruning": {"owl_lambda": -0.01}}, "pruning.owl_lambda"),
        ({"pruning": {"owl_lambda": float("nan")}}, "pruning.owl_lambda"),
        ({"pruning": {"owl_lambda": float("inf")}}, "pruning.owl_lambda"),
        ({"pruning": {"allocation": "owl", "density": 0.05}}, "pruning.owl_lambda"),
        ({"pruning": {"allocation": "owl", "density": 0.95}}, "pruning.owl_lambda"),
        ({"pruning": {"allocation": "owl", "density": 0.5, "owl_lambda": 0.5}}, "pruning.owl_lambda"),
        ({"pruning": {"owl_threshold": 0.0}}, "pruning.owl_threshold"),
        ({"pruning": {"owl_threshold": -5.0}}, "pruning.owl_threshold"),
        ({"pruning": {"owl_threshold": float("inf")}}, "pruning.owl_threshold"),
        ({"pruning": {"pattern": "2:4", "density": 0.5}, "blocks": {"block_size": 30, "k": 10}}, "blocks.block_size"),
        ({"calibration": {"split": 1.0}}, "calibration.split"),
        ({"calibration": {"n_samples": 0}}, "calibration.n_samples"),
        ({"calibration": {"source": "text"}}, "calibration.path"),
        ({"derivatives": {"ridge": -1.0}}, "derivatives.ridge"),
        ({"derivatives": {"grad_multiplier": float("nan")}}, "derivatives.grad_multiplier"),
        ({"scoring": {"fix_frac_keep": 1.0}}, "scoring.fix_frac_keep"),
        ({"bcd": {"time_budget": None}}, "bcd.time_budget"),
        ({"bcd": {"time_budget": -5}}, "bcd.time_budget"),
        ({"bcd": {"workers": 0}}, "bcd.workers"),
        ({"bcd": {"check": "holdout"}}, "bcd.check"),
        ({"bcd": {"check_z": -1.0}}, "bcd.check_z"),
        ({"bcd": {"check_z": float("inf")}}, "bcd.check_z"),
        ({"model": {"builtin": "mnist_mlp", "include": ["(unclosed"]}}, "model.include"),
        ({"model": {"builtin": "mnist_mlp", "device": "gpu"}}, "model.device"),
        ({"model": {"builtin": None, "path": None}}, "model.path"),
    ],
)
def test_config_out_of_range_names_key(data, key):
    assert f"'{key}'" in _error(data)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.kind", "regressor"),
        ("derivatives.estimator", "bfgs"),
        ("scoring.init_method", "oracle"),
        ("scoring.selection_scope", "per_block"),
        ("calibration.source", "wikipedia"),
    ],
)
def test_config_bad_choice_lists_allowed_values(key, value):
    section, name = key.split(".")
    message = _error({section: {name: value}})
    assert f"'{key}'" in message and repr(value) in message
    # "one of 'a', 'b', ..." lists every allowed value
    assert re.search(r"one of '[^']+'(, '[^']+')+", message)


def test_config_unknown_solver_lists_registered_solvers():
    import solvers

    message = _error({"solver": {"name": "quantum-magic"}})
    assert "'solver.name'" in message and "'quantum-magic'" in message
    for name in solvers.available_solvers():
        assert repr(name) in message


def test_config_unknown_solver_param_names_it_and_valid_params():
    import solvers

    message = _error({"solver": {"name": "anneal", "params": {"num_sweep": 10}}})
    assert "'solver.params'" in message and "num_sweep" in message
    for valid in solvers.get_solver_class("anneal").parameters:
        assert valid in message


def test_config_solver_swap_keeps_params_checked():
    # --set solver.name=X keeps solver.params: params that X does not know are an error, not silently dropped.
    with pytest.raises(ConfigError, match="solver.params"):
        config_from_dict({"solver": {"name": "exhaustive", "params": {"num_sweeps": 10}}})


def test_config_overrides_set_nested_values_with_yaml_types():
    data = apply_overrides(
        {"blocks": {"block_size": 64}},
        ["blocks.k=8", "solver.params.num_sweeps=50", "model.include=[fc1, fc2]", "bcd.max_steps=null",
         "export.dir=runs/x"],
    )
    assert data["blocks"] == {"block_size": 64, "k": 8}
    assert data["solver"]["params"] == {"num_sweeps": 50}
    assert data["model"]["include"] == ["fc1", "fc2"]
    assert data["bcd"]["max_steps"] is None
    assert data["export"]["dir"] == "runs/x"


def test_config_overrides_do_not_mutate_input():
    original = {"blocks": {"block_size": 64}}
    apply_overrides(original, ["blocks.block_size=32"])
    assert original == {"blocks": {"block_size": 64}}


@pytest.mark.parametrize("bad", ["blocks.k", "=3", "blocks..k=3"])
def test_config_malformed_override_raises(bad):
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({}, [bad])


def test_config_override_through_a_scalar_raises():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"blocks": 3}, ["blocks.k=2"])


def test_load_config_applies_overrides_and_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"blocks": {"block_size": 64, "k": 16}, "bcd": {"time_budget": "2m"}}))
    cfg = load_config(path, overrides=["blocks.k=32", "solver.name=exhaustive"])
    assert (cfg.blocks.block_size, cfg.blocks.k) == (64, 32)
    assert cfg.solver.name == "exhaustive"
    assert cfg.bcd.time_budget == 120.0
    with pytest.raises(ConfigError, match="'blocks.k'"):
        load_config(path, overrides=["blocks.k=65"])


def test_load_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("1h30m", 5400.0),
     ("1m30s", 90.0), (" 2H ", 7200.0), (None, None)],
)
def test_parse_duration_accepts_numbers_and_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "10x", "-5", 0, -1, True, [10], "m"])
def test_parse_duration_rejects_bad_values_naming_key(bad):
    with pytest.raises(ConfigError, match="'bcd.time_budget'"):
        parse_duration(bad)


def test_parse_pattern_kinds():
    assert parse_pattern("unstructured") == ("unstructured", 0, 0)
    assert parse_pattern("per_output") == ("per_output", 0, 0)
    assert parse_pattern("2:4") == ("nm", 2, 4)
    with pytest.raises(ConfigError, match="'pruning.pattern'"):
        parse_pattern("2-4")


def test_config_to_dict_round_trips_through_yaml():
    cfg = config_from_dict({"model": {"builtin": "mnist_mlp", "include": ["fc"]}, "bcd": {"time_budget": "5m"},
                            "solver": {"name": "anneal", "params": {"num_sweeps": 20}}})
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert again.model.include == ("fc",)


def test_config_is_frozen():
    cfg = config_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.blocks.k = 3  # type: ignore[misc]


def test_load_config_reads_n_m_patterns_unquoted_as_the_readme_writes_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pruning:\n  density: 0.5\n  pattern: 2:4\nblocks:\n  block_size: 64\n  k: 32\n")
    assert load_config(path).pruning.pattern == "2:4"
    assert load_config(path, overrides=["pruning.pattern=4:8"]).pruning.pattern == "4:8"
    assert parse_pattern(load_config(path).pruning.pattern) == ("nm", 2, 4)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("-2.5E+2", -250.0), (".5", 0.5), ("12", 12), ("0x10", 16), ("1_000", 1000), ("1:30", "1:30"),
     ("true", True), ("null", None), ("[a, 2:4]", ["a", "2:4"])],
)
def test_load_yaml_numbers_follow_yaml_1_2(text, value):
    from icbs.config import load_yaml

    assert load_yaml(text, "test") == value


def test_load_config_duplicate_key_names_the_dotted_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("pruning:\n  density: 0.1\nblocks:\n  k: 8\npruning:\n  density: 0.9\n")
    with pytest.raises(ConfigError, match=r"key 'pruning' appears twice \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("pruning:\n  density: 0.1\n  density: 0.9\n")
    with pytest.raises(ConfigError, match=r"config file '.*dup.yaml': key 'pruning.density' appears twice"):
        load_config(path)


def test_override_with_invalid_yaml_names_the_key():
    with pytest.raises(ConfigError, match=r"--set 'solver.params' value .* is not valid YAML") as info:
        apply_overrides({}, ["solver.params={num_sweeps: [1,"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"key 'solver.params.a' appears twice"):
        apply_overrides({}, ["solver.params={a: 1, a: 2}"])
    # Repeating a --set is an override, not a duplicate: the last one wins.
    assert apply_overrides({}, ["blocks.k=3", "blocks.k=4"])["blocks"]["k"] == 4


def test_load_config_refuses_python_tags_and_binary_files(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="evil.yaml' is not valid YAML: could not determine a constructor"):
        load_config(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)


def test_model_section_without_a_model_gets_the_default_builtin():
    assert config_from_dict({"model": {"device": "cpu"}}).model.builtin == "mnist_mlp"
    assert config_from_dict({"model": None}).model.builtin == "mnist_mlp"
    assert config_from_dict({"model": {"kind": "causal_lm", "path": "x"}}).model.builtin is None
    assert "'model.builtin'" in _error({"model": {"builtin": "mnist_mlp", "path": "x"}})
    assert config_from_dict({"model": {"kind": "causal_lm", "gguf_file": "/m.gguf"}}).model.gguf_file == "/m.gguf"


@pytest.mark.parametrize(("k", "block_size"), [(0, 8), (8, 8), (-1, 8)])
def test_blocks_k_must_leave_pruned_and_kept_weights_in_a_block(k, block_size):
    assert "'blocks.k'" in _error({"blocks": {"block_size": block_size, "k": k}})


def test_blocks_block_size_of_one_is_refused():
    assert "'blocks.block_size' should be an int >= 2" in _error({"blocks": {"block_size": 1, "k": 1}})
