"""Exact local top-k selection with the spec's tie rule (score descending, then flat index ascending).

MGUP's mask is a selection, not a sort: its cost is a few elementwise passes over the scores, with no index
tensor over them. Write ``G(x) = #{i : s_i > x}``. The k-th largest score ``T`` is the score with
``G(T) < k <= G(T) + #{i : s_i == T}``, and the mask is ``s > T`` plus the first ``r = k - G(T)`` scores equal
to ``T`` in flat order.

1. One reduction gives min and max and rejects NaN/infinity: ``T`` lies in ``(below(min), max]``.
2. A deterministic strided sample (`_sample`) estimates where ``T`` sits, and counting passes over the scores
   bracket it exactly (`mgup_dist.ops.threshold.search_threshold`): usually one pass that counts ``G`` at two
   thresholds around the estimate and collects the few scores between them, the band.
3. ``T`` is then a partial sort of the band away.
4. When ``r`` takes every tie the mask is ``s >= T``; otherwise ``s >= T`` before the cut just after the r-th
   tie and ``s > T`` from it on (`locate_ties` finds the cut counting ties block by block).

On CPU, where the native kernels of `mgup_dist.native` are built, each pass is one fused loop there
(`_native_mask`): the first counting pass also rejects NaN/infinity (no min/max reduction), writes the mask
``s > upper`` and records where the band lies, so the k-th score's band is settled in place and the mask costs
no pass of its own; scores given as a product (`topk_mask_of_product`) are never written to memory, and an
unformed Adam direction (`AdamQuotient`) is formed by the first counting pass itself. The usual case (the
first bracket holds ``T``) runs in one native call that also gathers the strided sample
(`kernels.select_sampled`); the Python search takes over only when that bracket misses. Otherwise
the passes run on zero-copy numpy views of the tensors, block by block so temporaries stay in cache:
torch 2.13's CPU comparisons into bool and boolean indexing are several times slower than numpy's. The
counting and mask-writing passes split over ``torch.get_num_threads()`` threads (`mgup_dist.native.threads`,
combining per-range results in order, so the result does not depend on the thread count). Other devices run the
same code on the tensors themselves. Cost: one reduction, one counting pass, one mask-writing pass (plus a
tie search up to the cut when ties straddle it), partial sorts of ``~2·n**(2/3)`` sampled and
``~1.8·n**(2/3)`` band scores (at k = n/2), and another counting pass in the ~1% of cases the bracket misses.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from mgup_dist import native
from mgup_dist.native import kernels
from mgup_dist.native.threads import map_ranges
from mgup_dist.ops.threshold import (
    MARGIN_SD,
    Interval,
    Threshold,
    Values,
    count_true,
    float_below,
    require_finite,
    search_threshold,
)
from mgup_dist.rules.adam_direction import AdamQuotient
from mgup_dist.rules.requests import PackedMask, ScoreProduct, TopKMask

T = TypeVar("T")

BLOCKS = {"numpy": 1 << 16, "torch": 1 << 22}  # elements per block of a pass, per array kind
SAMPLE_FROM = 1 << 14  # smaller tensors skip the sample: their single pass collects every score
_MAX_SAMPLE = 1 << 18
NATIVE_DENSITY = 1.0  # sample density of the native path (see `_sample`)


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


def _concat(parts: list[Values], like: Values) -> Values:
    if isinstance(like, np.ndarray):
        return np.concatenate(parts) if parts else like[:0]
    return torch.cat(parts) if parts else like[:0]


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
        count = count_true(equal)
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
            above_upper += count_true(over_upper)
            if collect:
                band.append(block[over_lower ^ over_upper])
            else:
                above_lower += count_true(over_lower)
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


@functools.lru_cache(maxsize=1024)
def _stride(n: int, density: float) -> int:
    """The stride of a sample of about ``density·n**(2/3)`` of ``n`` scores (between 1024 and `_MAX_SAMPLE`),
    prime to 2 and 3 (see `_sample`)."""
    size = min(_MAX_SAMPLE, max(1024, round(density * n ** (2 / 3))))
    stride = max(1, n // size)
    while stride > 1 and (stride % 2 == 0 or stride % 3 == 0):
        stride -= 1
    return stride


def _sample(values: Values, density: float = 2.0) -> Values:
    """A deterministic strided sample of about ``density·n**(2/3)`` scores (between 1024 and `_MAX_SAMPLE`),
    which balances the sample's cost against collecting and ordering the band (whose size falls as the
    sample's square root grows): 2 for the portable passes, whose band costs most; `NATIVE_DENSITY` for the
    native ones (`_native_mask`), where fetching the strided sample from memory costs more than a wider band.
    The stride is prime to 2 and 3, so rows of power-of-two or 3·2**j columns are sampled across all their
    columns."""
    stride = _stride(len(values), density)
    return values[stride // 2 :: stride]


def kth_largest(scores: torch.Tensor, k: int, score_range: tuple[float, float] | None = None) -> Threshold:
    """The k-th largest of 1-D float32 ``scores`` (``1 <= k <= n``), with the counts above and equal to it.
    ``score_range``: ``(min, max)`` if already known (from `finite_range`); scores must be finite."""
    values = _host_view(scores)
    low, high = score_range if score_range is not None else finite_range(scores)
    interval = Interval(float_below(low), high, len(values), 0)
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
    a: torch.Tensor, b: torch.Tensor | None, k: int, mask: torch.Tensor, quotient: AdamQuotient | None = None,
    packed: bool = False,
) -> torch.Tensor | PackedMask:
    """`topk_mask` of the scores ``a`` (``a·b`` when ``b`` is given) through the native kernels, into the bool
    ``mask``. With a ``quotient`` (`AdamQuotient.fusable`), ``a`` is its first moment and the scores are ``u·b``
    for the direction ``u`` that the first counting pass forms (for tensors too small to sample, the one call of
    `kernels.topk_small`; for k = 0 or n, `AdamQuotient.form` first); afterwards ``(u, b)`` are the factors. When
    ``packed``, the usual selection of a sampled tensor answers a `PackedMask` whose bits are the first bytes of
    ``mask``'s storage (an eighth of the mask's memory traffic).

    No min/max reduction: every counting pass also checks for NaN and infinity. Tensors too small to sample
    take one native call (`kernels.topk_small`); the others one call for the usual case
    (`kernels.select_sampled`: the strided sample at `_stride`'s positions of density `NATIVE_DENSITY` and its
    bracket, one counting pass that writes the mask ``s > upper`` and collects the band, the band's positions
    settled), and `_native_search` when that pass missed."""
    n = a.numel()
    if quotient is not None and k in (0, n):
        a, quotient = quotient.form(), None
    if n == 0:
        return mask
    if k in (0, n):
        require_finite(kernels.count_band(a, b, 0.0, 0.0, collect=False).nonfinite)
        return mask.fill_(k == n)
    if n < SAMPLE_FROM:
        nonfinite = kernels.topk_small(a, b, k, mask, quotient and quotient.operands())
        if quotient is not None:
            quotient.formed = True
        require_finite(nonfinite)
        return mask
    stride = _stride(n, NATIVE_DENSITY)
    outcome = kernels.select_sampled(a, b, quotient and quotient.operands(), k, mask, stride // 2, stride, MARGIN_SD,
                                     packed)  # packed bits go to the first bytes of mask
    if quotient is not None:
        a, quotient.formed = quotient.out, True
    require_finite(outcome == kernels.NONFINITE)
    if outcome == kernels.SELECTED:
        return PackedMask(mask, n) if packed else mask
    pool = kernels.gathered_sample(n, stride // 2, stride)
    b = None if b is None else _host_view(b)
    _native_search(_host_view(a), b, k, _host_view(mask), pool)  # rare; the search writes a bool mask
    return mask


def _native_search(a: np.ndarray, b: np.ndarray | None, k: int, out: np.ndarray, pool: np.ndarray) -> None:
    """The top-k mask of the scores ``a`` (``a·b``) into ``out`` by `search_threshold`'s passes, each a native
    counting pass that also writes the mask ``s > upper``, exact outside its band. When the k-th score lies in
    the last pass's band, only the band's positions are settled (the ties among them in flat order); when the
    last pass counted a block of ties as its band (``upper`` is the k-th score), the first ``r`` ties are
    marked, reading up to the r-th. Otherwise (the loop ran out of floats) a tie search and a mask pass
    follow."""
    last = []

    def count(lower: float, upper: float) -> tuple[int, int, np.ndarray]:
        counts = kernels.count_band(a, b, lower, upper, lower != float_below(upper), out)
        require_finite(counts.nonfinite)
        last[:] = [(lower, upper, counts)]
        return counts.above_upper + counts.inside, counts.above_upper, counts.band

    threshold = search_threshold(count, pool, Interval(-math.inf, math.inf, len(a), 0), k)
    lower, upper, counts = last[0]
    r = k - threshold.above
    if lower < threshold.value <= upper and counts.inside and len(counts.where) == counts.inside:
        kernels.settle_band(counts, threshold.value, r, out)
    elif upper == threshold.value:  # the mask holds s > T: the first r ties join it
        kernels.mark_ties(a, b, threshold.value, r, out)
    else:
        cut = len(a) if r == threshold.ties else kernels.locate_ties(a, b, threshold.value, r)
        kernels.fill_mask(a, b, threshold.value, cut, out)


def topk_mask_of_product(
    direction: torch.Tensor | AdamQuotient,
    grad: torch.Tensor,
    k: int,
    out: torch.Tensor | None = None,
    buffer: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor | PackedMask:
    """`topk_mask` of the float32 scores ``direction ⊙ grad`` (1-D tensors of one length), computed without
    writing the scores to memory when the native kernels can read the operands (both float32); otherwise the
    product is formed (`ScoreProduct.materialize`, into ``buffer`` when given) and passed to `topk_mask`. An
    `AdamQuotient` direction is formed by the first counting pass when `AdamQuotient.fusable`, else first.
    ``packed``: the answer may be a `PackedMask` (see `_native_mask`)."""
    quotient = isinstance(direction, AdamQuotient)
    shape = direction.out.shape if quotient else direction.shape
    if shape != grad.shape:
        raise ValueError(f"score factors differ in shape: {tuple(shape)} and {tuple(grad.shape)}")
    if quotient and direction.fusable(grad) and kernels.usable(out):
        _check(direction.exp_avg, k, out)
        mask = torch.empty(grad.numel(), dtype=torch.bool) if out is None else out
        return _native_mask(direction.exp_avg, grad, k, mask, direction, packed)
    scores = ScoreProduct(direction, grad, buffer)
    direction = scores.direction_tensor()
    if not kernels.usable(direction, grad, out) or direction.dtype != torch.float32 or grad.dtype != torch.float32:
        return topk_mask(scores.materialize(), k, out)
    _check(direction, k, out)
    mask = torch.empty(direction.numel(), dtype=torch.bool) if out is None else out
    return _native_mask(direction, grad, k, mask, packed=packed)


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


def request_mask(request: TopKMask) -> torch.Tensor | PackedMask:
    """The answer to a `TopKMask` whose segment is the whole tensor, into ``request.out`` when given: a
    `ScoreProduct` goes to `topk_mask_of_product` as its factors (the native kernels then never write the
    scores, form an unformed Adam direction in their first pass, and answer a `PackedMask` when the request
    takes one), plain scores to `topk_mask`."""
    scores = request.scores
    if isinstance(scores, ScoreProduct):
        return topk_mask_of_product(scores.direction, scores.grad, request.k, request.out, scores.buffer,
                                    request.packed)
    return topk_mask(scores, request.k, out=request.out)
