"""``eval.lm_eval_tasks``: lm-evaluation-harness on the pruned model, with the real package and a local task.

The task is written into ``tmp_path`` (a JSON-lines dataset read by HF datasets' offline ``json`` builder and a
task YAML), so nothing touches the network.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icbs import runner
from icbs.cli import main
from icbs.config import EvalConfig, ModelConfig, load_config
from icbs.evaluation import check_lm_eval_tasks, evaluate_lm_eval
from icbs.exceptions import ConfigError
from icbs.models import load_model
from icbs.models.builtin import build_tiny_llama

pytest.importorskip("lm_eval")

_QUESTIONS = [
    ("The sky is", ["blue", "green", "red"], 0),
    ("Two plus two is", ["three", "four", "five"], 1),
    ("Water is", ["dry", "solid", "wet"], 2),
    ("Fire is", ["hot", "cold", "blue"], 0),
    ("Snow is", ["black", "white", "loud"], 1),
    ("The sun rises in the", ["west", "north", "east"], 2),
    ("A cat says", ["meow", "moo", "quack"], 0),
    ("Ice is", ["warm", "cold", "soft"], 1),
    ("One and one make", ["one", "three", "two"], 2),
    ("Grass is", ["green", "purple", "salty"], 0),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write_task(folder: Path, name: str = "icbs_tiny_mc") -> Path:
    """A multiple-choice task of ten questions in ``folder``; returns its YAML file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(
        json.dumps({"question": q, "choices": choices, "label": label}) + "\n" for q, choices, label in _QUESTIONS
    ))
    task = folder / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {json.dumps(str(data))}}}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf_cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: brier_score\n"  # continuous: it tells the dense model from the pruned one
        "    higher_is_better: false\n"
    )
    return task


def _tiny_llama_config(*overrides: str):
    return load_config(overrides=[
        "model.kind=causal_lm", "model.builtin=tiny_llama", "model.device=cpu",
        "calibration.source=pydoc", "calibration.n_samples=8", "calibration.seq_len=32", "calibration.batch_size=4",
        "eval.n_samples=4", "eval.seq_len=32", "eval.batch_size=4", "eval.every_s=null",
        "blocks.block_size=32", "blocks.k=16", "derivatives.estimator=fisher", "derivatives.n_samples=8",
        "bcd.time_budget=null", "bcd.max_steps=2", "export.plots=false", *overrides,
    ])


@pytest.mark.slow
def test_lm_eval_tasks_report_the_pruned_models_scores(tmp_path):
    task = _write_task(tmp_path / "tasks")
    cfg = _tiny_llama_config(f"eval.lm_eval_tasks=[{task}]")
    outcome = runner.run_prune(cfg, out_dir=tmp_path / "out", progress=False)

    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())["lm_eval"]
    assert on_disk == outcome.report["lm_eval"]
    for stage in ("dense", "final"):
        scores = on_disk[stage]["icbs_tiny_mc"]
        assert scores["sample_len"] == len(_QUESTIONS)
        assert 0.0 <= scores["acc"] <= 1.0
        assert scores["acc"] * len(_QUESTIONS) == pytest.approx(round(scores["acc"] * len(_QUESTIONS)))
        assert 0.0 < scores["brier_score"] < 2.0
    assert on_disk["dense"]["icbs_tiny_mc"]["brier_score"] != on_disk["final"]["icbs_tiny_mc"]["brier_score"]
    saved = load_model(ModelConfig(kind="causal_lm", path=str(tmp_path / "out" / "model"), device="cpu"))
    # A folder entry makes the tasks under it known by name.
    direct = evaluate_lm_eval(saved.model, saved.tokenizer, [f"{task.parent}/", "icbs_tiny_mc"], batch_size=4)
    assert direct == on_disk["final"]
    assert runner.run_evaluate(cfg, model_dir=tmp_path / "out").report["lm_eval"] == {"dense": None, "final": direct}


