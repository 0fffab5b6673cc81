"""Exact local top-k selection with the spec's tie rule (score descending, then flat index ascending).

MGUP's mask is a selection, not a sort: its cost is a few elementwise passes over the scores, with no index
tensor over them. Write ``G(x) = #{i : s_i > x}``. The k-th largest score ``T`` is the score with
``G(T) < k <= G(T) + #{i : s_i == T}``, and the mask is ``s > T`` plus the first ``r = k - G(T)`` scores equal
to ``T`` in flat order.

1. One reduction gives min and max and rejects NaN/infinity: ``T`` lies in ``(below(min), max]``.
2. A deterministic strided sample estimates where ``T`` sits. One pass counts ``G`` at two thresholds around
   that estimate (a sample value a few standard deviations of the sample quantile under it, and the float just
   below one as far over it) and collects the scores between them, the *band*: ``O(n / sqrt(sample))`` scores.
   When the sample's values there are all one value ``v`` (a block of ties, e.g. zero scores), the thresholds
   are ``below(v)`` and ``v``, so the band is exactly the ties and is never collected.
3. If ``T`` is in the band it is a partial sort of the band away. Otherwise the interval known to hold ``T``
   shrinks to the side the counts point to and the next pass tries a wider bracket inside it; once the sample
   has nothing to offer there (or after a few passes) the whole interval is the band. Each step is exact, so
   the result never depends on the sample, only the cost does.
4. When ``r`` takes every tie the mask is ``s >= T``; otherwise ``s >= T`` before the cut just after the r-th
   tie and ``s > T`` from it on (`locate_ties` finds the cut counting ties block by block).

On CPU, where the native kernels of `mgup_dist.native` are built, each pass is one fused loop there
(`_native_mask`): the first counting pass also rejects NaN/infinity (no min/max reduction), writes the mask
``s > upper`` and records where the band lies, so the k-th score's band is settled in place and the mask costs
no pass of its own; scores given as a product (`topk_mask_of_product`) are never written to memory. Otherwise
the passes run on zero-copy numpy views of the tensors, block by block so temporaries stay in cache:
torch 2.13's CPU comparisons into bool and boolean indexing are several times slower than numpy's. The
counting and mask-writing passes split over ``torch.get_num_threads()`` threads (`mgup_dist.native.threads`,
combining per-range results in order, so the result does not depend on the thread count). Other devices run the
same code on the tensors themselves. Cost: one reduction, one counting pass, one mask-writing pass (plus a
tie search up to the cut when ties straddle it), partial sorts of ``~2·n**(2/3)`` sampled and
``~1.8·n**(2/3)`` band scores (at k = n/2), and another counting pass in the ~1% of cases the bracket misses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar, Union

import numpy as np
import torch

from mgup_dist import native
from mgup_dist.native import kernels
from mgup_dist.native.threads import map_ranges
from mgup_dist.rules.adam_direction import AdamQuotient
from mgup_dist.rules.requests import NonFiniteScoresError, ScoreProduct

T = TypeVar("T")
Values = Union[np.ndarray, torch.Tensor]  # a 1-D float32 host (numpy) view of CPU scores, or the device tensor

BLOCKS = {"numpy": 1 << 16, "torch": 1 << 22}  # elements per block of a pass, per array kind
SAMPLE_FROM = 1 << 14  # smaller tensors skip the sample: their single pass collects every score
_MAX_SAMPLE = 1 << 18
_MARGIN_SD = 2.5  # bracket half-width in standard deviations of the sample quantile (1.2% of passes miss)
_WIDEN = 4  # bracket growth after a pass that missed
NATIVE_DENSITY = 1.0  # sample density of the native path (see `_sample`)
_MAX_PASSES = 4  # after this many sampled passes the whole remaining interval is collected


@dataclass(frozen=True)
class Threshold:
    """The k-th largest score ``value`` (``+0.0`` for a zero), with ``above`` scores greater than it and
    ``ties`` scores equal to it (so ``above < k <= above + ties``)."""

    value: float
    above: int
    ties: int


@dataclass(frozen=True)
class _Interval:
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


def finite_range(scores: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of non-empty ``scores`` in one reduction; `NonFiniteScoresError` on NaN or infinity."""
    low, high = (float(v) for v in torch.aminmax(scores))
    require_finite(not (math.isfinite(low) and math.isfinite(high)))
    return low, high


