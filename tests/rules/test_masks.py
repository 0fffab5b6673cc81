"""The alignment-mask engine (spec §2.2, §3.2, §8 item 3): exact top-k MGUP factors and AlphaAdam's dynamic
factors, resolved through LocalOps and checked against the float64 reference."""
import math
import numpy as np
import pytest
import torch

from mgup_dist.ops.local import LocalOps
from mgup_dist.native import threads
from mgup_dist.rules import masks
from mgup_dist.rules.masks import dynamic_alpha, in_dtype, mgup_selection
from mgup_dist.rules.requests import NonFiniteScoresError, PackedMask
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.segment import Segment
from tests.reference import mgup_factors as reference_factors


def _resolve(rule):
    """Runs one rule generator to completion against LocalOps and returns its value."""
    ops, answer = LocalOps(), None
    try:
        while True:
            request = rule.send(answer)
            method = {"TopKMask": ops.topk_masks, "TensorSum": ops.tensor_sums}[type(request).__name__]
            answer = method([request])[0]
    except StopIteration as done:
        return done.value


def _factors(direction, grad, tau, alpha=2.0, gamma=0.5) -> torch.Tensor:
    segment = Segment.whole(0, tuple(direction.shape))
    hp = {"mask_ratio": tau, "alpha": alpha, "gamma": gamma}
    selected = _resolve(mgup_selection(direction.reshape(-1), grad.reshape(-1), segment, hp))
    return masks.sign_factors(selected, alpha, gamma, direction.dtype).reshape(direction.shape)


def test_count_is_int_of_tau_times_d() -> None:
    """τ = 0.29, d = 100: 0.29·100 = 28.999999999999996 in float64, so k = 28; min(s[α]) ≥ max(s[γ])."""
    direction, grad = torch.randn(10, 10), torch.randn(10, 10)
    phi = _factors(direction, grad, 0.29)
    assert int((phi == 2.0).sum()) == int(0.29 * 100) == 28
    scores = (direction * grad).reshape(-1)
    assert scores[phi.reshape(-1) == 2.0].min() >= scores[phi.reshape(-1) != 2.0].max()


@pytest.mark.parametrize("tau, d", [(0.0, 10), (0.05, 10), (0.5, 1)])
def test_k_zero_gives_gamma_everywhere(tau: float, d: int) -> None:
    assert torch.equal(_factors(torch.randn(d), torch.randn(d), tau), torch.full((d,), 0.5))


def test_tau_one_gives_alpha_everywhere() -> None:
    assert torch.equal(_factors(torch.randn(4, 5), torch.randn(4, 5), 1.0), torch.full((4, 5), 2.0))


def test_ties_go_to_lowest_flat_indices_and_negative_zero_ties_with_zero() -> None:
    """Scores (row-major) [−0, 3, +0, −0, −1, +0, 0, 2]: k = 5 takes 3, 2 and the three lowest-index zeros,
    whichever their sign."""
    direction = torch.tensor([[-1.0, 3.0, 1.0, -2.0], [1.0, 4.0, 5.0, 2.0]])
    grad = torch.tensor([[0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 1.0]])
    phi = _factors(direction, grad, 0.625)
    assert phi.tolist() == [[2.0, 2.0, 2.0, 2.0], [0.5, 0.5, 0.5, 2.0]]


def test_mean_factor_with_paper_convention_is_one_plus_tau_minus_tau_squared() -> None:
    tau = 0.25
    phi = _factors(torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64), tau,
                   alpha=1 / tau, gamma=tau)
    assert phi.mean().item() == 1 + tau - tau**2


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.77, 0.9])
def test_matches_reference_on_tie_heavy_scores(tau: float) -> None:
    """Scores with many exact ±0 ties (zero gradients, signed directions) and small-integer duplicates."""
    generator = torch.Generator().manual_seed(7)
    direction = torch.randint(-3, 4, (6, 9), generator=generator).double()
    grad = torch.randint(-2, 3, (6, 9), generator=generator).double()
    grad[torch.rand(6, 9, generator=generator) < 0.5] = 0.0
    phi = _factors(direction, grad, tau, alpha=1.5, gamma=0.25)
    assert torch.equal(phi, reference_factors(direction, grad, tau, 1.5, 0.25))


def test_non_finite_scores_raise() -> None:
    direction = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(NonFiniteScoresError):
        _factors(direction, torch.ones(3), 0.5)


def _dynamic(aligned: torch.Tensor, state: dict, alpha_min: float, alpha_ema: float) -> torch.Tensor:
    segment = Segment.whole(0, tuple(aligned.shape))
    slot = Slot(param=torch.zeros(aligned.numel()), grad=torch.zeros(aligned.numel()), state=state,
                segment=segment, allocate=lambda dtype: torch.zeros(aligned.shape, dtype=dtype))
    hp = {"alpha_min": alpha_min, "alpha_ema": alpha_ema}
    alpha_bar = _resolve(dynamic_alpha(aligned, slot, hp))
    return masks.sign_factors(aligned, 1 / alpha_bar, alpha_bar, torch.float64)  # what AlphaAdam's step applies


