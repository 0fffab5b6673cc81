"""Self-checks of the float64 reference against torch and the spec's closed forms, so that package-vs-reference
agreement means agreement with the spec."""
import math

import pytest
import torch

from tests.reference import AmbiguousMask, ReferenceOptimizer, mgup_factors, newton_schulz5, ns_polynomial
from tests.reference.cases import gradient_sequence, initial_params


def test_reference_adamw_is_torch_adamw_with_scaled_eps() -> None:
    """Flavour A equals torch-style AdamW with ε_t = ε/sqrt(1−β2^t) (spec §1.1)."""
    values, sequence = initial_params(), gradient_sequence(5)
    hp = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1}
    reference = ReferenceOptimizer("adamw", values, **hp)
    params = [torch.nn.Parameter(v.clone()) for v in values]
    baseline = torch.optim.AdamW(params, **hp)
    for t, grads in enumerate(sequence, start=1):
        reference.step(grads)
        baseline.param_groups[0]["eps"] = hp["eps"] / math.sqrt(1 - hp["betas"][1] ** t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        baseline.step()
    for ours, theirs in zip(reference.params, params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-13)


def test_reference_mars_fallback_is_torch_adamw() -> None:
    """MARS-AdamW's non-2-D branch is torch AdamW with lr·lr_1d/lr, betas_1d, weight_decay_1d (spec §4.4)."""
    values = initial_params(shapes=((6,), (2, 3, 2, 2)))
    sequence = gradient_sequence(4, shapes=((6,), (2, 3, 2, 2)), scales=(1.0, 1.0))
    reference = ReferenceOptimizer("mars_adamw", values, lr=2e-2, lr_1d=1e-2, weight_decay=0.3)
    params = [torch.nn.Parameter(v.clone()) for v in values]
    baseline = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for grads in sequence:
        reference.step(grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        baseline.step()
    for ours, theirs in zip(reference.params, params):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_reference_ns5_singular_values_follow_the_polynomial(shape) -> None:
    """NS5(G) = U·p⁵(S/(‖G‖_F+1e-7))·Vᵀ in exact arithmetic (spec §1.3)."""
    g = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expected = u @ torch.diag(ns_polynomial(s / (s.square().sum().sqrt() + 1e-7))) @ vh
    torch.testing.assert_close(newton_schulz5(g), expected, rtol=0, atol=1e-12)


def test_reference_mask_ties_go_to_lowest_flat_indices() -> None:
    """k = int(0.5·6) = 3: the 5.0 wins, then the three zero ties (one of them −0.0) give two slots to
    the lowest indices (spec §2.2)."""
    update = torch.tensor([[1.0, -1.0, 1.0], [5.0, 1.0, -2.0]], dtype=torch.float64)
    grad = torch.tensor([[0.0, 0.0, 0.0], [1.0, -3.0, 1.0]], dtype=torch.float64)
    phi = mgup_factors(update, grad, 0.5, 2.0, 0.1)
    assert phi.tolist() == [[2.0, 2.0, 0.1], [2.0, 0.1, 0.1]]


def test_reference_rejects_near_threshold_scores() -> None:
    update = torch.tensor([1.0, 1.0 + 1e-9, 0.5], dtype=torch.float64)
    grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AmbiguousMask):
        mgup_factors(update, grad, 0.34, 2.0, 0.1)
