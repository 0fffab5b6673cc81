"""Loss plots (matplotlib, Agg backend): one run's train/val curves, and several runs compared."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

Rows = Sequence[Mapping[str, Any]]


def _series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(rows: Rows, path: Path, title: str) -> None:
    """Training and validation loss against step into ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*_series(rows, "loss"), label="train loss", linewidth=1.0)
    ax.plot(*_series(rows, "val_loss"), "o-", label="val loss")
    _finish(fig, ax, path, title)


def plot_compare(runs: Mapping[str, Rows], path: Path, title: str) -> None:
    """Each run's training loss (line) and validation loss (markers, same colour) into ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rows in runs.items():
        (line,) = ax.plot(*_series(rows, "loss"), label=f"{label} train", linewidth=1.0, alpha=0.8)
        ax.plot(*_series(rows, "val_loss"), "o--", color=line.get_color(), label=f"{label} val")
    _finish(fig, ax, path, title)


def _finish(fig: Any, ax: Any, path: Path, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
