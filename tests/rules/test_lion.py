"""Lion and MGUP-Lion rules (spec §1.2, §2.5, §8 item 4)."""
import pytest
import torch

from mgup_dist import Lion, MGUPLion
from tests.optim.stepping import apply_grads, make_params, run_package
from tests.reference.cases import gradient_sequence, initial_params


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_mgup_lion_with_unit_factors_is_lion_bitwise(tau: float) -> None:
    values, sequence = initial_params(), gradient_sequence(4)
    hp = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.95)}
    masked, _ = run_package("mgup_lion", values, sequence, torch.float32, mask_ratio=tau, alpha=1.0, gamma=1.0, **hp)
    plain, _ = run_package("lion", values, sequence, torch.float32, **hp)
    assert all(torch.equal(a, b) for a, b in zip(masked, plain))


def test_lion_step_is_decay_then_sign_of_interpolation_then_momentum() -> None:
    """θ ← θ·(1−ηλ) − η·sign(β1·m + (1−β1)·g); m ← β2·m + (1−β2)·g, with sign(0) = 0."""
    lr, wd, beta1, beta2 = 0.5, 0.25, 0.5, 0.75
    param = make_params([torch.tensor([1.0, 2.0, -1.0, 0.0])])
    optimizer = Lion(param, lr=lr, weight_decay=wd, betas=(beta1, beta2))
    g1, g2 = torch.tensor([1.0, -2.0, 0.0, 4.0]), torch.tensor([-0.5, 1.0, 0.0, -4.0])
    apply_grads(optimizer, param, [g1])
    theta1 = torch.tensor([1.0, 2.0, -1.0, 0.0]) * (1 - lr * wd) - lr * torch.sign(g1)
    assert torch.equal(param[0].detach().float(), theta1)
    assert torch.equal(optimizer.state[param[0]]["exp_avg"].float(), (1 - beta2) * g1)
    apply_grads(optimizer, param, [g2])
    direction = torch.sign(beta1 * (1 - beta2) * g1 + (1 - beta1) * g2)
    assert direction.tolist() == [-1.0, 1.0, 0.0, -1.0]
    assert torch.equal(param[0].detach().float(), theta1 * (1 - lr * wd) - lr * direction)


def test_mgup_lion_scores_sign_times_raw_gradient() -> None:
    """Score c·g = |g| here (c = sign(g) at step 1): τ = 0.5 of 6 gives α to the 3 largest |g|, γ to the rest;
    zero gradients get c = 0, so their factor is invisible."""
    param = make_params([torch.zeros(6)])
    optimizer = MGUPLion(param, lr=1.0, mask_ratio=0.5, alpha=4.0, gamma=0.5)
    apply_grads(optimizer, param, [torch.tensor([0.1, -3.0, 2.0, -0.2, 0.0, 1.0])])
    assert param[0].detach().tolist() == [-0.5, 4.0, -4.0, 0.5, 0.0, -4.0]
