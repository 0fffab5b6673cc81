"""The native selection path of `mgup_dist.ops.select` (``MGUP_DIST_NATIVE=1``: the test fails, never falls back,
when the kernels cannot be built) against the sort oracle of `tests.ops.test_select`: materialised scores and
scores given as products (and as an Adam quotient the first pass forms), every distribution and the k's at the edges of the largest block of ties, several
threads, bands wider than the first buffer guess, misleading samples, and non-finite scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgup_dist.native import kernels, threads
from mgup_dist.ops import select, threshold
from mgup_dist.ops.select import topk_mask, topk_mask_of_product
from mgup_dist.rules.adam_direction import AdamQuotient, MomentUpdate, adam_direction, update_moments
from mgup_dist.rules.requests import NonFiniteScoresError, PackedMask
from tests.ops.test_select import DISTRIBUTIONS, k_values, make_scores, oracle_mask


@pytest.fixture(autouse=True)
def native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")


def factors(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 factors whose product has ``kind``'s character (zeros, ties, extremes...)."""
    scores = make_scores(kind, n, seed)
    other = torch.from_numpy(np.random.default_rng(seed + 1).choice([0.5, 1.0, -1.0, 0.25], n).astype(np.float32))
    return scores, other


def unpacked(answer: torch.Tensor | PackedMask) -> torch.Tensor:
    return answer.unpack() if isinstance(answer, PackedMask) else answer


def assert_exact_both(direction: torch.Tensor, grad: torch.Tensor, k: int) -> None:
    """Scores given materialised, as a product, and as a product answered in packed bits where the path packs."""
    product = direction * grad
    expected = oracle_mask(product, k)
    packed = topk_mask_of_product(direction, grad, k, packed=True)
    for mask in (topk_mask(product, k), topk_mask_of_product(direction, grad, k), unpacked(packed)):
        assert int(mask.sum()) == k
        assert torch.equal(mask, expected)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(DISTRIBUTIONS),
    n=st.one_of(st.integers(0, 300), st.sampled_from([select.SAMPLE_FROM - 1, select.SAMPLE_FROM, 50_000])),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_oracle_random(kind: str, n: int, seed: int) -> None:
    direction, grad = factors(kind, n, seed)
    for k in k_values(n, direction * grad, seed):
        assert_exact_both(direction, grad, k)


@pytest.mark.parametrize("kind", ["products", "zeros", "signed_zeros", "few", "block", "spikes", "extremes"])
def test_matches_oracle_on_three_threads(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "workers", lambda: 3)
    monkeypatch.setattr(threads, "RANGE", 20_000)
    direction, grad = factors(kind, 300_007, seed=3)
    for k in k_values(300_007, direction * grad, seed=4):
        assert_exact_both(direction, grad, k)


