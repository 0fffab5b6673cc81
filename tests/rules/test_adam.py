"""Adam-family rules through their optimizers: spec §8 items 1, 2 and 5–10, 12 (MGUP-AdamW, CMGUP-AdamW,
AlphaAdam reductions to AdamW and their factor identities).

"Update term" identities are checked from zero parameters: with θ = 0 the decay is a no-op and the step
writes −step_size·(u ⊙ Φ) directly, so factors that are powers of two give bitwise relations.
"""
import io

import pytest
import torch

from mgup_dist import AdamW, AlphaAdam, CMGUPAdamW
from tests.optim.stepping import apply_grads, make_params, run_package
from tests.reference.cases import gradient_sequence, initial_params

SHAPES = ((7,), (1,), (5, 3), (2, 3, 2, 2), (6, 8))
ADAM = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-3}


def _sequence(steps: int = 4) -> list[list[torch.Tensor]]:
    return gradient_sequence(steps, SHAPES, (1.0,) * len(SHAPES))


def _aligned_sequence(steps: int = 4) -> list[list[torch.Tensor]]:
    """Gradients with a fixed sign pattern per coordinate (and some exact zeros): every u ⊙ g ≥ 0 and every
    m_{t−1} ⊙ g_t ≥ 0 at every step."""
    generator = torch.Generator().manual_seed(11)
    signs = [torch.randn(s, generator=generator, dtype=torch.float64).sign() for s in SHAPES]
    return [[sign * g.abs() for sign, g in zip(signs, grads)] for grads in _sequence(steps)]


def _zeros():
    return [torch.zeros(s, dtype=torch.float64) for s in SHAPES]


def _run(name: str, sequence, values=None, **hparams):
    params, _ = run_package(name, _zeros() if values is None else values, sequence, torch.float32, **hparams)
    return [p.detach() for p in params]


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_mgup_adamw_with_unit_factors_is_adamw_bitwise(tau: float) -> None:
    """§8.1, from non-zero params with weight decay and correct_bias both ways."""
    values = initial_params(SHAPES)
    for correct_bias in (True, False):
        hp = dict(ADAM, weight_decay=0.1, correct_bias=correct_bias)
        masked = _run("mgup_adamw", _sequence(), values, mask_ratio=tau, alpha=1.0, gamma=1.0, **hp)
        plain = _run("adamw", _sequence(), values, **hp)
        assert all(torch.equal(a, b) for a, b in zip(masked, plain))


@pytest.mark.parametrize("tau, factor", [(1.0, 4.0), (0.0, 0.5), (0.1, 0.5)])
def test_mgup_adamw_all_alpha_or_all_gamma(tau: float, factor: float) -> None:
    """§8.2: τ = 1 gives α everywhere; τ = 0 gives γ everywhere, and so does τ·d < 1 (τ = 0.1 on the 7- and
    1-element tensors only). Compared from zero params with weight decay on: power-of-two factors commute with
    rounding, so the relation is bitwise. That the decay itself is unscaled is tests/optim/test_base.py's
    superposition test."""
    sequence = _sequence()
    if tau == 0.1:
        sequence = [grads[:2] for grads in sequence]
    hp = dict(ADAM, weight_decay=0.2)
    masked = _run("mgup_adamw", sequence, mask_ratio=tau, alpha=4.0, gamma=0.5, **hp)
    plain = _run("adamw", sequence, **hp)
    for a, b in zip(masked, plain):
        assert torch.equal(a, factor * b)


def test_cmgup_all_aligned_is_alpha_times_adamw() -> None:
    """§8.5: with u ⊙ g ≥ 0 everywhere (exact zeros count as aligned), every update term is α × AdamW's."""
    masked = _run("cmgup_adamw", _aligned_sequence(), alpha=4.0, gamma=0.5, **ADAM)
    plain = _run("adamw", _aligned_sequence(), **ADAM)
    assert all(torch.equal(a, 4.0 * b) for a, b in zip(masked, plain))


