"""Curve helpers of the convergence plots: trailing moving average, mean and min–max over seeds, the PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.convergence_plots import moving_average, plot_pair, seed_band


def test_moving_average_is_trailing_and_shorter_at_the_start() -> None:
    np.testing.assert_allclose(moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([4.0, 2.0, 6.0], 1), [4.0, 2.0, 6.0])
    np.testing.assert_allclose(moving_average([4.0, 2.0, 6.0], 10), [4.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)


def test_seed_band_uses_the_steps_every_run_logged() -> None:
    runs = [{"val": [[10, 3.0], [20, 2.0]]}, {"val": [[10, 5.0], [20, 4.0], [30, 1.0]]}]
    steps, mean, low, high = seed_band(runs, "val")
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(mean, [4.0, 3.0])
    np.testing.assert_allclose(low, [3.0, 2.0])
    np.testing.assert_allclose(high, [5.0, 4.0])
    assert all(len(a) == 0 for a in seed_band([{"val": []}], "val"))


def test_plot_pair_writes_a_small_png(tmp_path: Path) -> None:
    run = {"train": [[s, 5.0 - 0.01 * s] for s in range(1, 101)], "val": [[50, 4.6], [100, 4.1]]}
    path = tmp_path / "pair.png"
    plot_pair({"a": [run, run], "b": [run]}, path, "a vs b", smooth=5)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 150_000
