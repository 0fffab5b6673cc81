"""`mgup_dist.native.kernels` against plain numpy: each kernel on random and tie-heavy data, with and without
a second factor, split over three threads, at edge cuts and ranks (``MGUP_DIST_NATIVE=1``: fails rather than
falls back when the kernels cannot be built)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mgup_dist import native
from mgup_dist.native import kernels, threads
from mgup_dist.ops.select import topk_mask_of_product


@pytest.fixture(autouse=True)
def native_on_three_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
    monkeypatch.setattr(threads, "workers", lambda: 3)
    monkeypatch.setattr(threads, "RANGE", 10_000)


def data(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    if ties:
        a = np.round(a).astype(np.float32)
        a[rng.random(n) < 0.3] = -0.0
    return a, rng.standard_normal(n).astype(np.float32)


def scores(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return a if b is None else a * b


@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("n", [0, 7, 2049, 100_003])
@pytest.mark.parametrize("bounds", [(-0.1, 0.2), (0.0, 0.0), (-np.inf, np.inf), (float(np.nextafter(np.float32(1), np.float32(0))), 1.0)])
def test_count_band(with_b: bool, n: int, bounds: tuple[float, float]) -> None:
    a, b = data(n, seed=n, ties=True)
    b = b if with_b else None
    s, (lower, upper) = scores(a, b), bounds
    for collect in (False, True):
        counts = kernels.count_band(a, b, lower, upper, collect)
        inside = (s > lower) & (s <= upper)
        assert counts.above_upper == int((s > upper).sum()) and counts.inside == int(inside.sum())
        assert counts.nonfinite == 0
        assert np.array_equal(counts.band, s[inside] if collect else s[:0])


def test_count_band_counts_non_finite() -> None:
    a, b = data(50_000, seed=1)
    a[[3, 20_000, 49_999]] = [np.nan, np.inf, -np.inf]
    assert kernels.count_band(a, b, -1.0, 1.0, True).nonfinite == 3
    assert kernels.count_band(a, None, 0.0, 0.0, False).nonfinite == 3


@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("cut", [-5, 0, 1, 33_333, 99_999, 100_000, 100_005])
def test_fill_mask(with_b: bool, cut: int) -> None:
    a, b = data(100_000, seed=2, ties=True)
    b = b if with_b else None
    s, value = scores(a, b), 0.0
    out = np.empty(100_000, dtype=bool)
    kernels.fill_mask(a, b, value, cut, out)
    edge = min(max(cut, 0), 100_000)
    assert np.array_equal(out, np.concatenate([s[:edge] >= value, s[edge:] > value]))


def tied(with_b: bool, seed: int, at: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, float, np.ndarray]:
    """Tie-heavy factors ``a`` (and ``b`` when ``with_b``), their scores, the score at ``at`` and where it recurs."""
    a, b = data(30_000, seed=seed, ties=True)
    b = b if with_b else None
    s = scores(a, b)
    value = float(s[at])
    return a, b, s, value, np.flatnonzero(s == value)


@pytest.mark.parametrize("with_b", [False, True])
def test_locate_ties(with_b: bool) -> None:
    a, b, s, value, positions = tied(with_b, seed=3, at=17)
    for r in (1, 2, len(positions) // 2, len(positions)):
        assert kernels.locate_ties(a, b, value, r) == positions[r - 1] + 1
    with pytest.raises(ValueError, match="fewer than"):
        kernels.locate_ties(a, b, value, len(positions) + 1)


@pytest.mark.parametrize("n", [1, 2, 1000, 77_777])
@pytest.mark.parametrize("kind", ["normal", "ties", "extremes"])
@pytest.mark.parametrize("threads", [1, 3, 4])
def test_order_statistics(n: int, kind: str, threads: int) -> None:
    """Exact on every thread split (77,777 keys split into 3 or 4 ranges, each compacted on its own thread)."""
    rng = np.random.default_rng(n)
    values = {
        "normal": rng.standard_normal(n),
        "ties": rng.choice([-0.0, 0.0, 1.0, -2.5], n),
        "extremes": rng.choice([3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 1.0], n),
    }[kind].astype(np.float32)
    before = values.copy()
    ranks = sorted({0, n // 3, n // 2, n - 1})
    expected = np.sort(values)[ranks]
    assert kernels.order_statistics(values, ranks, threads) == pytest.approx(list(expected), abs=0, rel=0)
    assert np.array_equal(values, before)


def test_scaled_update_is_torchs_where_mul_add() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 123_457
    param, direction = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.5
    expected = param.clone().add_(direction * torch.where(mask, 1.75, 0.125), alpha=-3e-4)
    kernels.scaled_update(param.numpy(), direction.numpy(), mask.numpy(), 1.75, 0.125, -3e-4)
    assert torch.equal(param, expected)



@pytest.mark.parametrize("n", [5, 64, 123_457])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_update_with_decay_is_torchs_decay_cast_and_step(n: int, mask_kind: str, dtype: torch.dtype) -> None:
    """Decay, widening a bfloat16 direction, Φ and the step in one pass: bit for bit ``param.mul_(decay)``, the cast
    to float32, then ``param.add_(direction * where(mask, high, low), alpha)`` (``param.add_(direction, alpha)``
    without a mask), the vector body and the scalar tail alike."""
    gen = torch.Generator().manual_seed(n)
    param, direction = torch.randn(n, generator=gen), torch.randn(n, generator=gen).to(dtype)
    mask = torch.rand(n, generator=gen) < 0.5
    decay = 1 - 2e-3 * 0.1
    wide = direction.float()
    step = wide * torch.where(mask, 1.75, 0.125) if mask_kind != "none" else wide
    expected = param.clone().mul_(decay).add_(step, alpha=-3e-4)
    given = {"none": None, "bool": mask.numpy(), "packed": bits_of(mask.numpy())}[mask_kind]
    kernels.scaled_update(param, direction, given, 1.75, 0.125, -3e-4, packed=mask_kind == "packed", decay=decay)
    assert torch.equal(param, expected)


@pytest.mark.parametrize("n", [5, 100_003])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_is_torchs_mul_add_and_nesterov_add(n: int, nesterov: bool) -> None:
    """``buf.mul_(mu).add_(grad)`` and ``grad.add(buf, alpha=mu)``, bit for bit, over three steps."""
    gen = torch.Generator().manual_seed(n)
    buf, expected = torch.zeros(n), torch.zeros(n)
    for _ in range(3):
        grad = torch.randn(n, generator=gen)
        expected.mul_(0.95).add_(grad)
        direction = torch.full((n,), float("nan")) if nesterov else None
        kernels.momentum(buf, grad, 0.95, direction)
        assert torch.equal(buf, expected)
        if nesterov:
            assert torch.equal(direction, grad.add(expected, alpha=0.95))

def bits_of(mask: np.ndarray) -> np.ndarray:
    """A bool mask packed as the kernels pack it: element i is bit i % 8 of byte i // 8."""
    return np.packbits(mask, bitorder="little")


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` elements of a packed mask, as bools (the bits past them are unspecified)."""
    return np.unpackbits(bits, bitorder="little")[:n].astype(bool)


@pytest.mark.parametrize("n", [5, 64, 123_457])
def test_scaled_update_with_packed_bits_is_the_bool_update(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    param, direction = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    mask = (torch.rand(n, generator=gen) < 0.5).numpy()
    expected = param.clone()
    kernels.scaled_update(expected.numpy(), direction.numpy(), mask, 1.75, 0.125, -3e-4)
    kernels.scaled_update(param.numpy(), direction.numpy(), bits_of(mask), 1.75, 0.125, -3e-4, packed=True)
    assert torch.equal(param, expected)


@pytest.mark.parametrize("n", [7, 2049, 100_003])
def test_counting_pass_packs_the_mask_it_writes(n: int) -> None:
    """Packed, the counting pass writes the bits of the bool mask it would write (ranges never share a byte) and
    counts and collects the same; ties marked and a band settled in bits are the bool ones packed."""
    a, b = data(n, seed=n + 1, ties=True)
    s = a * b
    for lower, upper in [(-0.3, 0.4), (float(np.nextafter(np.float32(0), np.float32(-1))), 0.0)]:
        mask = np.zeros(n, dtype=bool)
        bits = np.full(kernels.packed_size(n), 0xA5, dtype=np.uint8)  # stale bits must be overwritten
        plain = kernels.count_band(a, b, lower, upper, True, mask)
        packed = kernels.count_band(a, b, lower, upper, True, bits, packed=True)
        assert np.array_equal(unpack(bits, len(mask)), mask)
        assert plain[:3] == packed[:3]
        assert np.array_equal(plain.band, packed.band) and np.array_equal(plain.where, packed.where)
        if plain.inside == 0:
            continue
        value = float(np.sort(plain.band)[len(plain.band) // 2])
        r = int((plain.band == value).sum()) // 2 + 1
        kernels.settle_band(plain, value, r, mask)
        kernels.settle_band(packed, value, r, bits, packed=True)
        assert np.array_equal(unpack(bits, len(mask)), mask)
    a, b, s, value, positions = tied(True, seed=n, at=5)
    mask, bits = s > value, bits_of(s > value)
    kernels.mark_ties(a, b, value, len(positions) // 2, mask)
    kernels.mark_ties(a, b, value, len(positions) // 2, bits, packed=True)
    assert np.array_equal(unpack(bits, len(mask)), mask)


@pytest.mark.parametrize("tensor, usable", [
    (torch.zeros(5), True),
    (torch.zeros(5, dtype=torch.bool), True),
    (torch.zeros(5, dtype=torch.float64), False),
    (torch.zeros(2, 3), False),
    (torch.zeros(10)[::2], False),
])
def test_usable(tensor: torch.Tensor, usable: bool) -> None:
    assert kernels.usable(tensor, None) is usable


@pytest.mark.parametrize("with_b", [False, True])
def test_mark_ties(with_b: bool) -> None:
    a, b, s, value, positions = tied(with_b, seed=6, at=5)
    for r in (1, len(positions) // 3, len(positions)):
        mask = s > value
        kernels.mark_ties(a, b, value, r, mask)
        expected = s > value
        expected[positions[:r]] = True
        assert np.array_equal(mask, expected)
    with pytest.raises(ValueError, match="fewer than"):
        kernels.mark_ties(a, b, value, len(positions) + 1, s > value)


@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("n", [2, 3, 768, 5000])
def test_topk_small_is_the_stable_sort_prefix(with_b: bool, n: int) -> None:
    a, b = data(n, seed=n + 7, ties=True)
    b = b if with_b else None
    s = scores(a, b).astype(np.float64)
    for k in sorted({1, n // 2, n - 1}):
        mask = np.zeros(n, dtype=bool)
        assert kernels.topk_small(a, b, k, mask) == 0
        expected = np.zeros(n, dtype=bool)
        expected[np.argsort(-s, kind="stable")[:k]] = True
        assert np.array_equal(mask, expected)
    a[n // 2] = np.nan
    assert kernels.topk_small(a, b, 1, np.zeros(n, dtype=bool)) == 1


@pytest.mark.parametrize("with_moments", [False, True])
@pytest.mark.parametrize("n", [2, 768, 5003])
def test_topk_small_forms_the_direction_it_scores(with_moments: bool, n: int) -> None:
    """With a quotient, one call updates the moments (when given coefficients), forms the direction as
    `adam_direction` does and selects on its scores: the same bits as the two calls in sequence."""
    m, v, g = moment_inputs(n, seed=n)
    coefficients = kernels.moment_coefficients(0.9, 0.999) if with_moments else None
    fused_m, fused_v, u = m.copy(), v.copy(), np.full_like(m, np.nan)
    plain_m, plain_v, direction = m.copy(), v.copy(), np.empty_like(m)
    kernels.adam_direction(plain_m, plain_v, 1e-8, direction, g if with_moments else None, coefficients)
    for k in sorted({1, n // 2, n - 1}):
        mask, expected = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        assert kernels.topk_small(direction, g, k, expected) == 0
        step_m, step_v = fused_m.copy(), fused_v.copy()
        assert kernels.topk_small(step_m, g, k, mask, kernels.Quotient(step_v, 1e-8, u, coefficients)) == 0
        assert np.array_equal(u, direction) and np.array_equal(mask, expected)
        assert np.array_equal(step_m, plain_m) and np.array_equal(step_v, plain_v)


def test_settle_band_after_a_masked_count() -> None:
    a, b = data(200_000, seed=9, ties=True)
    s = a * b
    values = np.unique(s)
    lower, upper = float(values[len(values) // 2 - 3]), float(values[len(values) // 2 + 3])
    mask = np.zeros(len(s), dtype=bool)
    counts = kernels.count_band(a, b, lower, upper, True, mask=mask)
    assert np.array_equal(counts.where, np.flatnonzero((s > lower) & (s <= upper)))
    value = float(values[len(values) // 2])
    ties = np.flatnonzero(s == value)
    r = len(ties) // 2 + 1
    kernels.settle_band(counts, value, r, mask)
    expected = s > value
    expected[ties[:r]] = True
    assert np.array_equal(mask, expected)


def moments(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A first moment and a non-negative second moment with zeros, subnormals, huge and tiny values."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(n).astype(np.float32)
    v = (rng.random(n) ** 4).astype(np.float32)
    v[::5], v[1::11], v[2::13] = 0.0, np.float32(1e-41), np.float32(3e38)
    m[3::17] = 0.0
    return m, v


def quotient_reference(m: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """IEEE float32 sqrt, then torch's add of the float eps and its float32 division."""
    return torch.div(torch.from_numpy(m), torch.from_numpy(np.sqrt(v)).add_(eps)).numpy()


@pytest.mark.parametrize("eps", [1e-8, 1e-6, 0.0])
def test_adam_direction_is_the_correctly_rounded_quotient(eps: float) -> None:
    m, v = moments(100_003, seed=5)
    u = np.empty_like(m)
    kernels.adam_direction(m, v, eps, u)
    assert np.array_equal(u, quotient_reference(m, v, eps), equal_nan=True)
    kernels.adam_direction(m, v, eps, v)  # in place over v
    assert np.array_equal(v, u, equal_nan=True)


def test_count_band_forms_the_quotient_while_counting() -> None:
    m, v = moments(100_003, seed=6)
    g = np.random.default_rng(7).standard_normal(len(m)).astype(np.float32)
    u, mask, plain_mask = np.full_like(m, np.nan), np.zeros(len(m), bool), np.zeros(len(m), bool)
    direction = quotient_reference(m, v, 1e-8)
    fused = kernels.count_band(m, g, -0.5, 0.25, True, mask, kernels.Quotient(v, 1e-8, u))
    plain = kernels.count_band(direction, g, -0.5, 0.25, True, plain_mask)
    assert np.array_equal(u, direction)
    assert np.array_equal(mask, plain_mask)
    assert fused[:3] == plain[:3]
    assert np.array_equal(fused.band, plain.band) and np.array_equal(fused.where, plain.where)


def moment_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moments and a gradient with exact zeros, tiny and large values (a tail that is not a multiple of 32)."""
    m, v = moments(n, seed)
    g = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
    g[::11], g[5::13], g[7::17] = 0.0, 1e-20, 3e4
    return m, v, g


def fma_reference(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 fma(x, y, z), correctly rounded: the float32 product is exact in float64, the float64 sum s
    carries its exact error e (TwoSum), and where s lies exactly halfway between two float32 values the sign of e
    picks the side (so the double rounding a plain float64 sum would add cannot happen)."""
    product = x.astype(np.float64) * y.astype(np.float64)
    addend = z.astype(np.float64)
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)
    nearest = total.astype(np.float32)
    other = np.nextafter(nearest, np.where(total > nearest, np.float32(np.inf), np.float32(-np.inf)))
    halfway = (nearest.astype(np.float64) + other.astype(np.float64)) / 2 == total
    toward = np.where(error > 0, np.maximum(nearest, other), np.minimum(nearest, other))
    return np.where(halfway & (error != 0), toward, nearest)


def updated_moments(
    m: np.ndarray, v: np.ndarray, g: np.ndarray, beta1: float, beta2: float
) -> tuple[np.ndarray, np.ndarray]:
    """An independent reference of the native moment update: fma(g, 1−β1, m·β1), fma((1−β2)·g, g, v·β2)."""
    f = np.float32
    return (fma_reference(g, f(1 - beta1), m * f(beta1)), fma_reference(f(1 - beta2) * g, g, v * f(beta2)))


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.0), (0.95, 0.5)])
def test_adam_direction_updates_the_moments_in_the_same_pass(betas: tuple[float, float]) -> None:
    """With moment coefficients the pass updates m and v as torch's mul_/add_/addcmul_ do (on CPUs with FMA, which
    this one has: the AVX2 build requires it) and forms the direction of the updated moments."""
    m, v, g = moment_inputs(100_003, seed=12)
    expected_m, expected_v = updated_moments(m, v, g, *betas)
    torch_m, torch_v = torch.from_numpy(m.copy()), torch.from_numpy(v.copy())
    torch_m.mul_(betas[0]).add_(torch.from_numpy(g), alpha=1 - betas[0])
    torch_v.mul_(betas[1]).addcmul_(torch.from_numpy(g), torch.from_numpy(g), value=1 - betas[1])
    u = np.full_like(m, np.nan)
    kernels.adam_direction(m, v, 1e-8, u, g, kernels.moment_coefficients(*betas))
    assert np.array_equal(m, expected_m) and np.array_equal(v, expected_v)
    assert np.array_equal(m, torch_m.numpy()) and np.array_equal(v, torch_v.numpy())
    assert np.array_equal(u, quotient_reference(expected_m, expected_v, 1e-8), equal_nan=True)


@pytest.mark.parametrize("packed", [False, True])
def test_count_band_updates_the_moments_while_counting(packed: bool) -> None:
    """The MOMENTS counting pass: the moments it leaves, the direction, counts, band, positions and mask are
    those of the moment update followed by the quotient pass. The band (10% of the scores) outgrows the first
    buffer, so `count_band` runs the pass twice: the moments are still updated once."""
    m, v, g = moment_inputs(100_003, seed=13)
    expected_m, expected_v = updated_moments(m, v, g, 0.9, 0.999)
    size = kernels.packed_size(len(m)) if packed else len(m)
    mask, plain_mask = np.zeros(size, np.uint8 if packed else bool), np.zeros(size, np.uint8 if packed else bool)
    u, plain_u = np.full_like(m, np.nan), np.full_like(m, np.nan)
    s = quotient_reference(expected_m, expected_v, 1e-8) * g
    lower, upper = (float(x) for x in np.quantile(s, [0.45, 0.55]).astype(np.float32))
    fused = kernels.count_band(m, g, lower, upper, True, mask,
                               kernels.Quotient(v, 1e-8, u, kernels.moment_coefficients(0.9, 0.999)), packed)
    plain = kernels.count_band(expected_m, g, lower, upper, True, plain_mask,
                               kernels.Quotient(expected_v.copy(), 1e-8, plain_u), packed)
    assert np.array_equal(m, expected_m) and np.array_equal(v, expected_v)
    assert np.array_equal(u, plain_u) and np.array_equal(mask, plain_mask)
    assert fused[:3] == plain[:3] and fused.inside > 0
    assert np.array_equal(fused.band, plain.band) and np.array_equal(fused.where, plain.where)


@pytest.mark.parametrize("start, stride", [(0, 1), (3, 7), (100_002, 5), (50, 100_000)])
def test_sampled_selection_samples_the_scores_at_the_strided_positions(start: int, stride: int) -> None:
    """The sample `select_sampled` gathers (`gathered_sample`): the scores at ``start, start + stride, ...``, also
    when they are products or directions formed from the moments (NaN and infinity included)."""
    m, v = moments(100_003, seed=8)
    g = np.random.default_rng(9).standard_normal(len(m)).astype(np.float32)
    at = slice(start, None, stride)
    u = np.full_like(m, np.nan)
    cases = [
        (None, None, m[at]),
        (g, None, (m * g)[at]),
        (g, kernels.Quotient(v, 1e-8, u), (quotient_reference(m, v, 1e-8) * g)[at]),
    ]
    for factor, quotient, expected in cases:
        mask = np.zeros(len(m), dtype=bool)
        kernels.select_sampled(m, factor, quotient, len(m) // 3, mask, start, stride, 2.5)
        assert np.array_equal(kernels.gathered_sample(len(m), start, stride), expected, equal_nan=True)
    # with moment coefficients: the directions of the moments updated there (the pass then updates them all)
    updated_m, updated_v = updated_moments(m, v, g, 0.9, 0.999)
    mask = np.zeros(len(m), dtype=bool)
    quotient = kernels.Quotient(v, 1e-8, u, kernels.moment_coefficients(0.9, 0.999))
    kernels.select_sampled(m, g, quotient, len(m) // 3, mask, start, stride, 2.5)
    expected = (quotient_reference(updated_m, updated_v, 1e-8) * g)[at]
    assert np.array_equal(kernels.gathered_sample(len(m), start, stride), expected, equal_nan=True)
    assert np.array_equal(m, updated_m) and np.array_equal(v, updated_v)


def test_counting_pass_without_avx2_is_the_same(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counting pass's portable loop (built without instruction-set flags) gives what its AVX2 loop gives:
    counts, band, positions, mask (bool and packed) and the formed direction (with the moments updated in the same
    pass or not), on scores with ties, zeros and a non-finite one; so do the fused moment update and direction,
    the packed masked update and a selection whose k-th score is in a block of ties (the pass records the ties'
    bits)."""
    m, v = moments(100_003, seed=10)
    g = np.random.default_rng(11).standard_normal(len(m)).astype(np.float32)
    g[::9] = 0.0

    def run() -> list[np.ndarray]:
        results = []
        for lower, upper, quotient in [(-0.3, 0.4, True), (-0.5, 0.25, False), (0.0, 0.0, False)]:
            u, mask = np.full_like(m, np.nan), np.zeros(len(m), bool)
            counts = kernels.count_band(m, g, lower, upper, True, mask, kernels.Quotient(v, 1e-8, u) if quotient else None)
            results += [np.array(counts[:3]), counts.band, counts.where, mask, u]
        bits = np.zeros(kernels.packed_size(len(m)), dtype=np.uint8)
        counts = kernels.count_band(m, g, -0.3, 0.4, True, bits, packed=True)
        param = g.copy()
        kernels.scaled_update(param, m, bits, 1.5, 0.25, -1e-3, packed=True)
        results += [np.array(counts[:3]), counts.band, counts.where, unpack(bits, len(m)), param]
        coefficients = kernels.moment_coefficients(0.9, 0.999)
        first, second, u = m.copy(), v.copy(), np.full_like(m, np.nan)
        quotient = kernels.Quotient(second, 1e-8, u, coefficients)
        counts = kernels.count_band(first, g, -0.3, 0.4, True, bits, quotient, True)
        results += [np.array(counts[:3]), counts.band, counts.where, unpack(bits, len(m)), first, second, u]
        first, second = m.copy(), v.copy()
        kernels.adam_direction(first, second, 1e-8, u, g, coefficients)
        results += [first, second, u]
        broken = m.copy()
        broken[77_777] = np.inf
        results.append(np.array(kernels.count_band(broken, g, -1.0, 1.0, False)[:3]))
        tied = torch.from_numpy(np.where(g > 0.5, g, np.float32(0)))  # ~70% zero scores
        k = int((tied > 0).sum()) + 20_000
        for packed in (False, True):
            answer = topk_mask_of_product(tied, torch.ones(len(m)), k, packed=packed)
            results.append((answer.unpack() if packed else answer).numpy())
        return results

    vectorised = run()
    monkeypatch.setattr(native, "isa_flags", lambda: ())
    monkeypatch.setenv("MGUP_DIST_CACHE", str(tmp_path))
    native._cached.cache_clear()
    try:
        portable = run()
        assert native.build().parent.parent == tmp_path / "mgup_dist"
    finally:
        native._cached.cache_clear()
    assert len(vectorised) == len(portable)
    for got, expected in zip(portable, vectorised):
        assert np.array_equal(got, expected, equal_nan=True)
