"""MARS-AdamW rule (spec §4.2, §8 item 14): the corrected gradient c seen through the first moment."""
import torch

from mgup_dist import MARSAdamW
from tests.optim.stepping import apply_grads, make_params

BETA1 = 0.95


def _first_moments(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """exp_avg after each step of a default MARSAdamW on one 2-D tensor."""
    param = make_params([torch.zeros_like(grads[0])])
    optimizer = MARSAdamW(param)
    moments = []
    for g in grads:
        apply_grads(optimizer, param, [g])
        moments.append(optimizer.state[param[0]]["exp_avg"].clone())
    return moments


def test_first_step_correction_is_1_475_g() -> None:
    """c_1 = (1 + γβ1/(1−β1))·g_1 = 1.475·g_1 at the defaults (last_grad starts at 0), unclipped here."""
    g = torch.full((2, 3), 0.1, dtype=torch.float64)
    (m1,) = _first_moments([g])
    torch.testing.assert_close(m1, (1 - BETA1) * 1.475 * g, rtol=1e-15, atol=0)


def test_constant_gradient_gives_uncorrected_c_after_step_one() -> None:
    """With g_t = g for all t, c_t = g for t ≥ 2, so m_t = β1·m_{t−1} + (1−β1)·g."""
    g = torch.linspace(-0.1, 0.1, 6, dtype=torch.float64).reshape(2, 3)
    moments = _first_moments([g] * 4)
    for previous, current in zip(moments, moments[1:]):
        torch.testing.assert_close(current, BETA1 * previous + (1 - BETA1) * g, rtol=1e-14, atol=0)


def test_clip_gives_unit_norm_parallel_to_c() -> None:
    """‖c̃‖_F = min(‖c‖_F, 1) with c̃ ∥ c: step 1 from a large gradient gives m_1 = (1−β1)·c/‖c‖_F."""
    g = torch.randn(4, 5, dtype=torch.float64)
    (m1,) = _first_moments([g])
    clipped = m1 / (1 - BETA1)
    torch.testing.assert_close(clipped.norm().item(), 1.0, rtol=1e-14, atol=0)
    torch.testing.assert_close(clipped, g / g.norm(), rtol=1e-13, atol=1e-16)
