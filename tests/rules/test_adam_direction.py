"""`mgup_dist.rules.adam_direction`: the Adam direction is the same bits on the native and the portable path (a
correctly rounded square root on both), matches a float64 reference to float32 rounding, and an `AdamQuotient`
forms once, whichever path forms it; a pending moment update is applied once, before the direction, with the same
bits on both paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mgup_dist.rules.adam_direction import AdamQuotient, MomentUpdate, adam_direction, update_moments


def moments(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=gen, dtype=dtype)
    v = torch.rand(n, generator=gen, dtype=dtype) ** 4
    v[::4] = 0.0
    v[1::9] = 1e-41 if dtype == torch.float32 else 1e-300
    return m, v


@pytest.mark.parametrize("n", [1, 1000, 300_001])
def test_native_and_portable_paths_agree_bitwise(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    m, v = moments(n, seed=n)
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
    native = adam_direction(m, v, 1e-8)
    monkeypatch.setenv("MGUP_DIST_NATIVE", "0")
    portable = adam_direction(m, v, 1e-8)
    assert torch.equal(native, portable)


@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(native: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", native)
    m, v = moments(50_000, seed=2, dtype=dtype)
    out = torch.empty_like(v)
    assert adam_direction(m, v, 1e-8, out=out) is out
    m64, v64 = m.double().numpy(), v.double().numpy()
    expected = m64 / (np.sqrt(v64) + 1e-8)
    tolerance = 2e-7 if dtype == torch.float32 else 1e-15  # three roundings in the tensors' dtype
    assert np.allclose(out.double().numpy(), expected, rtol=tolerance, atol=0)


def test_bfloat16_takes_torchs_path() -> None:
    m, v = (t.bfloat16() for t in moments(1000, seed=3))
    expected = torch.div(m, torch.sqrt(v).add_(1e-3))
    assert torch.equal(adam_direction(m, v, 1e-3), expected)


def test_quotient_forms_once() -> None:
    m, v = moments(100, seed=4)
    out = torch.full_like(m, float("nan"))
    quotient = AdamQuotient(m, v, 1e-8, out)
    assert quotient.fusable(torch.ones(100)) == quotient.fusable(m)
    formed = quotient.form()
    assert formed is out and quotient.formed and torch.equal(out, adam_direction(m, v, 1e-8))
    out.fill_(7.0)  # a formed quotient is not formed again
    assert torch.equal(quotient.form(), torch.full_like(m, 7.0))
    assert not quotient.fusable(m)


@pytest.mark.parametrize("native, grad, fusable", [
    ("1", torch.ones(100), True),
    ("0", torch.ones(100), False),
    ("1", torch.ones(100, dtype=torch.float64), False),
    ("1", torch.ones(200)[::2], False),
])
def test_fusable(native: str, grad: torch.Tensor, fusable: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", native)
    m, v = moments(100, seed=5)
    assert AdamQuotient(m, v, 1e-8, torch.empty(100)).fusable(grad) is fusable


def moments_and_grad(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, v = moments(n, seed)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    grad[::5] = 0.0
    return m, v, grad


@pytest.mark.parametrize("n", [1, 1000, 300_001])
def test_pending_moments_native_and_portable_agree_bitwise(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native pass that updates the moments and forms the direction gives torch's moment update (this CPU has
    FMA) followed by the direction, and forms once."""
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("MGUP_DIST_NATIVE", native)
        m, v, grad = moments_and_grad(n, seed=n)
        quotient = AdamQuotient(m, v, 1e-8, torch.empty(n), MomentUpdate(grad, 0.9, 0.999))
        quotient.form()
        quotient.form()  # formed once: the moments are not updated again
        results.append((m, v, quotient.out))
    m, v, grad = moments_and_grad(n, seed=n)
    update_moments(m, v, grad, 0.9, 0.999)
    for got in results:
        for tensor, expected in zip(got, (m, v, adam_direction(m, v, 1e-8))):
            assert torch.equal(tensor, expected)


def test_fusable_with_moments_needs_their_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counting pass can update the moments only from the gradient it scores against: the same memory (another
    view of it counts), not a copy with equal values."""
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
    m, v, grad = moments_and_grad(100, seed=6)
    quotient = AdamQuotient(m, v, 1e-8, torch.empty(100), MomentUpdate(grad, 0.9, 0.999))
    assert quotient.fusable(grad) and quotient.fusable(grad.view(-1)[:])
    assert not quotient.fusable(grad.clone())
    assert not quotient.fusable(torch.cat([grad, grad])[:100].clone())
