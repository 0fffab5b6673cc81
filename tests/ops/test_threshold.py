"""`mgup_dist.ops.threshold.search_threshold` on its own: a plain numpy counting pass, the sort oracle, and pools
that are exact, empty, misleading or all one value; the answer never depends on the pool, only the pass count."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mgup_dist.ops.threshold import Interval, Threshold, float_below, search_threshold


def oracle(scores: np.ndarray, k: int) -> Threshold:
    value = float(np.sort(scores)[::-1][k - 1]) + 0.0
    return Threshold(value, int((scores > value).sum()), int((scores == value).sum()))


def counting(scores: np.ndarray, passes: list[int]):
    def count(lower: float, upper: float):
        passes.append(1)
        above_lower, above_upper = int((scores > lower).sum()), int((scores > upper).sum())
        band = scores[(scores > lower) & (scores <= upper)]
        return above_lower, above_upper, band if lower != float_below(upper) else band[:0]

    return count


POOLS = {
    "exact": lambda s: s[::97].copy(),
    "empty": lambda s: s[:0],
    "shifted": lambda s: s[::97] + np.float32(0.5),
    "constant": lambda s: np.full(500, np.float32(0.25)),
}


@pytest.mark.parametrize("pool_kind", sorted(POOLS))
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_matches_the_sort_oracle(pool_kind: str, kind: str) -> None:
    rng = np.random.default_rng(7)
    scores = rng.standard_normal(50_000).astype(np.float32)
    if kind == "ties":
        scores = np.round(scores * 2).astype(np.float32) / 2
    for k in (1, 17, 25_000, 49_999, 50_000):
        passes: list[int] = []
        interval = Interval(-math.inf, math.inf, len(scores), 0)
        assert search_threshold(counting(scores, passes), POOLS[pool_kind](scores), interval, k) == oracle(scores, k)
        if pool_kind == "empty":
            assert len(passes) == 1  # the whole interval is the band
        if pool_kind == "exact" and kind == "normal":
            assert len(passes) <= 2


def test_single_float_interval_needs_no_pass() -> None:
    scores = np.array([1.0, 2.0, 2.0, 3.0], dtype=np.float32)
    passes: list[int] = []
    interval = Interval(float_below(2.0), 2.0, 3, 1)
    assert search_threshold(counting(scores, passes), scores[:0], interval, 2) == Threshold(2.0, 1, 2)
    assert passes == []
