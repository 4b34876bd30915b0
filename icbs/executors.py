"""Where a round's block solves run: in this thread, on a local thread pool, or on a Ray cluster.

``bcd.workers`` solves that many of a round's blocks at the same time; ``bcd.executor`` says on what.
Threads suit the shipped solvers, whose compiled kernels and CP-SAT release the GIL. Ray
(``bcd.executor: ray``) fans the solves out over the processes and machines of a cluster
(``bcd.ray_address``; ``null`` starts a local runtime). Answers do not depend on the executor: each solve is
seeded from its own step, and results come back in submission order.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

__all__ = ["Executor", "SerialExecutor", "ThreadExecutor", "RayExecutor", "make_executor", "check_ray_address"]

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Runs a function over items and returns the results in order."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """One item after another in the calling thread."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]``."""
        return [fn(item) for item in items]

    def close(self) -> None:
        """Nothing to release."""


class ThreadExecutor:
    """Up to ``workers`` items at the same time on a thread pool."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="icbs-solve")

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` on the pool; the first exception is raised after all have finished."""
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        """Shut the pool down."""
        self._pool.shutdown(wait=True)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ValueError("'bcd.executor' ray needs Ray; install it with `pip install icbs[distributed]`") from err
    return ray


def _reachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why ``host:port`` (optionally ``ray://host:port``) cannot be reached by TCP, or ``None`` when it can.

    Ray itself retries an unreachable head node for minutes; one TCP connect answers in seconds.
    """
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return "expected host:port or ray://host:port"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def check_ray_address(address: str | None, workers: int) -> None:
    """Connect to (or start) the Ray runtime now, so a bad ``bcd.ray_address`` fails before the model loads.

    Raises:
        ValueError: Ray is missing or the address cannot be reached (names ``bcd.ray_address``).
    """
    ray = _ray()
    if ray.is_initialized():
        return
    problem = None if address in (None, "auto") else _reachable(address)
    if problem is not None:
        raise ValueError(f"'bcd.ray_address' {address!r} cannot be reached: {problem}")
    try:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - Ray raises several kinds for an unreachable cluster
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"'bcd.ray_address' {address!r} cannot be reached: {first}") from err


class RayExecutor:
    """Items as Ray tasks (one CPU each) on the cluster of ``address``; at most ``workers`` in flight."""

    def __init__(self, address: str | None, workers: int) -> None:
        check_ray_address(address, workers)
        ray = _ray()
        self._ray = ray
        self._task = ray.remote(num_cpus=1)(_call)
        self._workers = workers

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` as Ray tasks (``fn`` and the items are pickled to the workers)."""
        fn_ref = self._ray.put(fn)
        results: list[R] = []
        for start in range(0, len(items), self._workers):
            refs = [self._task.remote(fn_ref, item) for item in items[start:start + self._workers]]
            results += self._ray.get(refs)
        return results

    def close(self) -> None:
        """Leave the runtime to its owner (a later run in this process reuses it)."""


def make_executor(kind: str, workers: int, ray_address: str | None = None) -> Executor:
    """The executor of ``bcd.executor`` with ``bcd.workers`` workers (serial when there is one local worker)."""
    if kind == "ray":
        return RayExecutor(ray_address, workers)
    if workers <= 1:
        return SerialExecutor()
    return ThreadExecutor(workers)
