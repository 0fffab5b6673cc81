"""One PNG per compared pair: smoothed training loss (left) and validation loss (right) against step, each
optimizer's mean over seeds as a line and its min–max over seeds as a band (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402

Result = Mapping[str, Any]  # a run's result.json: "train"/"val" are [step, loss] lists


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as ``values``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    data = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], data]))
    index = np.arange(1, len(data) + 1)
    start = np.maximum(index - window, 0)
    return (sums[index] - sums[start]) / (index - start)


def seed_band(runs: Sequence[Result], key: str, window: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """``(steps, mean, min, max)`` over ``runs`` of curve ``key`` (each smoothed by ``window`` first), on the
    steps every run logged."""
    curves = [{int(step): loss for step, loss in run[key]} for run in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if not steps:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    stacked = np.stack([moving_average([c[s] for s in steps], window) for c in curves])
    return np.asarray(steps), stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0)


def _draw(ax: Any, band: tuple[np.ndarray, ...], label: str, color: str, marker: str | None) -> None:
    steps, mean, low, high = band
    ax.plot(steps, mean, color=color, label=label, linewidth=1.2, marker=marker, markersize=3)
    ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)


def plot_pair(sides: Mapping[str, Sequence[Result]], path: Path, title: str, smooth: int) -> None:
    """Writes ``path``: for each label -> runs (one per seed) in ``sides``, the training loss smoothed over
    ``smooth`` steps and the validation loss, mean line and min–max band over the runs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for index, (label, runs) in enumerate(sides.items()):
        color = f"C{index}"
        _draw(left, seed_band(runs, "train", smooth), label, color, None)
        _draw(right, seed_band(runs, "val"), label, color, "o")
    left.set_title(f"train loss ({smooth}-step mean)", fontsize=9)
    right.set_title("validation loss", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("loss (nats/byte)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
