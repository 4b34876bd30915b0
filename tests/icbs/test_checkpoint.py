"""Tests for icbs.checkpoint and resume: atomic files, kill -9 mid-run, identical masks after resume."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import icbs
from icbs.checkpoint import load_checkpoint, pack_mask, save_checkpoint, unpack_mask
from icbs.state import round_half_up

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent
CONFIG = {
    "pruning": {"density": 0.5},
    "scoring": {"init_method": "magnitude", "selection_method": "gradient", "fix_frac_prune": 0.1},
    "blocks": {"block_size": 8, "k": 4, "tabu_frac": 0.3},
    "derivatives": {"estimator": "fisher", "n_samples": 8},
    "solver": {"name": "exhaustive"},
    # Passes longer than the run, so only max_steps ends it (the test is about resuming, not stopping).
    "bcd": {"time_budget": None, "max_steps": 30, "min_steps_per_layer": 16, "checkpoint_every_s": 0.3, "seed": 11},
    "eval": {"every_s": None},
}


def test_pack_mask_roundtrip():
    mask = torch.rand(5, 13) > 0.4
    assert torch.equal(unpack_mask(pack_mask(mask)), mask)


def test_save_checkpoint_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run.ckpt"
    state = {"layers": {"a": {"keep_mask": torch.ones(2, 3, dtype=torch.bool), "fixed_pruned": torch.zeros(2, 3, dtype=torch.bool),
                              "fixed_kept": torch.zeros(2, 3, dtype=torch.bool)}}}
    save_checkpoint(path, {"state": state, "driver": {"step": 1}, "rng": {}, "config": {}})
    save_checkpoint(path, {"state": state, "driver": {"step": 2}, "rng": {}, "config": {}})
    assert load_checkpoint(path)["driver"]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable icbs checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")


def _run_in_process(make_problem, checkpoint_path=None, resume=False, **bcd):
    model, calib, loss_fn = make_problem(seed=3)
    data = {**CONFIG, "bcd": {**CONFIG["bcd"], **bcd}}
    cfg = icbs.config_from_dict(data)
    return model, icbs.prune(model, cfg, calib, loss_fn, checkpoint_path=checkpoint_path, resume=resume)


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}, {repo!r}]
    import icbs
    from conftest import make_mlp_problem
    model, calib, loss_fn = make_mlp_problem(seed=3)
    cfg = icbs.config_from_dict({config!r})
    slow = lambda record: time.sleep(0.08)
    icbs.prune(model, cfg, calib, loss_fn, checkpoint_path={path!r}, callbacks=[slow])
    print("FINISHED")
    """
)


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path, mlp_problem):
    path = tmp_path / "run.ckpt"
    code = _CHILD.format(tests=str(TESTS_DIR), repo=str(REPO), config=CONFIG, path=str(path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if path.exists():
                step = load_checkpoint(path)["driver"]["step"]
                if step >= 5:
                    os.kill(child.pid, signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.05)
    finally:
        if child.poll() is None and killed_at is None:
            child.kill()
        _, err = child.communicate(timeout=30)
    assert killed_at is not None, f"the child ended before it could be killed: {err.decode()[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    saved = load_checkpoint(path)["driver"]
    assert 5 <= saved["step"] < 30 and not saved["finished"]

    resumed_model, resumed = _run_in_process(mlp_problem, checkpoint_path=path, resume=True)
    _, straight = _run_in_process(mlp_problem)
    assert resumed.report.steps == straight.report.steps == 30
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
        assert int(mask.sum()) == round_half_up(0.5 * mask.numel())
        assert torch.equal(getattr(resumed_model, name).weight.detach() != 0, mask)
    assert [h.accepted for h in resumed.history] == [h.accepted for h in straight.history]
    assert resumed.report.final_loss == pytest.approx(straight.report.final_loss, rel=1e-12)
    assert load_checkpoint(path)["driver"]["finished"]


def test_resume_refuses_a_changed_setting_and_leaves_model_dense(tmp_path, mlp_problem, snapshot, assert_unchanged):
    path = tmp_path / "run.ckpt"
    _run_in_process(mlp_problem, checkpoint_path=path, max_steps=3)
    model, calib, loss_fn = mlp_problem(seed=3)
    saved = snapshot(model)
    data = {**CONFIG, "blocks": {**CONFIG["blocks"], "k": 3}}
    with pytest.raises(ValueError, match="'blocks.k' differs from the checkpoint"):
        icbs.prune(model, icbs.config_from_dict(data), calib, loss_fn, checkpoint_path=path, resume=True)
    assert_unchanged(model, saved)
    with pytest.raises(FileNotFoundError):
        icbs.prune(model, icbs.config_from_dict(CONFIG), calib, loss_fn, checkpoint_path=tmp_path / "none.ckpt",
                   resume=True)
    assert_unchanged(model, saved)


def test_resume_of_a_finished_run_returns_its_masks(tmp_path, mlp_problem):
    path = tmp_path / "run.ckpt"
    _, first = _run_in_process(mlp_problem, checkpoint_path=path, max_steps=4)
    model, again = _run_in_process(mlp_problem, checkpoint_path=path, resume=True, max_steps=4)
    assert again.report.steps == 4
    for name, mask in first.masks.items():
        assert torch.equal(again.masks[name], mask)


def _payload(step: int = 1) -> dict:
    state = {"layers": {"a": {"keep_mask": torch.ones(2, 3, dtype=torch.bool), "fixed_pruned": torch.zeros(2, 3, dtype=torch.bool),
                              "fixed_kept": torch.zeros(2, 3, dtype=torch.bool)}}}
    return {"state": state, "driver": {"step": step}, "rng": {}, "config": {}}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is an empty file"),
        (b"PK\x03\x04 cut short", "not a torch file, or cut short"),
        (b"plain text", "not a torch file, or cut short"),
    ],
)
def test_load_checkpoint_damaged_file_is_one_short_line(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert reason in message and "checkpoint.pt" in message
    assert "weights_only" not in message and "\n" not in message and len(message) < 200


def test_load_checkpoint_refuses_pickled_objects_and_unrelated_torch_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match="holds objects other than plain data") as info:
        load_checkpoint(path)
    assert len(str(info.value)) < 200
    torch.save({"version": 1, "weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="is not an icbs checkpoint \\(no 'state' entry\\)"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="is not an icbs checkpoint of version 1"):
        load_checkpoint(path)


def test_check_resumable_names_the_first_changed_setting():
    from icbs.checkpoint import check_resumable

    saved = icbs.config_from_dict(CONFIG).to_dict()
    changed_budget = icbs.config_from_dict({**CONFIG, "bcd": {**CONFIG["bcd"], "max_steps": 99}}).to_dict()
    check_resumable(saved, changed_budget)  # budgets may change
    changed_k = icbs.config_from_dict({**CONFIG, "blocks": {**CONFIG["blocks"], "k": 3}}).to_dict()
    with pytest.raises(ValueError, match=r"'blocks.k' differs from the checkpoint's \(4; now 3\)"):
        check_resumable(saved, changed_k)
    with pytest.raises(ValueError, match=r"'pruning.density' differs from the checkpoint's \(absent"):
        check_resumable({}, saved)


def test_save_checkpoint_failure_names_the_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _payload(1))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="cannot write '.*checkpoint.pt': No space left on device"):
        save_checkpoint(path, _payload(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["driver"]["step"] == 1
