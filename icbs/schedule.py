"""When and where the driver works: the layer schedule, the rounds, the seed streams and the clock.

Every random choice of a run derives from ``(bcd.seed, step, stream)`` and nothing else, so a run resumed
from a checkpoint repeats an uninterrupted one step for step. The streams are named in :class:`Stream`.
A pass (epoch) visits each layer ``max(min_steps, round(log(size) / log(smallest size)))`` times in a
seeded order (paper Fig. 2: steps spread in proportion to ``log(layer size)``); a round takes the next
layers of the pass, at most ``bcd.blocks_per_round`` distinct ones, and serves them from one derivative
pass. :class:`Cursor` is the position in the schedule that a checkpoint carries; :class:`Clock` measures
the time that counts against the budget (evaluations and checkpoint writes do not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

__all__ = ["Stream", "step_seed", "step_rng", "layer_schedule", "Cursor", "Clock", "stop_reason", "deferred_interrupts"]

T = TypeVar("T")


class Stream(enum.IntEnum):
    """The independent random streams of a step (the numbers are part of the reproducibility contract)."""

    SOLVE = 1  # the block solver's seed
    STEP_SAMPLES = 2  # which calibration samples a round estimates on
    CHECK_SAMPLES = 3  # which samples a 'fresh' round check uses
    INIT_SCORES = 3  # tie-breaking of the initial scores (drawn at step 0, through step_seed)
    SELECTION_SCORES = 4  # tie-breaking of the selection scores
    BLOCK = 5  # tie-breaking inside the block selection
    SCHEDULE = 7  # the layer order of a pass (per epoch)
    DENSE_SAMPLE = 8  # the tokens drawn from the dense model for calibration.targets (per batch, not per step)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 31-bit seed derived from ``(seed, step, stream)`` only (reproducible across resumes)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(stream)]).generate_state(1)[0]
    return int(state) % (2**31 - 1)


def step_rng(seed: int, step: int, stream: Stream) -> np.random.Generator:
    """A numpy generator seeded from ``(seed, step, stream)`` only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(stream)])


def layer_schedule(sizes: Mapping[str, int], min_steps: int, seed: int, epoch: int) -> list[str]:
    """The layer visited at each step of one pass (epoch).

    Layer ``l`` gets ``max(min_steps, round(log(size_l) / log(size_min)))`` steps per pass (so steps
    grow with ``log(size)``, the smallest layer getting one), in an order shuffled from ``(seed, epoch)``.

    Args:
        sizes: ``{layer: number of weights}``.
        min_steps: ``bcd.min_steps_per_layer``.
        seed: ``bcd.seed``.
        epoch: pass number.

    Returns:
        Layer names, one per step of the pass.
    """
    logs = {name: math.log(max(size, 2)) for name, size in sizes.items()}
    smallest = min(logs.values())
    entries: list[str] = []
    for name, value in logs.items():
        entries += [name] * max(int(min_steps), int(math.floor(value / smallest + 0.5)))
    order = step_rng(seed, epoch, Stream.SCHEDULE).permutation(len(entries))
    return [entries[i] for i in order]


@dataclasses.dataclass
class Cursor:
    """Where the run is in its schedule; everything here goes into a checkpoint.

    Attributes:
        step: steps done (one per block tried, skipped ones included).
        epoch: the current pass.
        pos: steps of the current pass done.
        epoch_accepted: moves accepted in the current pass (a pass with none ends the run).
        n_accepted: moves accepted and kept over the run.
        n_undone_rounds: rounds undone by the round check.
        stale_rounds: rounds in a row that kept no move (``bcd.patience`` reads it).
    """

    step: int = 0
    epoch: int = 0
    pos: int = 0
    epoch_accepted: int = 0
    n_accepted: int = 0
    n_undone_rounds: int = 0
    stale_rounds: int = 0

    def next_round(self, schedule: list[str], blocks_per_round: int, max_steps: int | None) -> list[str]:
        """The next layers of the pass, at most ``blocks_per_round`` distinct ones (and no more than ``max_steps`` allows)."""
        limit = blocks_per_round if max_steps is None else min(blocks_per_round, max_steps - self.step)
        names: list[str] = []
        while self.pos + len(names) < len(schedule) and len(names) < limit:
            name = schedule[self.pos + len(names)]
            if name in names:
                break
            names.append(name)
        return names

    def start_epoch(self) -> None:
        """Move to the next pass."""
        self.epoch += 1
        self.pos = 0
        self.epoch_accepted = 0

    def count_accepted(self, n: int) -> None:
        """Add ``n`` accepted (and kept) moves."""
        self.n_accepted += n
        self.epoch_accepted += n

    def end_round(self, kept: int) -> None:
        """Count a round that kept ``kept`` moves (none: one more stale round; any: the count restarts)."""
        self.stale_rounds = 0 if kept else self.stale_rounds + 1


class Clock:
    """Elapsed run time against the budget: time before a resume plus time since :meth:`start`, minus pauses."""

    def __init__(self, elapsed_before: float = 0.0) -> None:
        self.elapsed_before = float(elapsed_before)
        self._start = time.monotonic()

    def start(self) -> None:
        """Start counting now."""
        self._start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds that count against the budget."""
        return self.elapsed_before + (time.monotonic() - self._start)

    def paused(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` without counting its time (evaluations, checkpoint writes)."""
        mark = time.monotonic()
        try:
            return fn()
        finally:
            self._start += time.monotonic() - mark


def stop_reason(bcd: Any, elapsed_s: float, cursor: Cursor) -> str | None:
    """``"time_budget"``, ``"max_steps"``, ``"max_epochs"`` or ``"patience"`` when the run must stop now, else ``None``."""
    if bcd.time_budget is not None and elapsed_s >= bcd.time_budget:
        return "time_budget"
    if bcd.max_steps is not None and cursor.step >= bcd.max_steps:
        return "max_steps"
    if bcd.max_epochs is not None and cursor.epoch >= bcd.max_epochs:
        return "max_epochs"
    if bcd.patience is not None and cursor.stale_rounds >= bcd.patience:
        return "patience"
    return None


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Hold Ctrl-C and SIGTERM until the caller asks: yields ``requested()``, true once one arrived.

    A round changes masks, weights, tabu lists and counters together, so a checkpoint is consistent only
    between rounds; the loop asks after each round and raises ``KeyboardInterrupt`` itself. Outside the
    main thread (where no handler can be installed) nothing is deferred.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    caught: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in signals}
    try:
        yield lambda: bool(caught)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