def _host_view(scores: torch.Tensor) -> Values:
    """What the passes run on: a numpy view of a CPU tensor (shared memory), else the tensor."""
    return scores.detach().numpy() if scores.device.type == "cpu" else scores


def _blocks(values: Values) -> Iterator[Values]:
    size = BLOCKS["numpy" if isinstance(values, np.ndarray) else "torch"]
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _count(mask: Values) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(torch.count_nonzero(mask))


def _concat(parts: list[Values], like: Values) -> Values:
    if isinstance(like, np.ndarray):
        return np.concatenate(parts) if parts else like[:0]
    return torch.cat(parts) if parts else like[:0]


def _order_statistics(values: Values, ranks: list[int]) -> list[float]:
    """The ``ranks``-th smallest (0-based) of ``values``, by partial sort."""
    if not ranks:
        return []
    if isinstance(values, np.ndarray):
        if native.library() is not None:
            return kernels.order_statistics(values, ranks)
        return [float(v) for v in np.partition(values, ranks)[ranks]]
    return [float(torch.kthvalue(values, rank + 1).values) for rank in ranks]


def _first_true(mask: Values, count: int) -> int:
    """Index of the ``count``-th (1-based) True of ``mask``."""
    if isinstance(mask, np.ndarray):
        return int(np.flatnonzero(mask)[count - 1])
    return int(torch.nonzero(mask)[count - 1, 0])


def locate_ties(scores: Values, value: float, r: int) -> int:
    """The cut ``p``: ``scores[:p]`` holds exactly ``r`` entries equal to ``value`` and ends with one (0 when
    ``r == 0``). Counts ties block by block and stops at the block holding the r-th, so it reads at most up to
    ``p`` and never builds an index tensor beyond one block. `ValueError` if ``r < 0`` or fewer than ``r``
    entries match. ``scores``: 1-D float32 tensor, or a numpy view of one."""
    if r < 0:
        raise ValueError(f"r={r} < 0")
    if isinstance(scores, torch.Tensor):
        scores = _host_view(scores)
    if r > 0 and isinstance(scores, np.ndarray) and scores.flags.c_contiguous and native.library() is not None:
        return kernels.locate_ties(scores, None, value, r)
    start, remaining = 0, r
    if remaining == 0:
        return 0
    for block in _blocks(scores):
        equal = block == value
        count = _count(equal)
        if count >= remaining:
            return start + _first_true(equal, remaining) + 1
        start, remaining = start + len(block), remaining - count
    raise ValueError(f"fewer than {r} scores equal {value}")


def _count_pass(values: Values, lower: float, upper: float) -> tuple[int, int, Values]:
    """``G(lower)``, ``G(upper)`` and the scores in ``(lower, upper]`` (``lower <= upper``), in one pass (split
    over threads for numpy views, `map_ranges`). When that band can hold only one value (``lower ==
    float_below(upper)``, a block of ties) it is counted, not collected, and the returned band is empty."""
    collect = lower != float_below(upper)

    def count(lo: int, hi: int) -> tuple[int, int, list[Values]]:
        above_lower = above_upper = 0
        band = []
        for block in _blocks(values[lo:hi]):
            over_lower, over_upper = block > lower, block > upper
            above_upper += _count(over_upper)
            if collect:
                band.append(block[over_lower ^ over_upper])
            else:
                above_lower += _count(over_lower)
        return above_lower, above_upper, band

    parts = _map(count, values)
    above_upper = sum(part[1] for part in parts)
    collected = _concat([piece for part in parts for piece in part[2]], values)
    above_lower = above_upper + len(collected) if collect else sum(part[0] for part in parts)
    return above_lower, above_upper, collected