@pytest.mark.slow
def test_lm_eval_tasks_score_a_baseline(tmp_path):
    task = _write_task(tmp_path / "tasks")
    cfg = _tiny_llama_config(f"eval.lm_eval_tasks=[{task}]", "eval.before=false")
    outcome = runner.run_baseline("magnitude", cfg, out_dir=tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())["lm_eval"]
    assert on_disk == outcome.report["lm_eval"]
    assert on_disk["dense"] is None
    assert on_disk["final"]["icbs_tiny_mc"]["sample_len"] == len(_QUESTIONS)


def test_evaluate_lm_eval_leaves_the_global_random_state_alone(tmp_path):
    model, tokenizer = build_tiny_llama()
    task = _write_task(tmp_path)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    scores = evaluate_lm_eval(model, tokenizer, [str(task)], batch_size=4)
    assert set(scores) == {"icbs_tiny_mc"}
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_lm_eval_tasks_need_a_causal_lm_before_anything_is_written(tmp_path, capsys):
    task = _write_task(tmp_path / "tasks")
    with pytest.raises(ValueError, match=r"^'eval.lm_eval_tasks' needs a causal language model .*'classifier'$"):
        check_lm_eval_tasks(EvalConfig(lm_eval_tasks=(str(task),)), "classifier")
    config = tmp_path / "mnist.yaml"
    config.write_text(f"model: {{builtin: mnist_mlp}}\neval: {{lm_eval_tasks: [{task}]}}\n")
    assert main(["prune", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "icbs: error: 'eval.lm_eval_tasks' needs a causal language model (model.kind 'causal_lm'); got 'classifier'"
    ]
    assert not (tmp_path / "out").exists()


def test_lm_eval_task_paths_that_name_no_task_are_refused(tmp_path):
    def check(*entries: str) -> None:
        check_lm_eval_tasks(EvalConfig(lm_eval_tasks=entries), "causal_lm")

    with pytest.raises(ValueError, match=r"^'eval.lm_eval_tasks' names task file '.*missing.yaml', which does not"):
        check(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match=r"^'eval.lm_eval_tasks' names task folder '.*missing/', which does not"):
        check(f"{tmp_path / 'missing'}/", str(_write_task(tmp_path / "tasks")))
    with pytest.raises(ValueError, match=r"^'eval.lm_eval_tasks' lists only task folders; add the names"):
        check(f"{tmp_path / 'tasks'}/")
    template = tmp_path / "template.yaml"
    template.write_text("dataset_path: json\nprocess_docs: !function utils.process\n")
    with pytest.raises(ValueError, match=r"template.yaml', which defines no 'task' or 'group' name$"):
        check(str(template))
    # lm-eval reads a name from the files a task YAML includes; so does the check.
    named = tmp_path / "named.yaml"
    named.write_text("include: tasks/icbs_tiny_mc.yaml\nmetadata: {version: 2}\n")
    check(str(named))
    named.write_text("include: template.yaml\n")
    with pytest.raises(ValueError, match=r"named.yaml', which defines no 'task' or 'group' name$"):
        check(str(named))


@pytest.mark.slow
def test_lm_eval_task_names_lm_eval_does_not_know_are_refused_before_the_run(tmp_path, capsys):
    # A name is looked up in lm-eval's own index (thousands of task YAMLs): the slow part of this test.
    config = tmp_path / "config.yaml"
    config.write_text("model: {kind: causal_lm, builtin: tiny_llama}\neval: {lm_eval_tasks: [icbs_no_such_task]}\n")
    assert main(["prune", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["icbs: error: 'eval.lm_eval_tasks' names task 'icbs_no_such_task', which lm-eval does not know"]
    assert not (tmp_path / "out").exists()


def test_lm_eval_tasks_without_lm_eval_fail_at_config_load(monkeypatch):
    # A None entry in sys.modules is how Python spells "not installed": imports and find_spec both miss it.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"^'eval.lm_eval_tasks' needs lm-evaluation-harness; .*pip install icbs\[eval\]"):
        load_config(overrides=["eval.lm_eval_tasks=[arc_easy]"])
    assert load_config(overrides=["eval.lm_eval_tasks=[]"]).eval.lm_eval_tasks == ()
    with pytest.raises(ImportError, match=r"pip install icbs\[eval\]"):
        evaluate_lm_eval(None, None, ["arc_easy"])  # type: ignore[arg-type]
