"""Muon-family matrix-path rules (spec §1.4, §1.5, §2.6, §5.2, §5.3, §8 items 4, 18, 19, 22, 23)."""
import math

import pytest
import torch

from mgup_dist import MARSM, MGUPMuon, Muon
from mgup_dist.rules.newton_schulz import newton_schulz
from tests.optim.stepping import apply_grads, make_params, run_package
from tests.reference import mgup_factors, newton_schulz5
from tests.reference.cases import gradient_sequence, initial_params

F32 = {"ns_dtype": torch.float32}


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_mgup_muon_with_unit_factors_is_muon_bitwise(tau: float, ns_dtype: torch.dtype) -> None:
    """§8.4, mixed shapes (the 1-D ones on the AdamW path), same adamw_betas."""
    values, sequence = initial_params(), gradient_sequence(4)
    hp = {"lr": 1e-2, "weight_decay": 0.1, "adamw_betas": (0.9, 0.95), "ns_dtype": ns_dtype}
    masked, _ = run_package("mgup_muon", values, sequence, torch.float32, mask_ratio=tau, alpha=1.0, gamma=1.0, **hp)
    plain, _ = run_package("muon", values, sequence, torch.float32, **hp)
    assert all(torch.equal(a, b) for a, b in zip(masked, plain))


def test_mgup_muon_adamw_path_is_never_masked() -> None:
    shapes = ((7,), (1,))
    values, sequence = initial_params(shapes), gradient_sequence(4, shapes, (1.0, 1.0))
    hp = {"lr": 1e-2, "weight_decay": 0.1, "adamw_betas": (0.95, 0.95)}
    masked, _ = run_package("mgup_muon", values, sequence, mask_ratio=0.5, alpha=4.0, gamma=0.5, **hp)
    plain, _ = run_package("muon", values, sequence, **hp)
    assert all(torch.equal(a, b) for a, b in zip(masked, plain))


def test_mgup_muon_scores_nesterov_input_before_and_masks_after_orthogonalisation() -> None:
    """Step 1 from zero: N = G + μ·G; Φ = MGUP_MASK(N, G); θ = −η·0.2·sqrt(max)·(NS5(N) ⊙ Φ)."""
    g = torch.randn(4, 6, dtype=torch.float64)
    param = make_params([torch.zeros(4, 6)])
    optimizer = MGUPMuon(param, lr=0.1, weight_decay=0.0, momentum=0.9, mask_ratio=0.25, alpha=3.0, gamma=0.5, **F32)
    apply_grads(optimizer, param, [g])
    n = g + 0.9 * g
    phi = mgup_factors(n, g, 0.25, 3.0, 0.5)
    expected = -0.1 * 0.2 * math.sqrt(6) * newton_schulz(n, 5, torch.float32).double() * phi
    torch.testing.assert_close(param[0].detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [Muon, MGUPMuon, MARSM])
def test_conv_kernel_uses_flattened_view_and_its_scale(cls) -> None:
    """§8.23: a (o, i, kh, kw) = (4, 2, 3, 3) param is orthogonalised as its (4, 18) view and scaled by
    0.2·sqrt(18). Step 1 from zero, no decay, τ = 1 with α = 1 for MGUP-Muon."""
    g = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    param = make_params([torch.zeros(4, 2, 3, 3)])
    extra = {"mask_ratio": 1.0, "alpha": 1.0} if cls is MGUPMuon else {}
    optimizer = cls(param, lr=0.1, weight_decay=0.0, momentum=0.9, **F32, **extra)
    apply_grads(optimizer, param, [g])
    if cls is MARSM:
        c = g * (1 + 0.025 * 0.9 / 0.1)
        direction = (0.1 * (c / c.norm() if c.norm() > 1 else c)).reshape(4, 18)
    else:
        direction = (g + 0.9 * g).reshape(4, 18)
    expected = -0.1 * 0.2 * math.sqrt(18) * newton_schulz(direction, 5, torch.float32).double()
    torch.testing.assert_close(param[0].detach(), expected.reshape(4, 2, 3, 3), rtol=1e-12, atol=0)