def _expected(aligned: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    up, down = torch.tensor(1 / alpha_bar, dtype=torch.float64), torch.tensor(alpha_bar, dtype=torch.float64)
    return torch.where(aligned, up, down)


@pytest.mark.parametrize("aligned_count, expected_bar", [(6, 0.75), (1, 0.25), (0, 0.25), (8, 1.0)])
def test_dynamic_factors_are_inverse_fraction_and_fraction_with_floor(aligned_count: int, expected_bar: float) -> None:
    """ā = max(f, alpha_min): aligned coordinates get 1/ā, the others ā; mean(Φ) = 1 + f − f² when f ≥ alpha_min."""
    aligned = torch.arange(8) < aligned_count
    phi = _dynamic(aligned, {}, alpha_min=0.25, alpha_ema=0.0)
    assert torch.equal(phi, _expected(aligned, expected_bar))
    if aligned_count / 8 >= 0.25:
        f = aligned_count / 8
        torch.testing.assert_close(phi.mean().item(), 1 + f - f * f, rtol=1e-15, atol=0)


def test_dynamic_factors_smooth_alpha_bar_from_one() -> None:
    """ā_t = ρ·ā_{t−1} + (1−ρ)·max(f_t, alpha_min) from ā_0 = 1, kept in state['alpha_bar']."""
    state, expected, rho = {}, 1.0, 0.7
    for count in (3, 0, 8, 5):
        aligned = torch.arange(8) < count
        phi = _dynamic(aligned, state, alpha_min=0.05, alpha_ema=rho)
        expected = rho * expected + (1 - rho) * max(count / 8, 0.05)
        assert state["alpha_bar"] == expected
        assert torch.equal(phi, _expected(aligned, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sign_factors_are_where_bit_for_bit(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The where-free construction (blocked on CPU: blocks of 7 here) gives exactly ``torch.where``'s values in
    ``dtype``: values rounded once, signed zeros, values beyond the clamp span and infinities included."""
    monkeypatch.setattr(masks, "_CPU_BLOCK", 7)
    selected = torch.rand(3, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    values = [2.0, 0.1, 0.0, -0.0, 1 / 3, -5.5, 1e-30, 3e38, 65504.0, 1e5, 2.0**100, float("inf")]
    as_bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for high in values:
        for low in values:
            expected = torch.where(selected, torch.tensor(high, dtype=dtype), torch.tensor(low, dtype=dtype))
            out = torch.empty(selected.shape, dtype=dtype)
            written = masks.sign_factors(selected, high, low, dtype, out=out)
            assert written.data_ptr() == out.data_ptr()
            for got in (masks.sign_factors(selected, high, low, dtype), written):
                assert torch.equal(got.view(as_bits), expected.view(as_bits)), (high, low)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [31, 600_001])
def test_masked_step_is_the_unfused_update_bit_for_bit(
    dtype: torch.dtype, native: str, n: int, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``masked_step`` leaves exactly ``param.add_(direction.mul_(Φ), alpha=-step_size)`` in ``param``, for
    clamped and ``where`` factors and a bool or packed selection: through the native kernel (float32 with
    ``MGUP_DIST_NATIVE=1``, split over 3 threads at 600,001 elements) and the portable blocks (7 elements here,
    the last one partial; a packed selection is unpacked for them)."""
    monkeypatch.setenv("MGUP_DIST_NATIVE", native)
    monkeypatch.setattr(masks, "_CPU_BLOCK", 7 if n < 100 else 4096)
    monkeypatch.setattr(threads, "workers", lambda: 3)
    gen = torch.Generator().manual_seed(5)
    selected = torch.rand(n, generator=gen) < 0.4
    param, direction = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
    for high, low in ((2.0, 0.1), (1 / 3, 3.0), (0.0, -0.0), (2.0**100, 0.5)):
        expected = param.clone()
        expected.add_(direction.clone().mul_(torch.where(
            selected, torch.tensor(high, dtype=dtype), torch.tensor(low, dtype=dtype))), alpha=-0.37)
        bits = torch.from_numpy(np.packbits(selected.numpy(), bitorder="little"))
        in_bool_buffer = torch.ones(n, dtype=torch.bool)  # as the native selection leaves them
        in_bool_buffer.view(torch.uint8)[: len(bits)] = bits
        integers = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
        for storage in (bits, in_bool_buffer) if packed else (None,):
            got = param.clone()
            masks.masked_step(got, direction.clone(), PackedMask(storage, n) if packed else selected, high, low, 0.37)
            assert torch.equal(got.view(integers), expected.view(integers)), (high, low)


def test_masked_step_on_a_parameter_that_requires_grad() -> None:
    """The native path reads the tensors' memory directly: a leaf that requires grad is updated in place too."""
    param = torch.nn.Parameter(torch.zeros(1000))
    selected = torch.arange(1000) < 300
    with torch.no_grad():
        masks.masked_step(param, torch.ones(1000), selected, 2.0, 0.5, 0.1)
    assert torch.equal(param.detach(), torch.where(selected, -0.2, -0.05))


def test_in_dtype_keeps_signed_zeros_apart_across_calls() -> None:
    """The rounding is remembered per exact value: a +0.0 rounded first must not answer for a later -0.0."""
    assert in_dtype((1.1,), torch.float32) == (float(torch.tensor(1.1, dtype=torch.float32)),)
    positive = in_dtype((0.0,), torch.float32)[0]
    negative = in_dtype((-0.0,), torch.float32)[0]
    assert math.copysign(1.0, positive) == 1.0
    assert negative == 0.0 and math.copysign(1.0, negative) == -1.0
    assert in_dtype((1 / 3,), torch.bfloat16) == (torch.tensor(1 / 3, dtype=torch.bfloat16).item(),)
