"""`mgup_dist.ops.select`: the exact top-k mask against an independent sort oracle.

The oracle orders flat indices by (score descending, index ascending) with numpy's stable argsort in float64
(``-0.0`` and ``+0.0`` compare equal there too) and marks the first k. Inputs cover continuous scores, many
zeros of both signs, heavy duplicates, constant tensors, extremes and subnormals, sorted and reversed data,
periodic spikes aimed at a strided sample, and samples that are deliberately wrong.

This module tests the portable numpy/torch passes (native kernels off); `tests/ops/test_select_native.py`
runs the same oracle against the native path.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgup_dist.native import threads
from mgup_dist.ops import select, threshold as search
from mgup_dist.ops.select import kth_largest, locate_ties, topk_mask
from mgup_dist.ops.threshold import float_below
from mgup_dist.rules.masks import mask_k
from mgup_dist.rules.requests import NonFiniteScoresError

FLOAT32_MAX = float(np.finfo(np.float32).max)
SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
DISTRIBUTIONS = (
    "normal", "products", "zeros", "signed_zeros", "few", "equal", "sorted", "reversed", "extremes",
    "spikes", "one_extreme", "block",
)


@pytest.fixture(autouse=True)
def portable_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "0")


def oracle_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    values = scores.double().numpy()
    order = np.argsort(-values, kind="stable")
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:k]] = True
    return torch.from_numpy(mask)


def make_scores(kind: str, n: int, seed: int) -> torch.Tensor:
    """float32 scores of ``n`` elements drawn from distribution ``kind``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    if kind == "products":
        x = x * rng.standard_normal(n) * 1e-3
    elif kind == "zeros":  # half of the gradient zero: half of the scores exactly zero
        x[rng.random(n) < 0.5] = 0.0
    elif kind == "signed_zeros":
        x = np.where(rng.random(n) < 0.5, -0.0, 0.0)
        some = rng.random(n) < 0.2
        x[some] = rng.standard_normal(int(some.sum()))
    elif kind == "few":
        x = rng.integers(-2, 3, n).astype(np.float64)
    elif kind == "equal":
        x = np.full(n, 0.75)
    elif kind == "sorted":
        x = np.sort(x)
    elif kind == "reversed":
        x = np.sort(x)[::-1].copy()
    elif kind == "extremes":
        pool = np.array([FLOAT32_MAX, -FLOAT32_MAX, SUBNORMAL, -SUBNORMAL, 0.0, -0.0, 1.0, 1e-38])
        x = pool[rng.integers(0, pool.size, n)]
    elif kind == "spikes":  # every p-th score is huge: aliases with a strided sample of stride p·j
        period = int(rng.choice([2, 3, 4, 6, 7, 8, 13, 16, 64, 768]))
        x = x * 1e-3
        x[::period] = 1e6 + rng.random(x[::period].size)
    elif kind == "one_extreme":  # almost everything within a few ulps of 1, a handful far below
        x = 1.0 + rng.integers(0, 4, n) * np.finfo(np.float32).eps
        x[rng.integers(0, max(n, 1), min(n, 5))] = -1e30
    elif kind == "block":  # one contiguous run of a single value holding most of the tensor
        start = int(rng.integers(0, max(n // 4, 1)))
        x[start : start + (3 * n) // 4] = 0.25
    return torch.from_numpy(x.astype(np.float32))


def k_values(n: int, scores: torch.Tensor, seed: int) -> list[int]:
    """0, 1, n-1, n, a random k, and the k's that put the cut at either end of the largest block of ties."""
    ks = {0, n, min(1, n), max(n - 1, 0), int(np.random.default_rng(seed).integers(0, n + 1))}
    if n:
        values, counts = np.unique(scores.numpy() + np.float32(0.0), return_counts=True)
        top = int(np.argmax(counts))
        above = int(counts[top + 1 :].sum())
        ks |= {above + 1, above + int(counts[top]), min(n, above + int(counts[top]) // 2 + 1)}
    return sorted(ks)


def assert_exact(scores: torch.Tensor, k: int) -> None:
    mask = topk_mask(scores, k)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == k
    assert torch.equal(mask, oracle_mask(scores, k))


@pytest.fixture(params=["numpy", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on CPU numpy views (the CPU path) and on the tensors (the path of other devices)."""
    if request.param == "torch":
        monkeypatch.setattr(select, "_host_view", lambda tensor: tensor)
    return request.param


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 1000 elements, so that passes and tie searches cross many block boundaries."""
    monkeypatch.setitem(select.BLOCKS, "numpy", 1000)
    monkeypatch.setitem(select.BLOCKS, "torch", 1000)


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(DISTRIBUTIONS),
    n=st.one_of(st.integers(0, 300), st.sampled_from([select.SAMPLE_FROM - 1, select.SAMPLE_FROM, 50_000])),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_oracle_random(kind: str, n: int, seed: int) -> None:
    scores = make_scores(kind, n, seed)
    for k in k_values(n, scores, seed):
        assert_exact(scores, k)


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_matches_oracle_large(kind: str, backend: str) -> None:
    scores = make_scores(kind, 100_003, seed=len(kind))
    for k in k_values(scores.numel(), scores, seed=1):
        assert_exact(scores, k)


@pytest.mark.parametrize("kind", ["products", "zeros", "sorted", "spikes"])
def test_matches_oracle_million(kind: str) -> None:
    scores = make_scores(kind, 1_000_003, seed=7)
    for k in (1, 500_001, 1_000_002):
        assert_exact(scores, k)


@settings(max_examples=50, deadline=None)
@given(kind=st.sampled_from(DISTRIBUTIONS), n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_torch_path_with_small_blocks(kind: str, n: int, seed: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(select, "_host_view", lambda tensor: tensor)
        patch.setitem(select.BLOCKS, "torch", 1000)
        patch.setattr(select, "SAMPLE_FROM", 64)
        scores = make_scores(kind, n, seed)
        for k in k_values(n, scores, seed):
            assert_exact(scores, k)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_tensors_every_k(n: int) -> None:
    for values in ([], [0.5], [-0.0, 0.0], [0.0, -0.0], [1.0, 2.0], [2.0, 1.0], [3.0, 3.0]):
        if len(values) == n:
            scores = torch.tensor(values, dtype=torch.float32)
            for k in range(n + 1):
                assert_exact(scores, k)


def test_signed_zeros_tie_by_index() -> None:
    scores = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.0])
    assert topk_mask(scores, 3).tolist() == [True, True, True, False, False]


@pytest.mark.parametrize(
    "bad_pool, misleading",
    [
        (lambda v: v[:0], False),  # no sample: the single pass collects everything
        (lambda v: v[:64] * 0 + v.max(), True),  # every sample value at the maximum
        (lambda v: v[:64] * 0 + v.min(), True),  # every sample value at the minimum
        (lambda v: v[-4096:], True),  # a contiguous tail, unrepresentative of sorted data
        (lambda v: v[:4096] * 0 + 0.3, True),  # a value that is not even a score
    ],
)
def test_exact_whatever_the_sample(
    bad_pool, misleading: bool, monkeypatch: pytest.MonkeyPatch, small_blocks: None
) -> None:
    passes: list[int] = []
    original = select._count_pass

    def counted(*args):
        passes[-1] += 1
        return original(*args)

    monkeypatch.setattr(select, "_sample", bad_pool)
    monkeypatch.setattr(select, "_count_pass", counted)
    for kind in ("sorted", "zeros", "block", "few"):
        scores = make_scores(kind, 60_000, seed=3)
        for k in k_values(scores.numel(), scores, seed=2):
            passes.append(0)
            assert_exact(scores, k)
    assert max(passes) <= search._MAX_PASSES + 1
    assert (max(passes) > 1) == misleading  # a wrong sample costs passes, never exactness


@pytest.mark.parametrize("kind, collected", [("products", True), ("zeros", False), ("block", False)])
def test_one_pass_for_typical_scores(kind: str, collected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous scores take one pass collecting a small band; a k-th value inside a big block of ties (zero
    scores) takes one pass that counts the block without collecting it."""
    bands = []
    original = select._count_pass

    def recording(*args):
        result = original(*args)
        bands.append(result[2])
        return result

    monkeypatch.setattr(select, "_count_pass", recording)
    scores = make_scores(kind, 200_000, seed=11)
    threshold = kth_largest(scores, 100_000)
    assert len(bands) == 1
    assert (len(bands[0]) > 0) == collected and len(bands[0]) < 20_000
    assert collected or threshold.ties > 50_000  # the k-th value is the big block's


def test_brackets_after_a_miss_come_from_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample shifted off the scores makes passes miss; every later bracket is drawn from the sample values
    inside the interval known to hold the k-th value, and the answer stays exact."""
    calls = []
    original_bracket, original_sample = search._bracket, select._sample

    def recording(pool, interval, k, widen):
        calls.append((pool.copy(), interval))
        return original_bracket(pool, interval, k, widen)

    monkeypatch.setattr(search, "_bracket", recording)
    monkeypatch.setattr(select, "_sample", lambda values: original_sample(values) + np.float32(1e-3))
    scores = make_scores("products", 200_000, seed=11)
    assert_exact(scores, 100_000)
    assert len(calls) > 1
    for pool, interval in calls[1:]:
        assert len(pool) and np.all((pool > interval.low) & (pool <= interval.high))


@pytest.mark.parametrize("columns", [768, 2304, 3072, 4096])
def test_sample_spans_every_column(columns: int) -> None:
    """The sample's stride is prime to 2 and 3, so a row-major matrix of power-of-two or 3·2**j columns is
    sampled in every column (a stride sharing a factor with the row length would see only some columns)."""
    values = (np.arange(columns * 1024) % columns).astype(np.float32)
    assert np.unique(select._sample(values)).size == columns


def test_kth_largest_counts() -> None:
    scores = make_scores("few", 20_000, seed=5)
    ordered = np.sort(scores.numpy())[::-1]
    for k in (1, 4000, 10_000, 20_000):
        threshold = kth_largest(scores, k)
        assert threshold.value == ordered[k - 1]
        assert threshold.above == int((scores > threshold.value).sum())
        assert threshold.ties == int((scores == threshold.value).sum())
        assert threshold.above < k <= threshold.above + threshold.ties


def test_kth_largest_of_zero_is_positive_zero() -> None:
    threshold = kth_largest(torch.tensor([-0.0, -0.0, 1.0]), 2)
    assert threshold == search.Threshold(0.0, 1, 2) and math.copysign(1, threshold.value) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n", [1, 300, 50_000])
def test_non_finite_raises(bad: float, n: int) -> None:
    for position in (0, n // 2, n - 1):
        scores = make_scores("normal", n, seed=n)
        scores[position] = bad
        for k in (0, n // 2, n):
            with pytest.raises(NonFiniteScoresError):
                topk_mask(scores, k)


@pytest.mark.parametrize(
    "scores, k, error",
    [
        (torch.zeros(4, dtype=torch.float64), 1, TypeError),
        (torch.zeros(2, 2), 1, TypeError),
        ([0.0, 1.0], 1, TypeError),
        (torch.zeros(4), -1, ValueError),
        (torch.zeros(4), 5, ValueError),
        (torch.zeros(4), True, ValueError),
        (torch.zeros(4), 1.0, ValueError),
    ],
)
def test_bad_input(scores, k, error: type[Exception]) -> None:
    with pytest.raises(error):
        topk_mask(scores, k)


@pytest.mark.parametrize("n, k", [(0, 0), (50, 0), (50, 17), (50, 50), (40_000, 9_999)])
def test_writes_into_out(n: int, k: int) -> None:
    """With ``out`` the mask is written there (stale contents overwritten) and ``out`` is returned."""
    scores = make_scores("zeros", n, seed=n + k)
    out = torch.ones(n, dtype=torch.bool) if k == 0 else torch.zeros(n, dtype=torch.bool)
    got = topk_mask(scores, k, out=out)
    assert got is out and torch.equal(out, oracle_mask(scores, k))


@pytest.mark.parametrize(
    "out, error",
    [
        (torch.zeros(4, dtype=torch.uint8), TypeError),
        (torch.zeros(5, dtype=torch.bool), ValueError),
        (torch.zeros(8, dtype=torch.bool)[::2], ValueError),
    ],
)
def test_bad_out(out: torch.Tensor, error: type[Exception]) -> None:
    with pytest.raises(error, match="out"):
        topk_mask(torch.zeros(4), 1, out=out)


@pytest.mark.parametrize("ratio, numel, expected", [(0.29, 100, 28), (0.5, 1, 0), (1.0, 7, 7), (0.5, 101, 50)])
def test_cardinality_identity(ratio: float, numel: int, expected: int) -> None:
    k = mask_k(ratio, numel)
    assert k == int(float(ratio) * numel) == expected
    assert int(topk_mask(make_scores("zeros", numel, seed=numel), k).sum()) == expected


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 3000), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_locate_ties(n: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(np.where(rng.random(n) < density, 1.5, rng.standard_normal(n)).astype(np.float32))
    ties = (scores == 1.5).numpy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(select.BLOCKS, "numpy", 100)
        patch.setitem(select.BLOCKS, "torch", 100)
        for r in sorted({0, 1, int(ties.sum()) // 2, int(ties.sum())}):
            if r > ties.sum():
                continue
            cut = locate_ties(scores, 1.5, r)
            assert int(ties[:cut].sum()) == r and (r == 0 and cut == 0 or ties[cut - 1])
            assert locate_ties(scores.numpy(), 1.5, r) == cut
        for bad in (int(ties.sum()) + 1, -1):
            with pytest.raises(ValueError):
                locate_ties(scores, 1.5, bad)


@pytest.mark.parametrize("x", [0.0, -0.0, 1.0, -1.0, SUBNORMAL, -FLOAT32_MAX, 3.5e-20, 123456.78])
def test_float_below(x: float) -> None:
    below = float_below(x)
    assert below < np.float32(x)
    assert np.nextafter(np.float32(below), np.float32(np.inf)) == np.float32(x)


@pytest.mark.parametrize("kind", ["normal", "zeros", "signed_zeros", "few", "block"])
def test_threaded_passes_match_the_oracle(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting and mask passes split over 3 threads in ranges of 5000 (blocks of 1000) give the exact mask."""
    monkeypatch.setattr(threads, "workers", lambda: 3)
    monkeypatch.setattr(threads, "RANGE", 5000)
    monkeypatch.setitem(select.BLOCKS, "numpy", 1000)
    calls = []
    original = threads.map_ranges
    monkeypatch.setattr(select, "map_ranges", lambda fn, numel: calls.append(numel) or original(fn, numel))
    for n, seed in ((40_000, 1), (33_333, 2)):
        scores = make_scores(kind, n, seed)
        for k in (1, n // 7, n // 2, n - 1):
            assert_exact(scores, k)
    assert calls and all(numel > threads.RANGE for numel in calls)
