"""Tests for icbs.allocation (``pruning.allocation: owl``): exact totals, the density range, one density per
block, more kept where the outliers are, and the per-layer counts through prune, the baselines and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import icbs
from icbs import cli, export
from icbs.allocation import allocate, round_to_total
from icbs.baselines import run_baseline
from icbs.checkpoint import load_checkpoint
from icbs.config import PruningConfig
from icbs.layers import group_by_block
from icbs.state import MaskPattern

LAMBDA = 0.08


class _Block(nn.Module):
    """A residual MLP block: ``up (32, 16)`` -> ReLU -> ``down (16, 32)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class _Stack(nn.Module):
    """``inp (16, 8)``, three blocks in ``layers`` (an ``nn.ModuleList``, like a decoder), ``head (4, 16)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def _mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)


def _problem(outlier_block: int = 1, loud_input: float = 1.0):
    """The stack with 20 weights of ``layers.<outlier_block>.up`` made 30x larger (Wanda outliers), its layers
    (the head included) and 64 samples whose targets are the dense outputs plus noise; input 0 of the samples
    is scaled by ``loud_input``."""
    torch.manual_seed(0)
    model = _Stack().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        weight = model.layers[outlier_block].up.weight
        weight.view(-1)[torch.randperm(weight.numel(), generator=gen)[:20]] *= 30.0
        x = torch.randn(64, 8, generator=gen)
        x[:, 0] *= loud_input
        y = model(x) + 0.05 * torch.randn(64, 4, generator=gen)
    batches = [{"x": x[i : i + 16], "y": y[i : i + 16]} for i in range(0, 64, 16)]
    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return model, layers, batches


def _counts(pattern: MaskPattern, layers, densities) -> dict[str, int]:
    return {name: pattern.at_density(densities[name]).layer_target(tuple(module.weight.shape))
            for name, module in layers.items()}


def _uniform_total(pattern: MaskPattern, layers) -> int:
    return sum(pattern.layer_target(tuple(module.weight.shape)) for module in layers.values())


@pytest.mark.parametrize("kind", ["unstructured", "per_output"])
def test_allocation_owl_holds_the_uniform_total_the_range_and_one_density_per_block(kind):
    model, layers, batches = _problem()
    pruning = PruningConfig(density=0.5, pattern=kind, allocation="owl", owl_lambda=LAMBDA)
    densities = allocate(pruning, model, layers, batches=batches, loss_fn=_mse)
    pattern = MaskPattern.from_config(0.5, kind)
    counts = _counts(pattern, layers, densities)
    assert sum(counts.values()) == _uniform_total(pattern, layers) == 1632
    lengths = {name: pattern.group_length(tuple(module.weight.shape)) for name, module in layers.items()}
    for name, module in layers.items():
        # Each layer's kept count over its size, within one count unit (a weight, or one per row) of the range.
        assert counts[name] / module.weight.numel() == pytest.approx(densities[name], abs=1e-12)
        assert 0.5 - LAMBDA - 1 / lengths[name] <= densities[name] <= 0.5 + LAMBDA + 1 / lengths[name], name
    assert group_by_block(model, list(layers)) == [
        ["inp"], ["layers.0.up", "layers.0.down"], ["layers.1.up", "layers.1.down"], ["layers.2.up", "layers.2.down"],
        ["head"]]
    for i in range(3):
        up, down = f"layers.{i}.up", f"layers.{i}.down"
        assert abs(densities[up] - densities[down]) <= 1 / lengths[up] + 1 / lengths[down]
    assert max(densities.values()) - min(densities.values()) > LAMBDA  # the allocation is not uniform


def test_allocation_owl_keeps_most_in_the_block_with_planted_outliers():
    for block in (0, 2):
        model, layers, batches = _problem(outlier_block=block)
        pruning = PruningConfig(density=0.5, allocation="owl", owl_lambda=LAMBDA)
        densities = allocate(pruning, model, layers, batches=batches, loss_fn=_mse)
        planted = {f"layers.{block}.up", f"layers.{block}.down"}
        # The planted block has the most outliers: it gets the top of the range, every other layer clearly less.
        for name in planted:
            assert densities[name] == pytest.approx(0.5 + LAMBDA, abs=1 / 512)
        others = [densities[name] for name in layers if name not in planted]
        assert max(others) < 0.5 + LAMBDA - 0.05


def test_allocation_uniform_or_equal_outliers_keeps_every_layer_at_the_density():
    model, layers, batches = _problem()
    assert allocate(PruningConfig(density=0.5), model, layers, batches=batches, loss_fn=_mse) is None
    zero = PruningConfig(density=0.3, allocation="owl", owl_lambda=0.0)
    assert allocate(zero, model, layers, batches=batches, loss_fn=_mse) == dict.fromkeys(layers, 0.3)
    # A threshold no score reaches: every group's outlier ratio is 0, so nothing moves.
    high = PruningConfig(density=0.3, allocation="owl", owl_threshold=1e9)
    assert allocate(high, model, layers, batches=batches, loss_fn=_mse) == dict.fromkeys(layers, 0.3)


def test_round_to_total_is_largest_remainder_with_unit_weights_and_exact_on_reachable_row_counts():
    real = np.array([2.9, 1.2, 3.5, 0.6])
    assert round_to_total(real, np.ones(4, dtype=np.int64), 9).tolist() == [3, 1, 4, 1]
    assert round_to_total(real, np.ones(4, dtype=np.int64), 8).tolist() == [3, 1, 3, 1]
    # Per-row counts: 4 rows, 8 rows, 4 rows, 1 row. Floors keep 4*2 + 8*1 + 4*3 = 28; 41 needs 13 more = 8+4+1.
    units = np.array([4, 8, 4, 1])
    counts = round_to_total(real, units, 41)
    assert int(np.dot(counts, units)) == 41
    assert np.all((counts == np.floor(real)) | (counts == np.floor(real) + 1))
    # No set of the row counts (4, 4) reaches 6: the nearest reachable total, less than one row count away.
    counts = round_to_total(np.array([0.75, 0.75]), np.array([4, 4]), 6)
    assert abs(int(np.dot(counts, [4, 4])) - 6) < 4


def _config(make_config, init="wanda", **pruning):
    return make_config(pruning={"density": 0.5, "allocation": "owl", **pruning},
                       scoring={"init_method": init, "init_scope": "per_output", "selection_method": "gradient"},
                       derivatives={"estimator": "fisher", "n_samples": 16}, bcd={"max_steps": 24})


@pytest.mark.parametrize(("kind", "init"), [("unstructured", "wanda"), ("per_output", "wanda"),
                                           ("unstructured", "sparsegpt")])
def test_prune_owl_keeps_every_layers_allocated_count_through_the_search(make_config, kind, init):
    model, layers, batches = _problem()
    cfg = _config(make_config, init, pattern=kind)
    densities = allocate(cfg.pruning, model, layers, batches=batches, loss_fn=_mse)
    expected = _counts(MaskPattern.from_config(0.5, kind), layers, densities)
    result = icbs.prune(model, cfg, batches, _mse, layers=layers)
    assert result.report.accepted > 0  # the search moved weights, and no move changed a count
    for name, mask in result.masks.items():
        assert int(mask.sum()) == expected[name] == result.report.layers[name].target_kept, name
        assert torch.equal(layers[name].weight.detach() != 0, mask), name
    assert sum(int(mask.sum()) for mask in result.masks.values()) == 1632
    assert result.report.density["total"] == pytest.approx(1632 / 3264)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "alps"])
def test_baseline_with_owl_densities_keeps_the_allocated_counts(method):
    model, layers, batches = _problem()
    pruning = PruningConfig(density=0.4, allocation="owl", owl_lambda=LAMBDA)
    densities = allocate(pruning, model, layers, batches=batches, loss_fn=_mse)
    expected = _counts(MaskPattern.from_config(0.4, "unstructured"), layers, densities)
    masks = run_baseline(method, model, layers, batches, _mse, density=0.4, layer_densities=densities)
    for name, mask in masks.items():
        assert int(mask.sum()) == expected[name], name
        assert int(torch.count_nonzero(layers[name].weight)) == expected[name], name
    assert sum(expected.values()) == _uniform_total(MaskPattern.from_config(0.4, "unstructured"), layers)
    assert expected["layers.1.up"] > expected["layers.0.up"]
    with pytest.raises(ValueError, match="no layer density given for layer 'head'"):
        run_baseline(method, model, layers, batches, _mse, density=0.4,
                     layer_densities={name: d for name, d in densities.items() if name != "head"})


def test_resume_with_owl_repeats_the_run_and_refuses_another_allocation(tmp_path, make_config):
    path = tmp_path / "run.ckpt"
    cfg = _config(make_config)
    model, layers, batches = _problem()

    def stop_after_8(_elapsed: float, _budget: float | None, step: int) -> None:
        if step >= 8:
            raise KeyboardInterrupt  # between rounds, like Ctrl-C: the checkpoint is written first

    with pytest.raises(KeyboardInterrupt):
        icbs.prune(model, cfg, batches, _mse, layers=layers, checkpoint_path=path, progress=stop_after_8)
    assert not load_checkpoint(path)["driver"]["finished"]
    resumed_model, resumed_layers, _ = _problem()
    resumed = icbs.prune(resumed_model, cfg, batches, _mse, layers=resumed_layers, checkpoint_path=path, resume=True)
    straight_model, straight_layers, _ = _problem()
    straight = icbs.prune(straight_model, cfg, batches, _mse, layers=straight_layers)
    assert resumed.report.steps == straight.report.steps == 24
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
        assert resumed.report.layers[name].target_kept == straight.report.layers[name].target_kept
    # Other calibration inputs give other outlier ratios: the recomputed allocation disagrees with the checkpoint.
    other_model, other_layers, other_batches = _problem(loud_input=30.0)
    with pytest.raises(ValueError, match=r"checkpoint layer '.*' keeps \d+ weights; this run's allocation keeps"):
        icbs.prune(other_model, cfg, other_batches, _mse, layers=other_layers, checkpoint_path=path, resume=True)
    assert all(torch.count_nonzero(module.weight) == module.weight.numel() for module in other_layers.values())


def _tiny_llama_config(tmp_path, **pruning):
    path = tmp_path / "owl.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"kind": "causal_lm", "builtin": "tiny_llama", "device": "cpu"},
        "calibration": {"source": "pydoc", "n_samples": 8, "seq_len": 32, "batch_size": 4},
        "eval": {"n_samples": 8, "seq_len": 32, "batch_size": 4, "every_s": None, "before": False},
        "pruning": {"density": 0.5, "allocation": "owl", "owl_threshold": 3.0, **pruning},
        "blocks": {"block_size": 32, "k": 16},
        "derivatives": {"estimator": "fisher", "n_samples": 8},
        "bcd": {"time_budget": None, "max_steps": 4},
        "export": {"save_model": False, "plots": False},
    }))
    return path


def _check_tiny_llama_outputs(out, pattern: MaskPattern) -> dict[str, float]:
    """The saved masks of a tiny-Llama run hold the uniform total, block by block one density; returns them."""
    masks = export.load_masks(out / export.MASKS_NAME)
    uniform = sum(pattern.layer_target(tuple(mask.shape)) for mask in masks.values())
    assert sum(int(mask.sum()) for mask in masks.values()) == uniform
    densities = {name: float(mask.float().mean()) for name, mask in masks.items()}
    for block in ("model.layers.0.", "model.layers.1."):
        inside = [d for name, d in densities.items() if name.startswith(block)]
        assert len(inside) == 7 and max(inside) - min(inside) <= 2 / 64
    report = export.read_report(out / "report.json")
    assert report["density"]["achieved"] == pytest.approx(uniform / sum(m.numel() for m in masks.values()))
    return densities


@pytest.mark.parametrize("kind", ["unstructured", "per_output"])
def test_cli_prune_and_baseline_with_owl_on_tiny_llama_keep_the_uniform_total(tmp_path, kind):
    config = _tiny_llama_config(tmp_path, pattern=kind)
    assert cli.main(["baseline", "sparsegpt", str(config), "--out", str(tmp_path / "sgpt"), "--quiet"]) == 0
    assert cli.main(["prune", str(config), "--out", str(tmp_path / "icbs"), "--quiet", "--no-progress"]) == 0
    pattern = MaskPattern.from_config(0.5, kind)
    baseline = _check_tiny_llama_outputs(tmp_path / "sgpt", pattern)
    pruned = _check_tiny_llama_outputs(tmp_path / "icbs", pattern)
    # Both commands compute the allocation from the same dense model and samples, and the search keeps it.
    assert pruned == baseline
    assert max(pruned.values()) - min(pruned.values()) > 0.05
    summary = export.read_report(tmp_path / "icbs" / "report.json")["prune"]["layers"]
    assert {name: layer["density"] for name, layer in summary.items()} == pruned
