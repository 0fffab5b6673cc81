"""MARS exact-mode hooks and approx-mode last_grad (spec §0.6, §4.5, §8 item 17), MARSAdamW and MARSM.

The objective is the deterministic quadratic f(θ, ξ) = ½‖θ − ξ‖², so ∇f(θ, ξ) = θ − ξ is known in closed form.
"""
import pytest
import torch

from mgup_dist import MARSM, MARSAdamW
from tests.reference import ReferenceOptimizer

SHAPES = ((3, 4), (5,))
STEPS = 4


def _batches() -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [[0.3 * torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]
            for _ in range(STEPS + 1)]


def _backward(params, batch) -> None:
    loss = sum(0.5 * (p - xi).square().sum() for p, xi in zip(params, batch))
    loss.backward()


def _build(cls, params, is_approx: bool):
    extra = {"ns_dtype": torch.float32} if cls is MARSM else {}
    return cls(params, lr=0.1, weight_decay=0.1, gamma=0.5, is_approx=is_approx, **extra)


@pytest.mark.parametrize("cls, name", [(MARSAdamW, "mars_adamw"), (MARSM, "mars_m")])
def test_exact_mode_correction_uses_same_batch_at_previous_iterate(cls, name: str) -> None:
    """§4.5 loop: previous_grad holds ∇f(θ_t, ξ_{t+1}); at step t, last_grad = ∇f(θ_{t−1}, ξ_t) (zeros at t=1);
    the run matches the reference driven through the same hooks. MARSM keeps these for matrices only."""
    batches = _batches()
    values = [b.clone() + 1.0 for b in batches[0]]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    optimizer = _build(cls, params, is_approx=False)
    reference = ReferenceOptimizer(name, values, lr=0.1, weight_decay=0.1, gamma=0.5, is_approx=False)
    tracked = [True, cls is MARSAdamW]
    previous_iterate = None
    for t in range(STEPS):
        _backward(params, batches[t + 1])
        optimizer.update_previous_grad()
        reference.update_previous_grad([p.grad for p in params])
        for i, p in enumerate(params):
            assert ("previous_grad" in optimizer.state[p]) == tracked[i]
            if tracked[i]:
                assert torch.equal(optimizer.state[p]["previous_grad"], p.detach() - batches[t + 1][i])
        optimizer.zero_grad()
        _backward(params, batches[t])
        for i, p in enumerate(params):
            if tracked[i] and t > 0:
                assert torch.equal(optimizer.state[p]["last_grad"], previous_iterate[i] - batches[t][i])
        grads = [p.grad.clone() for p in params]
        previous_iterate = [p.detach().clone() for p in params]
        optimizer.step()
        reference.step(grads)
        optimizer.zero_grad()
        optimizer.update_last_grad()
        reference.update_last_grad()
    for ours, theirs in zip(params, reference.params):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [MARSAdamW, MARSM])
def test_exact_mode_step_never_writes_last_grad(cls) -> None:
    param = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    optimizer = _build(cls, [param], is_approx=False)
    param.grad = torch.full((3, 4), 0.2, dtype=torch.float64)
    optimizer.step()
    optimizer.step()
    assert not optimizer.state[param].get("last_grad", torch.zeros(1)).any()


@pytest.mark.parametrize("cls", [MARSAdamW, MARSM])
def test_approx_mode_hooks_are_noops_and_last_grad_survives_zero_grad(cls) -> None:
    """In approx mode step() copies g into last_grad; an in-place zero_grad(set_to_none=False) leaves that copy
    intact, and both hooks change nothing."""
    param = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    optimizer = _build(cls, [param], is_approx=True)
    grad = torch.linspace(-0.2, 0.3, 12, dtype=torch.float64).reshape(3, 4)
    param.grad = grad.clone()
    optimizer.step()
    optimizer.update_previous_grad()
    optimizer.zero_grad(set_to_none=False)
    optimizer.update_last_grad()
    assert not param.grad.any()
    assert "previous_grad" not in optimizer.state[param]
    assert torch.equal(optimizer.state[param]["last_grad"], grad)
