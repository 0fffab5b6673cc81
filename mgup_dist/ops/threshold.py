"""Finding the k-th largest score by bracketing it, whatever the passes that count the scores run on.

Write ``G(x) = #{i : s_i > x}``. The k-th largest score ``T`` is the score with ``G(T) < k <= G(T) + #{i : s_i
== T}``. `search_threshold` starts from an interval known to hold ``T`` and a sample of the scores: each
counting pass counts ``G`` at two thresholds around the sample's estimate of ``T`` (a sample value a few
standard deviations of the sample quantile under it, and the float just below one as far over it) and collects
the scores between them, the *band*: ``O(n / sqrt(sample))`` scores. When the sample's values there are all one
value ``v`` (a block of ties, e.g. zero scores), the thresholds are ``below(v)`` and ``v``, so the band is
exactly the ties and is never collected. If ``T`` is in the band it is a partial sort of the band away.
Otherwise the interval shrinks to the side the counts point to and the next pass tries a wider bracket inside
it; once the sample has nothing to offer there (or after a few passes) the whole interval is the band. Each
step is exact, so the result never depends on the sample, only the cost does. The passes themselves (numpy,
torch or native) are the caller's: `mgup_dist.ops.select`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

from mgup_dist import native
from mgup_dist.native import kernels
from mgup_dist.rules.requests import NonFiniteScoresError

Values = Union[np.ndarray, torch.Tensor]  # a 1-D float32 host (numpy) view of CPU scores, or the device tensor

MARGIN_SD = 2.5  # bracket half-width in standard deviations of the sample quantile (1.2% of passes miss)
_WIDEN = 4  # bracket growth after a pass that missed
_MAX_PASSES = 4  # after this many sampled passes the whole remaining interval is collected


@dataclass(frozen=True)
class Threshold:
    """The k-th largest score ``value`` (``+0.0`` for a zero), with ``above`` scores greater than it and
    ``ties`` scores equal to it (so ``above < k <= above + ties``)."""

    value: float
    above: int
    ties: int


@dataclass(frozen=True)
class Interval:
    """``T`` lies in ``(low, high]``; ``G(low) = above_low >= k > G(high) = above_high``."""

    low: float
    high: float
    above_low: int
    above_high: int


def float_below(x: float) -> float:
    """The largest float32 smaller than float32 ``x`` (``float_below(0.0) == float_below(-0.0)``, a negative
    subnormal; ``-inf`` for the lowest float), so ``s > float_below(x)`` is ``s >= x`` for float32 ``s``."""
    with np.errstate(over="ignore"):
        return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


def require_finite(nonfinite: int) -> None:
    """`NonFiniteScoresError` unless ``nonfinite`` (how many scores are NaN or infinite) is 0."""
    if nonfinite:
        raise NonFiniteScoresError("MGUP mask scores contain NaN or infinity (non-finite gradient?)")


def count_true(mask: Values) -> int:
    """How many entries of a bool mask (numpy or torch) are True."""
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(torch.count_nonzero(mask))


def _order_statistics(values: Values, ranks: list[int]) -> list[float]:
    """The ``ranks``-th smallest (0-based) of ``values``, by partial sort."""
    if not ranks:
        return []
    if isinstance(values, np.ndarray):
        if native.library() is not None:
            return kernels.order_statistics(values, ranks)
        return [float(v) for v in np.partition(values, ranks)[ranks]]
    return [float(torch.kthvalue(values, rank + 1).values) for rank in ranks]


def _bracket(pool: Values, interval: Interval, k: int, widen: float) -> tuple[float, float]:
    """Thresholds ``lower <= upper`` inside ``[low, high]`` that likely enclose ``T``, from the sample values
    ``pool`` lying in the interval; the interval itself when the pool is empty."""
    size = len(pool)
    if size == 0:
        return interval.low, interval.high
    inside = interval.above_low - interval.above_high
    fraction = (k - interval.above_high) / inside  # T's rank from the top of the interval, as a fraction
    centre = size * (1 - fraction)
    margin = widen * (MARGIN_SD * math.sqrt(size * fraction * (1 - fraction)) + 1)
    below_rank, above_rank = math.floor(centre - margin), math.ceil(centre + margin)
    ranks = [rank for rank in (below_rank, above_rank) if 0 <= rank < size]
    stats = dict(zip(ranks, _order_statistics(pool, ranks)))
    lower = stats.get(below_rank, interval.low)
    upper = float_below(stats[above_rank]) if above_rank in stats else interval.high
    if lower > upper:  # both ranks fell in one block of ties: count exactly those ties
        lower, upper = upper, lower
    return max(lower, interval.low), min(upper, interval.high)


def _in_band(band: Values, rank: int, above_band: int) -> Threshold:
    """The ``rank``-th largest of ``band`` (1-based) when ``above_band`` scores lie above the band."""
    value = _order_statistics(band, [len(band) - rank])[0]
    return Threshold(value + 0.0, above_band + count_true(band > value), count_true(band == value))


CountPass = Callable[[float, float], tuple[int, int, Values]]  # (lower, upper) -> G(lower), G(upper), band


def search_threshold(count: CountPass, pool: Values, interval: Interval, k: int) -> Threshold:
    """The k-th largest score, given ``count`` (a counting pass: ``(lower, upper)`` with ``lower <= upper`` to
    ``G(lower)``, ``G(upper)`` and the scores in ``(lower, upper]`` in any order, or an empty band when ``lower ==
    float_below(upper)``), a sample ``pool`` of the scores (possibly empty) and an ``interval`` known to hold it
    (see the module docstring)."""
    widen, passes = 1.0, 0
    while interval.low != float_below(interval.high):
        if passes == _MAX_PASSES:
            pool = pool[:0]  # the whole interval becomes the band: this pass cannot miss
        lower, upper = _bracket(pool, interval, k, widen)
        above_lower, above_upper, band = count(lower, upper)
        if above_upper >= k:
            interval = Interval(upper, interval.high, above_upper, interval.above_high)
        elif above_lower < k:
            interval = Interval(interval.low, lower, interval.above_low, above_lower)
        elif lower == float_below(upper):
            return Threshold(upper + 0.0, above_upper, above_lower - above_upper)
        else:
            return _in_band(band, k - above_upper, above_upper)
        pool = pool[(pool > interval.low) & (pool <= interval.high)]
        widen, passes = widen * _WIDEN, passes + 1
    # a single float value is left in the interval
    return Threshold(interval.high + 0.0, interval.above_high, interval.above_low - interval.above_high)