def test_cmgup_misaligned_coordinates_get_gamma() -> None:
    """Step 2 flips the sign of one large gradient coordinate so that u·g < 0 there: it gets γ, the others α."""
    grads = [[torch.tensor([0.1, 0.2, 0.3])], [torch.tensor([0.1, 0.2, -1e-3])]]
    params = make_params([torch.zeros(3)])
    masked = CMGUPAdamW(params, alpha=4.0, gamma=0.5, **ADAM)
    twin = make_params([torch.zeros(3)])
    plain = AdamW(twin, **ADAM)
    for step_grads in grads:
        for p in params + twin:
            p.data.zero_()
        apply_grads(masked, params, step_grads)
        apply_grads(plain, twin, step_grads)
    assert torch.equal(params[0].detach(), twin[0].detach() * torch.tensor([4.0, 4.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("score_source", ["momentum", "update"])
@pytest.mark.parametrize("alpha_ema", [0.0, 0.9])
def test_alpha_adam_all_aligned_is_adamw_bitwise(score_source: str, alpha_ema: float) -> None:
    """§8.6: step 1 is always all-aligned; later all-aligned steps stay AdamW when alpha_ema = 0 or the history
    is all aligned. Weight decay on, non-zero params."""
    values = initial_params(SHAPES)
    hp = dict(ADAM, weight_decay=0.1)
    masked = _run("alpha_adam", _aligned_sequence(), values, score_source=score_source, alpha_ema=alpha_ema, **hp)
    plain = _run("adamw", _aligned_sequence(), values, **hp)
    assert all(torch.equal(a, b) for a, b in zip(masked, plain))


def _second_step_factors(first, second, **hparams) -> torch.Tensor:
    """Φ of AlphaAdam's second step on a 1-D tensor, from zeroed params: the ratio to AdamW's step-2 term."""
    alpha_params, adam_params = make_params([torch.zeros(len(first))]), make_params([torch.zeros(len(first))])
    alpha, adam = AlphaAdam(alpha_params, **ADAM, **hparams), AdamW(adam_params, **ADAM)
    for grads in ([torch.tensor(first)], [torch.tensor(second)]):
        for p in alpha_params + adam_params:
            p.data.zero_()
        apply_grads(alpha, alpha_params, grads)
        apply_grads(adam, adam_params, grads)
    return alpha_params[0].detach() / adam_params[0].detach()


@pytest.mark.parametrize(
    "second, alpha_min, expected",
    [
        ([1.0, 2.0, -3.0, -4.0], 0.01, [2.0, 2.0, 0.5, 0.5]),      # f = 1/2: factors 1/f and f
        ([1.0, 2.0, 3.0, -4.0], 0.01, [4 / 3, 4 / 3, 4 / 3, 0.75]),  # f = 3/4
        ([1.0, -2.0, -3.0, -4.0], 0.5, [2.0, 0.5, 0.5, 0.5]),      # f = 1/4 < alpha_min: 1/alpha_min, alpha_min
        ([-1.0, -2.0, -3.0, -4.0], 0.25, [0.25] * 4),             # f = 0: alpha_min everywhere
        ([0.0, 2.0, -3.0, -4.0], 0.01, [2.0, 2.0, 0.5, 0.5]),      # s_i = 0 counts as aligned
    ],
)
def test_alpha_adam_factors(second, alpha_min: float, expected) -> None:
    """§8.7 (momentum source, alpha_ema = 0): aligned terms ×1/ā, the others ×ā, ā = max(f, alpha_min);
    mean(Φ) = 1 + f − f² when f ≥ alpha_min. Step 1 is all positive, so m_1 > 0."""
    phi = _second_step_factors([0.5, 0.6, 0.7, 0.8], second, alpha_min=alpha_min)
    torch.testing.assert_close(phi, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    f = sum(1 for v in second if v >= 0) / 4
    if f >= alpha_min:
        torch.testing.assert_close(phi.mean().item(), 1 + f - f * f, rtol=1e-6, atol=0)


def test_alpha_adam_momentum_versus_update_score() -> None:
    """§8.8: coordinate 0 has m_1 > 0 small and g_2 ≪ 0, so m_1·g_2 < 0 (misaligned under "momentum") but
    m_2·g_2 > 0 (aligned under "update"). Coordinate 1 is aligned under both."""
    first, second = [1e-3, 0.5], [-1.0, 0.5]
    assert torch.equal(_second_step_factors(first, second, score_source="momentum"),
                       torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert torch.equal(_second_step_factors(first, second, score_source="update"),
                       torch.ones(2, dtype=torch.float64))


def test_alpha_adam_ema_recursion_and_midrun_state_dict_roundtrip() -> None:
    """§8.9: ā_t = ρ·ā_{t−1} + (1−ρ)·max(f_t, alpha_min) from ā_0 = 1 in state['alpha_bar']; a mid-run
    state_dict round trip (through torch.save) continues bitwise."""
    rho, alpha_min = 0.6, 0.3
    grads = [[0.5, 0.5, 0.5, 0.5], [1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]
    params = make_params([torch.zeros(4)])
    optimizer = AlphaAdam(params, alpha_ema=rho, alpha_min=alpha_min, **ADAM)
    expected = 1.0
    momentum = torch.zeros(4, dtype=torch.float64)
    for t, g in enumerate(grads):
        g = torch.tensor(g, dtype=torch.float64)
        fraction = ((momentum * g) >= 0).double().mean().item()
        momentum = 0.9 * momentum + 0.1 * g
        expected = rho * expected + (1 - rho) * max(fraction, alpha_min)
        apply_grads(optimizer, params, [g])
        assert optimizer.state[params[0]]["alpha_bar"] == expected
        if t == 1:
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            resumed_params = make_params([params[0].detach()])
            resumed = AlphaAdam(resumed_params, alpha_ema=rho, alpha_min=alpha_min, **ADAM)
            resumed.load_state_dict(torch.load(buffer))
        elif t > 1:
            apply_grads(resumed, resumed_params, [g])
            assert torch.equal(resumed_params[0], params[0])
            assert resumed.state[resumed_params[0]]["alpha_bar"] == expected


@pytest.mark.parametrize("score_source", ["momentum", "update"])
@pytest.mark.parametrize("alpha_ema", [0.0, 0.5])
def test_alpha_adam_step_formula_and_state_keys(score_source: str, alpha_ema: float) -> None:
    """§8.10 and §8.12: θ_{t+1} = θ_t·(1−ηλ) − step_size·(u ⊙ Φ) with Φ ≠ 1 (the decay unmasked), Φ = a/ā +
    (1−a)·ā with a = 1[s ≥ 0]; state is step, exp_avg, exp_avg_sq (+ alpha_bar when alpha_ema > 0)."""
    lr, wd, (beta1, beta2), eps = 1e-2, 0.3, ADAM["betas"], ADAM["eps"]
    values, sequence = initial_params(SHAPES), _sequence(3)
    params = make_params(values)
    optimizer = AlphaAdam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
                          score_source=score_source, alpha_ema=alpha_ema, alpha_min=0.01)
    apply_grads(optimizer, params, sequence[0])
    apply_grads(optimizer, params, sequence[1])
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, sequence[2]):
        state = optimizer.state[p]
        theta, m_prev = p.detach().clone(), state["exp_avg"].clone()
        bar_prev = state.get("alpha_bar", 1.0)
        p.grad = g.clone()
        optimizer.step()
        p.grad = None
        m, v = state["exp_avg"], state["exp_avg_sq"]
        u = m / (v.sqrt() + eps)
        aligned = (m_prev * g if score_source == "momentum" else u * g) >= 0
        bar = max(aligned.double().mean().item(), 0.01)
        bar = alpha_ema * bar_prev + (1 - alpha_ema) * bar if alpha_ema > 0 else bar
        phi = torch.where(aligned, torch.tensor(1 / bar, dtype=torch.float64), torch.tensor(bar, dtype=torch.float64))
        step_size = lr * (1 - beta2**3) ** 0.5 / (1 - beta1**3)
        torch.testing.assert_close(p.detach(), theta * (1 - lr * wd) - step_size * (u * phi), rtol=1e-14, atol=1e-15)
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} | ({"alpha_bar"} if alpha_ema > 0 else set())
