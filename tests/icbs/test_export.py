"""Tests for icbs.export and icbs.plots: the output folder rules, masks, config/report files, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from icbs import export, plots
from icbs.config import config_from_dict, load_config
from icbs.exceptions import OutputExistsError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _layers(model: nn.Sequential) -> dict[str, nn.Module]:
    return {"0": model[0], "2": model[2]}


def test_prepare_output_dir_creates_missing_and_accepts_empty(tmp_path):
    target = tmp_path / "a" / "b"
    assert export.prepare_output_dir(target) == target
    assert target.is_dir()
    assert export.prepare_output_dir(target) == target  # empty folder: fine


def test_prepare_output_dir_refuses_non_empty_and_leaves_files(tmp_path):
    (tmp_path / "report.json").write_text('{"keep": 1}')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export.prepare_output_dir(tmp_path)
    assert (tmp_path / "report.json").read_text() == '{"keep": 1}'
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_prepare_output_dir_overwrite_removes_only_icbs_outputs(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "model" / export.MODEL_MANIFEST_NAME).write_text("model.safetensors\n")
    (tmp_path / "model" / "my_notes.md").write_text("mine too")
    (tmp_path / "blocks").mkdir()
    (tmp_path / "blocks" / "block_0000.qp").write_text("qp")
    (tmp_path / "checkpoint.pt.1a2b3c4d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    export.prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "model", "model/my_notes.md", "notes.txt"]


def test_prepare_output_dir_overwrite_keeps_a_model_folder_icbs_did_not_write(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"theirs")
    export.prepare_output_dir(tmp_path, overwrite=True)
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"theirs"


def test_prepare_output_dir_resume_needs_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        export.prepare_output_dir(tmp_path, resume=True)
    (tmp_path / export.CHECKPOINT_NAME).write_bytes(b"ckpt")
    assert export.prepare_output_dir(tmp_path, resume=True) == tmp_path
    assert (tmp_path / export.CHECKPOINT_NAME).read_bytes() == b"ckpt"
    with pytest.raises(ValueError, match="--overwrite"):
        export.prepare_output_dir(tmp_path, resume=True, overwrite=True)


def test_check_output_dir_resume_before_first_checkpoint_starts_again(tmp_path):
    # A run killed while writing its first checkpoint leaves config.yaml and a temporary file.
    (tmp_path / export.CONFIG_NAME).write_text("{}")
    (tmp_path / "checkpoint.pt.0badc0de.tmp").write_bytes(b"half")
    plan = export.check_output_dir(tmp_path, resume=True)
    assert plan.resume_checkpoint is None and plan.existed
    assert export.prepare_output_dir(plan) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [export.CONFIG_NAME]
    (tmp_path / export.REPORT_NAME).write_text("{}")
    with pytest.raises(ValueError, match="has finished"):
        export.check_output_dir(tmp_path, resume=True)


def test_check_output_dir_writes_nothing_and_discard_removes_created_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    plan = export.check_output_dir(target)
    assert not (tmp_path / "a").exists()
    assert plan.created == tmp_path / "a" and not plan.existed
    export.prepare_output_dir(plan)
    export.write_config(config_from_dict({}), target / export.CONFIG_NAME)
    export.discard_outputs(plan)
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir_refusal_names_resume_only_where_it_exists(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(OutputExistsError, match="--resume"):
        export.check_output_dir(tmp_path)
    with pytest.raises(OutputExistsError) as info:
        export.check_output_dir(tmp_path, can_resume=False)
    assert "--resume" not in str(info.value) and "--overwrite" in str(info.value)


def test_check_output_dir_under_a_file_names_it(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="is not a folder"):
        export.check_output_dir(tmp_path / "file" / "out")


def test_atomic_write_gives_umask_mode_and_names_the_target_on_failure(tmp_path, monkeypatch):
    import errno
    import os

    masks = {"a": torch.ones(2, 2, dtype=torch.bool)}
    export.save_masks(masks, tmp_path / "masks.safetensors")
    export.write_report({"a": 1}, tmp_path / "report.json")
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("masks.safetensors", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(OSError, match="cannot write '.*masks.safetensors': No space left on device"):
        export.save_masks(masks, tmp_path / "masks.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors", "report.json"]


def test_prepare_output_dir_rejects_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        export.prepare_output_dir(path)


def test_apply_masks_zeros_exactly_the_pruned_weights():
    model = _mlp()
    dense = {name: module.weight.detach().clone() for name, module in _layers(model).items()}
    masks = {name: torch.rand_like(w) > 0.5 for name, w in dense.items()}
    export.apply_masks(_layers(model), masks)
    for name, module in _layers(model).items():
        weight = module.weight.detach()
        assert torch.equal(weight[masks[name]], dense[name][masks[name]])
        assert torch.count_nonzero(weight[~masks[name]]) == 0


def test_apply_masks_bad_input_leaves_weights_intact():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    good = torch.zeros(5, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        export.apply_masks(_layers(model), {"0": good, "2": torch.zeros(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'9'"):
        export.apply_masks(_layers(model), {"0": good, "9": good})
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_masks_round_trip_as_bool(tmp_path):
    masks = {"layers.0.fc": torch.rand(4, 7) > 0.3, "head": torch.rand(3, 2) > 0.5}
    path = tmp_path / "masks.safetensors"
    export.save_masks(masks, path)
    loaded = export.load_masks(path)
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], mask)
    with pytest.raises(FileNotFoundError):
        export.load_masks(tmp_path / "missing.safetensors")


def test_mask_densities_per_layer_and_total():
    masks = {"a": torch.tensor([[True, False], [False, False]]), "b": torch.ones(2, 3, dtype=torch.bool)}
    densities = export.mask_densities(masks)
    assert densities["a"] == 0.25 and densities["b"] == 1.0
    assert densities["total"] == pytest.approx(7 / 10)


def test_write_config_reloads_to_the_same_config(tmp_path):
    cfg = config_from_dict({"blocks": {"block_size": 32, "k": 8}, "bcd": {"time_budget": "3m"},
                            "solver": {"name": "anneal", "params": {"num_sweeps": 10}}})
    path = tmp_path / "config.yaml"
    export.write_config(cfg, path)
    assert load_config(path) == cfg


def test_write_report_converts_tensors_numpy_and_non_finite(tmp_path):
    report = {"t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3), "n": np.float64(0.5), "a": np.arange(2),
              "bad": float("nan"), "nested": {"tuple": (1, 2)}, "path": tmp_path}
    path = tmp_path / "report.json"
    export.write_report(report, path)
    data = json.loads(path.read_text())
    assert data == {"t": [1.0, 2.0], "s": 3, "n": 0.5, "a": [0, 1], "bad": None, "nested": {"tuple": [1, 2]},
                    "path": str(tmp_path)}
    assert export.read_report(path) == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_collect_versions_names_torch_and_python():
    versions = export.collect_versions()
    assert versions["torch_runtime"] == torch.__version__
    assert versions["python"].count(".") == 2


def test_plots_write_png_files(tmp_path):
    first = plots.plot_metric_vs_time([0, 10, 20], [0.8, 0.85, 0.9], tmp_path / "m.png", metric="accuracy",
                                      init_value=0.8, dense_value=0.95)
    second = plots.plot_delta_per_step([1, 2, 3], [-0.1, 0.0, -0.02], tmp_path / "d.png",
                                       accepted=[True, False, True])
    for path in (first, second):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="same length"):
        plots.plot_metric_vs_time([0, 1], [0.5], tmp_path / "x.png", metric="accuracy")
    with pytest.raises(ValueError, match="same length"):
        plots.plot_delta_per_step([1], [0.1, 0.2], tmp_path / "y.png")
