"""PNG plots of a run: the metric against elapsed time, and the predicted loss change of every step.

Uses matplotlib's non-interactive Agg backend (no display needed); each function writes one file and
closes its figure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ["plot_metric_vs_time", "plot_delta_per_step"]

logger = logging.getLogger(__name__)


def plot_metric_vs_time(
    elapsed_s: Sequence[float],
    values: Sequence[float],
    path: str | Path,
    *,
    metric: str,
    init_value: float | None = None,
    dense_value: float | None = None,
    title: str = "",
) -> Path:
    """Plot ``metric`` against elapsed seconds, with the one-shot init (and the dense model) as reference lines.

    Args:
        elapsed_s: (T,) seconds since the start of the search, one per evaluation.
        values: (T,) the metric at those times.
        path: PNG file to write.
        metric: the metric's name (``"accuracy"``, ``"perplexity"``), for the axis label.
        init_value: metric of the one-shot initial mask (dashed line).
        dense_value: metric of the dense model (dotted line).
        title: figure title.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: ``elapsed_s`` and ``values`` differ in length.
    """
    if len(elapsed_s) != len(values):
        raise ValueError(f"'elapsed_s' and 'values' should have the same length; got {len(elapsed_s)} and {len(values)}")
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot(list(elapsed_s), list(values), marker="o", markersize=3, label="icbs")
        if init_value is not None:
            ax.axhline(init_value, color="tab:red", linestyle="--", label="one-shot init")
        if dense_value is not None:
            ax.axhline(dense_value, color="tab:gray", linestyle=":", label="dense")
        return _save(fig, ax, path, "elapsed time (s)", metric, title or f"{metric} vs. time")
    finally:
        plt.close(fig)


def plot_delta_per_step(
    steps: Sequence[int],
    predicted: Sequence[float],
    path: str | Path,
    *,
    accepted: Sequence[bool] | None = None,
    title: str = "",
) -> Path:
    """Plot the predicted loss change ΔL of every step's solved block (negative = improvement).

    Args:
        steps: (S,) step numbers.
        predicted: (S,) predicted ΔL of the solver's answer, in loss units.
        path: PNG file to write.
        accepted: (S,) whether the move was applied; rejected moves are drawn in grey.
        title: figure title.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(steps) != len(predicted) or (accepted is not None and len(accepted) != len(steps)):
        raise ValueError("'steps', 'predicted' and 'accepted' should have the same length")
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        if accepted is None:
            ax.scatter(list(steps), list(predicted), s=8, label="predicted ΔL")
        else:
            kept = [i for i, a in enumerate(accepted) if a]
            dropped = [i for i, a in enumerate(accepted) if not a]
            ax.scatter([steps[i] for i in kept], [predicted[i] for i in kept], s=8, label="applied")
            if dropped:
                ax.scatter([steps[i] for i in dropped], [predicted[i] for i in dropped], s=8, color="tab:gray",
                           label="not applied")
        ax.axhline(0.0, color="black", linewidth=0.8)
        return _save(fig, ax, path, "step", "predicted ΔL", title or "predicted loss change per step")
    finally:
        plt.close(fig)


def _save(fig: Any, ax: Any, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid, legend and write one figure as PNG; returns the path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