@pytest.mark.parametrize("kind", ["products", "block"])
def test_order_statistics_split_over_threads(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample and band large enough that their order statistics split over 3 threads (over 16,384 keys each: a
    denser sample of 2 million scores), the band in 3 range segments; the masks stay exact."""
    for module in (threads, kernels):
        monkeypatch.setattr(module, "workers", lambda: 3)
    monkeypatch.setattr(select, "NATIVE_DENSITY", 2.0)
    n = 2_000_003
    assert kernels.sample_size(n, select._stride(n, 2.0) // 2, select._stride(n, 2.0)) > 3 * 8192
    direction, grad = factors(kind, n, seed=5)
    for k in (n // 2, n // 7):
        assert_exact_both(direction, grad, k)


def test_band_wider_than_the_first_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny first band buffer overflows; the range is collected again, whole, and the mask stays exact."""
    monkeypatch.setattr(kernels, "_BAND_SHARE", 10**9)
    monkeypatch.setattr(kernels, "_BAND_MIN", 1)
    direction, grad = factors("products", 200_000, seed=5)
    assert_exact_both(direction, grad, 100_000)


def test_misleading_sample_costs_passes_not_exactness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spikes at exactly the sampled positions mislead the sample; the one-call selection misses, the Python
    search takes over (more counting passes) and the mask stays exact."""
    outcomes, passes = recording_outcomes(monkeypatch)
    direction, grad = factors("products", 200_000, seed=11)
    stride = select._stride(200_000, select.NATIVE_DENSITY)
    direction[stride // 2 :: stride] = 1e3
    assert_exact_both(direction, grad, 100_000)
    assert kernels.MISSED in outcomes and passes


def recording_outcomes(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Records the outcome of every `kernels.select_sampled` call and every Python-driven counting pass."""
    outcomes: list[int] = []
    passes: list[int] = []
    sampled, counting = kernels.select_sampled, kernels.count_band
    monkeypatch.setattr(kernels, "select_sampled", lambda *args: outcomes.append(sampled(*args)) or outcomes[-1])
    monkeypatch.setattr(kernels, "count_band", lambda *args, **kw: passes.append(1) or counting(*args, **kw))
    return outcomes, passes


@pytest.mark.parametrize("kind, k", [("products", 500_001), ("zeros", 300_000)])
def test_usual_case_is_one_native_call(kind: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous scores and a k-th score inside a big block of zero scores both take the one-call path: no
    counting pass driven from Python; asked for packed bits, it answers a `PackedMask` in the first bytes of
    ``out``."""
    outcomes, passes = recording_outcomes(monkeypatch)
    direction, grad = factors(kind, 1_000_003, seed=2)
    expected = oracle_mask(direction * grad, k)
    assert torch.equal(topk_mask_of_product(direction, grad, k), expected)
    out = torch.empty(1_000_003, dtype=torch.bool)
    packed = topk_mask_of_product(direction, grad, k, out=out, packed=True)
    assert isinstance(packed, PackedMask) and packed.bits.data_ptr() == out.data_ptr()
    assert torch.equal(packed.unpack(), expected)
    assert outcomes == [kernels.SELECTED] * 2 and not passes


@pytest.mark.parametrize("threads_used", [1, 2, 3])
def test_ties_at_the_kth_score_spread_over_ranges(threads_used: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A k-th score tied by scores scattered over every range, with continuous scores around it in the band: the
    band's ties are shared out in flat order across the ranges (bool and packed answers)."""
    monkeypatch.setattr(threads, "workers", lambda: threads_used)
    monkeypatch.setattr(threads, "RANGE", 20_000)
    rng = np.random.default_rng(21)
    n = 250_001
    scores = rng.standard_normal(n).astype(np.float32)
    scores[rng.random(n) < 0.02] = 0.0  # 2% ties at the median
    scores = torch.from_numpy(scores)
    above = int((scores > 0).sum())
    ties = int((scores == 0).sum())
    for k in (above + 1, above + ties // 3, above + ties - 1):
        assert_exact_both(scores, torch.ones(n), k)


@pytest.mark.parametrize("threads_used", [1, 2, 3])
def test_block_of_ties_at_the_kth_score_marked_from_its_bits(
    threads_used: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A k-th score inside a block of ties half the tensor wide (n not a multiple of 64): the bracket is the block
    itself, the counting pass records the ties' bits in the band buffer, and the first r of them join the mask,
    with the r-th in any range and at any bit of a word (bool and packed answers)."""
    monkeypatch.setattr(threads, "workers", lambda: threads_used)
    monkeypatch.setattr(threads, "RANGE", 20_000)
    rng = np.random.default_rng(22)
    n = 250_003
    scores = rng.standard_normal(n).astype(np.float32)
    scores[rng.random(n) < 0.5] = 0.0
    scores = torch.from_numpy(scores)
    above, ties = int((scores > 0).sum()), int((scores == 0).sum())
    for r in (ties // 2, ties // 2 + 1, 3 * ties // 5 + 17, ties // 3 + 63):
        assert_exact_both(scores, torch.ones(n), above + r)
        recorded = kernels._workspace("band", 1, np.float32).base[: kernels.packed_size(n) // 4].view(np.uint8)
        expected = np.packbits((scores == 0).numpy(), bitorder="little")
        assert np.array_equal(recorded[: (n - n % 64) // 8], expected[: (n - n % 64) // 8])


def test_block_of_ties_without_room_for_its_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Band buffers too small for a block of ties' bits: its first r ties are found by reading the scores again,
    and the mask stays exact."""
    monkeypatch.setattr(kernels, "_BAND_SHARE", 10**9)
    monkeypatch.setattr(kernels, "_BAND_MIN", 1)
    direction, grad = factors("zeros", 200_000, seed=6)
    above = int((direction * grad > 0).sum())
    assert_exact_both(direction, grad, above + int((direction * grad == 0).sum()) // 2)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 3000),
    n=st.integers(2, 10**9),
    fraction=st.floats(0, 1, exclude_max=True),
    ties=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_first_bracket_is_the_python_bracket(size: int, n: int, fraction: float, ties: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(size).astype(np.float32)
    if ties:
        pool = np.round(pool).astype(np.float32)
    k = min(n - 1, max(1, int(fraction * n)))
    expected = threshold._bracket(pool, threshold.Interval(-np.inf, np.inf, n, 0), k, 1.0)
    assert kernels.first_bracket(pool, n, k, threshold.MARGIN_SD) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n, k", [(1, 0), (300, 150), (50_000, 50_000), (50_000, 123)])
def test_non_finite_raises(bad: float, n: int, k: int) -> None:
    direction, grad = factors("normal", n, seed=1)
    direction[n // 2] = bad
    with pytest.raises(NonFiniteScoresError):
        topk_mask_of_product(direction, grad, k)
    with pytest.raises(NonFiniteScoresError):
        topk_mask(direction.clone(), k)


def test_overflowing_product_raises() -> None:
    direction = torch.full((1000,), 1e30)
    with pytest.raises(NonFiniteScoresError):
        topk_mask_of_product(direction, direction.clone(), 10)


def test_product_writes_into_out_and_checks_it() -> None:
    direction, grad = factors("zeros", 5000, seed=8)
    out = torch.empty(5000, dtype=torch.bool)
    assert topk_mask_of_product(direction, grad, 1234, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, oracle_mask(direction * grad, 1234))
    with pytest.raises(ValueError, match="shape"):
        topk_mask_of_product(direction, grad[:10], 5)
    with pytest.raises(TypeError, match="bool"):
        topk_mask_of_product(direction, grad, 5, out=torch.empty(5000))


def test_non_float32_factors_take_the_product_path() -> None:
    direction, grad = factors("products", 3000, seed=9)
    mask = topk_mask_of_product(direction.bfloat16(), grad.double(), 1000)
    assert torch.equal(mask, oracle_mask(direction.bfloat16().float() * grad.double().float(), 1000))


def quotient_factors(kind: str, n: int, seed: int) -> tuple[AdamQuotient, torch.Tensor, torch.Tensor]:
    """An unformed `AdamQuotient` whose scores u·g have ``kind``'s character (g from `factors`), the gradient,
    and the direction formed independently."""
    grad, other = factors(kind, n, seed)
    gen = torch.Generator().manual_seed(seed)
    second = torch.rand(n, generator=gen) ** 2
    second[::7] = 0.0
    first = other * torch.rand(n, generator=gen)
    expected = adam_direction(first, second, 1e-8)
    return AdamQuotient(first, second, 1e-8, torch.full((n,), float("nan"))), grad, expected


@pytest.mark.parametrize("kind", ["products", "zeros", "signed_zeros", "block", "spikes"])
@pytest.mark.parametrize("n", [100, select.SAMPLE_FROM - 1, 50_000, 300_007])
def test_quotient_formed_by_the_first_pass(kind: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "workers", lambda: 3)
    monkeypatch.setattr(threads, "RANGE", 20_000)
    _, grad, direction = quotient_factors(kind, n, seed=n)
    for k in k_values(n, direction * grad, seed=n):
        quotient = quotient_factors(kind, n, seed=n)[0]
        assert quotient.fusable(grad)
        mask = topk_mask_of_product(quotient, grad, k)
        assert quotient.formed and torch.equal(quotient.out, direction)
        assert torch.equal(mask, oracle_mask(direction * grad, k))


@pytest.mark.parametrize("kind", ["products", "zeros", "block"])
@pytest.mark.parametrize("n", [100, 50_000, 300_007])
def test_quotient_with_pending_moments(kind: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `AdamQuotient` whose moments are still to be updated: whichever path forms it (the first counting pass,
    or `form` for small tensors), the moments are torch's update applied once, the direction theirs, and the
    mask the exact top-k of the updated scores."""
    monkeypatch.setattr(threads, "workers", lambda: 3)
    monkeypatch.setattr(threads, "RANGE", 20_000)
    unformed, grad, _ = quotient_factors(kind, n, seed=n)
    first, second = unformed.exp_avg.clone(), unformed.exp_avg_sq.clone()
    update_moments(first, second, grad, 0.9, 0.999)
    direction = adam_direction(first, second, 1e-8)
    k = n // 3
    moments = MomentUpdate(grad, 0.9, 0.999)
    quotient = AdamQuotient(unformed.exp_avg, unformed.exp_avg_sq, 1e-8, unformed.out, moments)
    assert quotient.fusable(grad)
    mask = topk_mask_of_product(quotient, grad, k)
    assert quotient.formed and torch.equal(quotient.out, direction)
    assert torch.equal(quotient.exp_avg, first) and torch.equal(quotient.exp_avg_sq, second)
    assert torch.equal(mask, oracle_mask(direction * grad, k))


def test_quotient_that_cannot_fuse_is_formed_first() -> None:
    quotient, grad, direction = quotient_factors("products", 40_000, seed=1)
    mask = topk_mask_of_product(quotient, grad.double(), 777)
    assert quotient.formed and torch.equal(quotient.out, direction)
    assert torch.equal(mask, oracle_mask(direction * grad, 777))
    with pytest.raises(ValueError, match="shape"):
        topk_mask_of_product(quotient_factors("products", 100, seed=2)[0], grad, 5)


def test_quotient_with_non_finite_direction_raises() -> None:
    quotient, grad, _ = quotient_factors("products", 50_000, seed=3)
    quotient.exp_avg_sq[123] = -1.0  # sqrt of a negative: NaN
    with pytest.raises(NonFiniteScoresError):
        topk_mask_of_product(quotient, grad + 1, 1000)


def test_band_outgrowing_the_buffers_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A band larger than the one-call path's buffers: it reports a miss, the Python search collects the band
    again (growing its buffer) from the formed direction, and the mask stays exact."""
    monkeypatch.setattr(kernels, "_BAND_SHARE", 10**9)
    monkeypatch.setattr(kernels, "_BAND_MIN", 1)
    outcomes, passes = recording_outcomes(monkeypatch)
    quotient, grad, direction = quotient_factors("products", 200_000, seed=4)
    mask = topk_mask_of_product(quotient, grad, 100_000)
    assert outcomes == [kernels.MISSED] and passes
    assert quotient.formed and torch.equal(quotient.out, direction)
    assert torch.equal(mask, oracle_mask(direction * grad, 100_000))