def test_muon_update_rms_is_about_0_2() -> None:
    """§1.4/§8.22: from zero, one Muon step with lr 1 is −0.2·sqrt(max(A, B))·NS5(N), whose RMS ≈ 0.2."""
    param = make_params([torch.zeros(16, 24)])
    optimizer = Muon(param, lr=1.0, weight_decay=0.0, **F32)
    apply_grads(optimizer, param, [torch.randn(16, 24)])
    rms = param[0].detach().square().mean().sqrt().item()
    assert 0.136 <= rms <= 0.228


def _small_matrix_grads(steps: int) -> list[list[torch.Tensor]]:
    """Gradients small enough that MARS-M's clip never triggers."""
    return gradient_sequence(steps, ((5, 3), (4, 6)), (0.05, 0.05))


def test_mars_m_approx_equals_efficient_form_without_clip() -> None:
    """§8.18: MARS-M-efficient (§5.3), E ← μE + ((1−γ)(1−μ)/μ)·G, D = γG + μE, has D_t ≡ M_t of MARS-M-approx
    when the clip never triggers: the momentum to fp64 precision, the update within bf16 NS tolerance."""
    mu, gamma, lr, wd = 0.9, 0.1, 1e-2, 0.1
    values, sequence = initial_params(((5, 3), (4, 6))), _small_matrix_grads(5)
    params = make_params(values)
    optimizer = MARSM(params, lr=lr, weight_decay=wd, momentum=mu, gamma=gamma)
    efficient = [v.clone() for v in values]
    state = [torch.zeros_like(v) for v in values]
    for grads in sequence:
        apply_grads(optimizer, params, grads)
        for i, g in enumerate(grads):
            state[i] = mu * state[i] + ((1 - gamma) * (1 - mu) / mu) * g
            d = gamma * g + mu * state[i]
            torch.testing.assert_close(optimizer.state[params[i]]["momentum_buffer"], d, rtol=1e-12, atol=1e-15)
            scale = 0.2 * math.sqrt(max(g.shape))
            efficient[i] = efficient[i] * (1 - lr * wd) - lr * scale * newton_schulz5(d)
    for ours, theirs, start in zip(params, efficient, values):
        assert ((ours.detach() - theirs).norm() / (theirs - start).norm()).item() < 6e-2


@pytest.mark.parametrize("nesterov", [True, False])
def test_mars_m_special_gammas_are_moonlight_muon(nesterov: bool) -> None:
    """§8.19: without clipping, MARS-M with γ = 1−μ has momentum (1−μ)·(G + μ·M_muon), Moonlight's Nesterov
    input times 1−μ; with γ = 0 it is EMA momentum = (1−μ)·M_muon without Nesterov. NS5's scale invariance then
    makes the parameters agree to float32 NS rounding."""
    mu = 0.9
    gamma = 1 - mu if nesterov else 0.0
    values, sequence = initial_params(((5, 3), (4, 6))), _small_matrix_grads(4)
    mars_params, muon_params = make_params(values), make_params(values)
    mars = MARSM(mars_params, lr=1e-2, momentum=mu, gamma=gamma, **F32)
    muon = Muon(muon_params, lr=1e-2, momentum=mu, nesterov=nesterov, **F32)
    for grads in sequence:
        apply_grads(mars, mars_params, grads)
        apply_grads(muon, muon_params, grads)
        for a, b, g in zip(mars_params, muon_params, grads):
            buffer = muon.state[b]["momentum_buffer"]
            muon_input = g + mu * buffer if nesterov else buffer
            torch.testing.assert_close(mars.state[a]["momentum_buffer"], (1 - mu) * muon_input, rtol=1e-12, atol=1e-15)
    for a, b, start in zip(mars_params, muon_params, values):
        assert ((a - b).norm() / (b - start).norm()).item() < 1e-5


def test_mars_m_clip_bounds_corrected_gradient() -> None:
    """A large gradient is clipped to unit Frobenius norm before the EMA: M_1 = (1−μ)·c/‖c‖_F."""
    g = 10 * torch.randn(3, 4, dtype=torch.float64)
    param = make_params([torch.zeros(3, 4)])
    optimizer = MARSM(param, momentum=0.9, **F32)
    apply_grads(optimizer, param, [g])
    torch.testing.assert_close(optimizer.state[param[0]]["momentum_buffer"], 0.1 * g / g.norm(), rtol=1e-12, atol=0)
