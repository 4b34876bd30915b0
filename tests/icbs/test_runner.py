"""End-to-end tests of icbs.runner on the built-in MNIST MLP: outputs, exact density, reload, baseline, blocks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from icbs import export, runner
from icbs.config import load_config
from icbs.exceptions import OutputExistsError

pytest.importorskip("mlxtend")

# A short run: few steps, small data, small blocks (the example's settings otherwise).
_OVERRIDES = [
    "calibration.n_samples=256",
    "calibration.batch_size=128",
    "eval.n_samples=500",
    "eval.every_s=null",
    "blocks.block_size=32",
    "blocks.k=16",
    "derivatives.n_samples=64",
    "bcd.time_budget=null",
    "bcd.max_steps=6",
    "model.device=cpu",
]


@pytest.fixture(scope="module")
def cfg():
    return load_config("examples/mnist_mlp.yaml", overrides=_OVERRIDES)


@pytest.fixture(scope="module")
def pruned_run(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return runner.run_prune(cfg, out_dir=out, progress=False)


def test_run_prune_writes_every_output(pruned_run, cfg):
    out = pruned_run.out_dir
    for name in ("model", "masks.safetensors", "report.json", "config.yaml", "metric_vs_time.png",
                 "delta_loss_per_step.png"):
        assert (out / name).exists(), name
    assert not (out / export.CHECKPOINT_NAME).exists()
    # config.yaml records the folder the run wrote to, so running it again writes there too.
    assert load_config(out / "config.yaml") == cfg.replace(export=dataclasses.replace(cfg.export, dir=str(out)))


def test_run_prune_hits_exact_density_with_zeros_in_saved_weights(pruned_run, cfg):
    masks = export.load_masks(pruned_run.out_dir / export.MASKS_NAME)
    assert sorted(masks) == ["fc1", "fc2"]  # fc3 is the head
    for name, mask in masks.items():
        assert int(mask.sum()) == round(cfg.pruning.density * mask.numel()), name
    from safetensors.torch import load_file

    state = load_file(str(pruned_run.out_dir / "model" / "model.safetensors"))
    for name, mask in masks.items():
        weight = state[f"{name}.weight"]
        assert torch.count_nonzero(weight[~mask]) == 0
        assert torch.count_nonzero(weight[mask]) == int(mask.sum())  # trained weights are never exactly 0


def test_run_prune_report_holds_metrics_steps_and_versions(pruned_run, cfg):
    report = export.read_report(pruned_run.out_dir / "report.json")
    assert report["metric"] == "accuracy"
    for stage in ("dense", "init", "final"):
        assert 0.0 < report["metrics"][stage]["accuracy"] <= 1.0
    # 10% density costs accuracy against the dense model, and icbs never accepts a worse block.
    assert report["metrics"]["init"]["accuracy"] < report["metrics"]["dense"]["accuracy"]
    assert report["prune"]["final_loss"] <= report["prune"]["init_loss"] + 1e-9
    assert len(report["steps"]) == 6
    assert all("predicted_delta" in row for row in report["steps"])
    assert report["density"]["achieved"] == pytest.approx(cfg.pruning.density, abs=1e-5)
    assert report["versions"]["torch_runtime"] == torch.__version__
    assert report["seed"] == cfg.bcd.seed
    assert report["config"]["blocks"]["block_size"] == 32
    assert pruned_run.final == report["metrics"]["final"]


def test_saved_model_reloads_with_identical_outputs(pruned_run, cfg):
    saved = runner._load_saved(cfg, pruned_run.out_dir)
    reference = runner._load(cfg.model)
    masks = export.load_masks(pruned_run.out_dir / export.MASKS_NAME)
    layers = reference.adapter.prunable_layers(reference.model)
    export.apply_masks(layers, masks)
    x = torch.randn(16, 784, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # icbs without reconstruction only zeros weights: dense weights * mask must give the same logits
        assert torch.equal(saved.model(x), reference.model(x))
    evaluated = runner.run_evaluate(cfg, model_dir=pruned_run.out_dir)
    assert evaluated.final["accuracy"] == pytest.approx(pruned_run.final["accuracy"])
    assert evaluated.density == pytest.approx(cfg.pruning.density, abs=1e-5)


def test_run_prune_refuses_existing_folder(pruned_run, cfg):
    before = {p.name: p.stat().st_mtime_ns for p in pruned_run.out_dir.iterdir()}
    with pytest.raises(OutputExistsError):
        runner.run_prune(cfg, out_dir=pruned_run.out_dir, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in pruned_run.out_dir.iterdir()} == before


def test_run_baseline_magnitude_exact_density(cfg, tmp_path):
    pytest.importorskip("icbs.baselines")
    outcome = runner.run_baseline("magnitude", cfg, out_dir=tmp_path / "mag")
    masks = export.load_masks(tmp_path / "mag" / export.MASKS_NAME)
    for name, mask in masks.items():
        assert int(mask.sum()) == round(cfg.pruning.density * mask.numel()), name
    report = export.read_report(tmp_path / "mag" / "report.json")
    assert report["method"] == "magnitude"
    assert report["metrics"]["final"]["accuracy"] == outcome.final["accuracy"]
    assert outcome.final["accuracy"] < outcome.dense["accuracy"]


def test_run_baseline_rejects_unknown_method(cfg, tmp_path):
    with pytest.raises(ValueError, match="'method'"):
        runner.run_baseline("obs", cfg, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_run_export_blocks_files_read_back(cfg, tmp_path):
    import dimod
    import solvers

    paths = runner.run_export_blocks(cfg, out_dir=tmp_path / "blocks", n_blocks=3)
    assert len(paths) == 6
    index = export.read_report(tmp_path / "blocks" / "blocks" / "index.json")["blocks"]
    assert len(index) == 3
    for row in index:
        qp = solvers.CardinalityQP.read(tmp_path / "blocks" / "blocks" / row["file"])
        assert qp.n == 32 and qp.block is not None
        x_cur = np.array(row["x_cur"], dtype=np.int8)
        assert qp.is_feasible(x_cur)
        # The current mask is the zero point of the local model: its energy is ΔL = 0.
        assert qp.energy(x_cur) == pytest.approx(0.0, abs=1e-9 * (1 + np.abs(qp.Q).sum()))
        assert row["energy_solver"] <= row["energy_x_cur"] + 1e-9
        cqm_path = (tmp_path / "blocks" / "blocks" / row["file"]).with_suffix(".cqm")
        with open(cqm_path, "rb") as handle:
            cqm = dimod.ConstrainedQuadraticModel.from_file(handle)
        assert len(cqm.variables) == 32
        again = solvers.CardinalityQP.read(cqm_path)
        assert again.energy(x_cur) == pytest.approx(qp.energy(x_cur), abs=1e-9)


def test_run_export_blocks_keeps_solver_params_valid(cfg, tmp_path):
    with_params = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, params={"num_sweeps": 50}))
    assert len(runner.run_export_blocks(with_params, out_dir=tmp_path / "b", n_blocks=1)) == 2


@pytest.mark.slow
def test_causal_lm_run_saves_hf_model_that_reloads(tmp_path):
    cfg = load_config(overrides=[
        "model.kind=causal_lm", "model.builtin=tiny_llama", "model.device=cpu",
        "calibration.source=pydoc", "calibration.n_samples=8", "calibration.seq_len=32", "calibration.batch_size=4",
        "eval.n_samples=8", "eval.seq_len=32", "eval.batch_size=4", "eval.every_s=null",
        "blocks.block_size=32", "blocks.k=16", "derivatives.estimator=fisher", "derivatives.n_samples=8",
        "bcd.time_budget=null", "bcd.max_steps=3",
    ])
    outcome = runner.run_prune(cfg, out_dir=tmp_path / "out", progress=False)
    assert outcome.metric == "perplexity"
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert list((tmp_path / "out" / "model").glob("*.safetensors"))
    again = runner.run_evaluate(cfg, model_dir=tmp_path / "out")
    assert again.final["perplexity"] == pytest.approx(outcome.final["perplexity"], rel=1e-5)
    assert again.density == pytest.approx(0.5, abs=1e-6)
