"""Parallel block solves: bcd.workers on a thread pool and on a real local Ray runtime give the serial masks."""

from __future__ import annotations

import socket

import pytest
import torch

import icbs
from icbs.config import load_config
from icbs.exceptions import ConfigError
from icbs.executors import SerialExecutor, ThreadExecutor, check_ray_address, make_executor


def _run(mlp_problem, make_config, **bcd):
    model, calib, loss_fn = mlp_problem(n_samples=64, hidden=16)
    cfg = make_config(
        solver={"name": "anneal"}, derivatives={"estimator": "fisher", "n_samples": 16},
        blocks={"block_size": 12, "k": 6}, bcd={"max_steps": 24, "blocks_per_round": 2, **bcd},
    )
    return icbs.prune(model, cfg, calib, loss_fn)


def _same_run(a, b) -> None:
    assert a.masks.keys() == b.masks.keys()
    for name, mask in a.masks.items():
        assert torch.equal(mask, b.masks[name]), name
    assert [r.predicted_delta for r in a.history] == [r.predicted_delta for r in b.history]
    assert [r.accepted for r in a.history] == [r.accepted for r in b.history]


def test_executor_threads_give_the_serial_masks(mlp_problem, make_config):
    serial = _run(mlp_problem, make_config, workers=1)
    threads = _run(mlp_problem, make_config, workers=2)
    assert serial.report.accepted > 0
    _same_run(serial, threads)


def test_executor_ray_local_runtime_gives_the_serial_masks(mlp_problem, make_config):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serial = _run(mlp_problem, make_config, workers=1)
        on_ray = _run(mlp_problem, make_config, workers=2, executor="ray")
        _same_run(serial, on_ray)
        assert serial.report.accepted > 0
    finally:
        ray.shutdown()


def test_executor_unreachable_ray_address_names_the_key():
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a loopback port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match=rf"'bcd.ray_address' '127.0.0.1:{port}' cannot be reached"):
        check_ray_address(f"127.0.0.1:{port}", 1)
    with pytest.raises(ValueError, match="'bcd.ray_address' 'nowhere' cannot be reached: expected host:port"):
        check_ray_address("nowhere", 1)


def test_executor_choice_and_workers_are_checked():
    assert isinstance(make_executor("thread", 1), SerialExecutor)
    pool = make_executor("thread", 3)
    assert isinstance(pool, ThreadExecutor)
    assert pool.map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    pool.close()
    with pytest.raises(ConfigError, match="'bcd.executor'"):
        load_config(None, overrides=["bcd.executor=dask"])
    with pytest.raises(ConfigError, match="'bcd.workers'"):
        load_config(None, overrides=["bcd.workers=0"])


def test_config_moved_damping_key_names_the_new_one():
    with pytest.raises(ConfigError, match="'derivatives.damping_frac' has moved: use 'scoring.init_damping_frac'"):
        load_config(None, overrides=["derivatives.damping_frac=0.05"])
    assert load_config(None, overrides=["scoring.init_damping_frac=0.05"]).scoring.init_damping_frac == 0.05