def _map(fn: Callable[[int, int], T], values: Values) -> list[T]:
    """`map_ranges` over ``values``' indices for numpy views; one call over everything for device tensors."""
    if isinstance(values, np.ndarray):
        return map_ranges(fn, len(values))
    return [fn(0, len(values))]


def _sample(values: Values, density: float = 2.0) -> Values:
    """A deterministic strided sample of about ``density·n**(2/3)`` scores (between 1024 and `_MAX_SAMPLE`),
    which balances the sample's cost against collecting and ordering the band (whose size falls as the
    sample's square root grows): 2 for the portable passes, whose band costs most; `NATIVE_DENSITY` for the
    native ones, where fetching the strided sample from memory costs more than a wider band. The stride is
    prime to 2 and 3, so rows of power-of-two or 3·2**j columns are sampled across all their columns."""
    n = len(values)
    size = min(_MAX_SAMPLE, max(1024, round(density * n ** (2 / 3))))
    stride = max(1, n // size)
    while stride > 1 and (stride % 2 == 0 or stride % 3 == 0):
        stride -= 1
    return values[stride // 2 :: stride]


def _bracket(pool: Values, interval: _Interval, k: int, widen: float) -> tuple[float, float]:
    """Thresholds ``lower <= upper`` inside ``[low, high]`` that likely enclose ``T``, from the sample values
    ``pool`` lying in the interval; the interval itself when the pool is empty."""
    size = len(pool)
    if size == 0:
        return interval.low, interval.high
    inside = interval.above_low - interval.above_high
    fraction = (k - interval.above_high) / inside  # T's rank from the top of the interval, as a fraction
    centre = size * (1 - fraction)
    margin = widen * (_MARGIN_SD * math.sqrt(size * fraction * (1 - fraction)) + 1)
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
    return Threshold(value + 0.0, above_band + _count(band > value), _count(band == value))


CountPass = Callable[[float, float], tuple[int, int, Values]]  # (lower, upper) -> G(lower), G(upper), band


def search_threshold(count: CountPass, pool: Values, interval: _Interval, k: int) -> Threshold:
    """The k-th largest score, given ``count`` (a counting pass, see `_count_pass`), a sample ``pool`` of the
    scores (possibly empty) and an ``interval`` known to hold it (step 3 of the module docstring)."""
    widen, passes = 1.0, 0
    while interval.low != float_below(interval.high):
        if passes == _MAX_PASSES:
            pool = pool[:0]  # the whole interval becomes the band: this pass cannot miss
        lower, upper = _bracket(pool, interval, k, widen)
        above_lower, above_upper, band = count(lower, upper)
        if above_upper >= k:
            interval = _Interval(upper, interval.high, above_upper, interval.above_high)
        elif above_lower < k:
            interval = _Interval(interval.low, lower, interval.above_low, above_lower)
        elif lower == float_below(upper):
            return Threshold(upper + 0.0, above_upper, above_lower - above_upper)
        else:
            return _in_band(band, k - above_upper, above_upper)
        pool = pool[(pool > interval.low) & (pool <= interval.high)]
        widen, passes = widen * _WIDEN, passes + 1
    # a single float value is left in the interval
    return Threshold(interval.high + 0.0, interval.above_high, interval.above_low - interval.above_high)


def kth_largest(scores: torch.Tensor, k: int, score_range: tuple[float, float] | None = None) -> Threshold:
    """The k-th largest of 1-D float32 ``scores`` (``1 <= k <= n``), with the counts above and equal to it.
    ``score_range``: ``(min, max)`` if already known (from `finite_range`); scores must be finite."""
    values = _host_view(scores)
    low, high = score_range if score_range is not None else finite_range(scores)
    interval = _Interval(float_below(low), high, len(values), 0)
    pool = _sample(values) if len(values) >= SAMPLE_FROM else values[:0]
    return search_threshold(lambda lower, upper: _count_pass(values, lower, upper), pool, interval, k)


def _fill_mask(values: Values, out: Values, value: float, cut: int) -> None:
    """``out[:cut] = values[:cut] >= value`` and ``out[cut:] = values[cut:] > value``, in one pass (split over
    threads for numpy views)."""
    lib = np if isinstance(out, np.ndarray) else torch

    def fill(lo: int, hi: int) -> None:
        middle = min(max(cut, lo), hi)
        lib.greater_equal(values[lo:middle], value, out=out[lo:middle])
        lib.greater(values[middle:hi], value, out=out[middle:hi])

    _map(fill, values)


def _check(scores: torch.Tensor, k: int, out: torch.Tensor | None) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 1:
        raise TypeError(
            f"top-k scores must be a 1-D float32 tensor, got {getattr(scores, 'dtype', type(scores))} "
            f"of shape {tuple(getattr(scores, 'shape', ()))}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.numel():
        raise ValueError(f"k={k!r} outside [0, {scores.numel()}]")
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise TypeError(f"top-k out must be a bool tensor, got {getattr(out, 'dtype', type(out))}")
    if out.shape != scores.shape or out.device != scores.device or not out.is_contiguous():
        raise ValueError(
            f"top-k out must be contiguous, of the scores' shape {tuple(scores.shape)} and device {scores.device}; "
            f"got shape {tuple(out.shape)} on {out.device}"
        )


def _native_mask(
    a: torch.Tensor, b: torch.Tensor | None, k: int, mask: torch.Tensor, quotient: AdamQuotient | None = None
) -> torch.Tensor:
    """`topk_mask` of the scores ``a`` (``a·b`` when ``b`` is given) through the native kernels. With a
    ``quotient`` (`AdamQuotient.fusable`), ``a`` is its first moment and the scores are ``u·b`` for the direction
    ``u`` that the first counting pass forms (small tensors form it first); afterwards ``(u, b)`` are the factors.

    No min/max reduction: the interval starts unbounded and every counting pass also checks for NaN and
    infinity. Each counting pass also writes the mask ``s > upper``, exact outside its band; when the k-th
    score lies in the last pass's band, only the band's positions are settled afterwards (the ties among
    them in flat order), so the mask costs no pass of its own. When the last pass counted a block of ties
    as its band (``upper`` is the k-th score), the first ``r`` ties are marked, reading up to the r-th. Otherwise
    (the loop ran out of floats) a tie search and a mask pass follow. Tensors too small to sample take one
    native call (`kernels.topk_small`)."""
    n = a.numel()
    if quotient is not None and (n < SAMPLE_FROM or k in (0, n)):
        a, quotient = quotient.form(), None
    factors = [a.detach().numpy(), None if b is None else b.detach().numpy(), quotient]
    out, last = mask.numpy(), []

    def count(lower: float, upper: float) -> tuple[int, int, np.ndarray]:
        av, bv, fused = factors
        counts = kernels.count_band(av, bv, lower, upper, lower != float_below(upper), out, fused and fused.operands())
        if fused is not None:
            factors[0], factors[2], fused.formed = fused.out.numpy(), None, True
        require_finite(counts.nonfinite)
        last[:] = [(lower, upper, counts)]
        return counts.above_upper + counts.inside, counts.above_upper, counts.band

    av, bv = factors[:2]
    if n == 0:
        return mask
    if k in (0, n):
        require_finite(kernels.count_band(av, bv, 0.0, 0.0, collect=False).nonfinite)
        return mask.fill_(k == n)
    if n < SAMPLE_FROM:
        require_finite(kernels.topk_small(av, bv, k, out))
        return mask
    pool = _sample(av, NATIVE_DENSITY) if quotient is None else _sampled_quotient(quotient)
    pool = pool if bv is None else pool * _sample(bv, NATIVE_DENSITY)
    threshold = search_threshold(count, pool, _Interval(-math.inf, math.inf, n, 0), k)
    av = factors[0]
    lower, upper, counts = last[0]
    r = k - threshold.above
    if lower < threshold.value <= upper and counts.inside and len(counts.where) == counts.inside:
        kernels.settle_band(counts, threshold.value, r, out)
        return mask
    if upper == threshold.value:  # the mask holds s > T: the first r ties join it
        kernels.mark_ties(av, bv, threshold.value, r, out)
        return mask
    cut = n if r == threshold.ties else kernels.locate_ties(av, bv, threshold.value, r)
    kernels.fill_mask(av, bv, threshold.value, cut, out)
    return mask


def _sampled_quotient(quotient: AdamQuotient) -> np.ndarray:
    """The direction at `_sample`'s positions (``NATIVE_DENSITY``), formed from the sampled moments."""
    first, second = (_sample(t.detach().numpy(), NATIVE_DENSITY) for t in (quotient.exp_avg, quotient.exp_avg_sq))
    direction = np.ascontiguousarray(first)
    kernels.adam_direction(direction, np.ascontiguousarray(second), quotient.eps, direction)
    return direction


def topk_mask_of_product(
    direction: torch.Tensor | AdamQuotient,
    grad: torch.Tensor,
    k: int,
    out: torch.Tensor | None = None,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """`topk_mask` of the float32 scores ``direction ⊙ grad`` (1-D tensors of one length), computed without
    writing the scores to memory when the native kernels can read the operands (both float32); otherwise the
    product is formed (`ScoreProduct.materialize`, into ``buffer`` when given) and passed to `topk_mask`. An
    `AdamQuotient` direction is formed by the first counting pass when `AdamQuotient.fusable`, else first."""
    scores = ScoreProduct(direction, grad, buffer)
    shape = direction.out.shape if isinstance(direction, AdamQuotient) else direction.shape
    if shape != grad.shape:
        raise ValueError(f"score factors differ in shape: {tuple(shape)} and {tuple(grad.shape)}")
    if isinstance(direction, AdamQuotient) and direction.fusable(grad) and kernels.usable(out):
        _check(direction.exp_avg, k, out)
        mask = torch.empty(grad.numel(), dtype=torch.bool) if out is None else out
        return _native_mask(direction.exp_avg, grad, k, mask, direction)
    direction = scores.direction_tensor()
    if not kernels.usable(direction, grad, out) or direction.dtype != torch.float32 or grad.dtype != torch.float32:
        return topk_mask(scores.materialize(), k, out)
    _check(direction, k, out)
    mask = torch.empty(direction.numel(), dtype=torch.bool) if out is None else out
    return _native_mask(direction, grad, k, mask)


def topk_mask(scores: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of 1-D float32 ``scores``; ties go to the lowest indices.

    Written into ``out`` (a contiguous bool tensor of the scores' shape and device) and returned when given.
    ``-0.0`` ties with ``+0.0``. NaN or infinity anywhere raise `NonFiniteScoresError` (also for k = 0 or n).
    `TypeError` for anything but a 1-D float32 tensor (or a non-bool ``out``), `ValueError` unless
    ``0 <= k <= n`` (or for an ``out`` of another shape or device).
    """
    _check(scores, k, out)
    scores = scores.detach().contiguous()
    n = scores.numel()
    mask = torch.empty(n, dtype=torch.bool, device=scores.device) if out is None else out
    if kernels.usable(scores, mask):
        return _native_mask(scores, None, k, mask)
    if n == 0:
        return mask
    score_range = finite_range(scores)
    if k in (0, n):
        return mask.fill_(k == n)
    threshold = kth_largest(scores, k, score_range)
    r = k - threshold.above
    values = _host_view(scores)
    cut = n if r == threshold.ties else locate_ties(values, threshold.value, r)
    _fill_mask(values, _host_view(mask), threshold.value, cut)
    return mask
