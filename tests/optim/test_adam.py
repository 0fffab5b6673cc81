"""AdamW, MGUPAdamW, CMGUPAdamW and AlphaAdam against the float64 reference and torch.optim.AdamW."""
import math

import pytest
import torch

from mgup_dist import AdamW, MGUPAdamW
from tests.optim.stepping import make_params, reference_errors, run_package
from tests.reference.cases import GRAD_SCALES, MIXED_SHAPES, TIE_HEAVY, gradient_sequence, initial_params

COMMON = {"lr": 1e-2, "weight_decay": 0.1}


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("adamw", {}),
        ("adamw", {"correct_bias": False, "betas": (0.8, 0.9), "eps": 1e-3}),
        ("mgup_adamw", {}),
        ("mgup_adamw", {"mask_ratio": 0.7, "alpha": 1.5, "gamma": 0.5}),
        ("mgup_adamw", {"mask_ratio": 0.29, "correct_bias": False}),
        ("cmgup_adamw", {}),
        ("cmgup_adamw", {"alpha": 3.0, "gamma": 0.0, "eps": 1e-3}),
        ("alpha_adam", {}),
        ("alpha_adam", {"score_source": "update"}),
        ("alpha_adam", {"alpha_ema": 0.6, "alpha_min": 0.3}),
    ],
)
def test_matches_float64_reference(name: str, hparams: dict) -> None:
    """Mixed shapes (1-D, 1-element, both non-square orientations, 4-D, tie-heavy), weight decay on, 5 steps."""
    errors = reference_errors(name, **COMMON, **hparams)
    assert max(errors) <= 1e-12, errors


def _torch_adamw_run(values, sequence, eps_at, **hparams) -> list[torch.Tensor]:
    params = make_params(values)
    optimizer = torch.optim.AdamW(params, **hparams)
    for t, grads in enumerate(sequence, start=1):
        optimizer.param_groups[0]["eps"] = eps_at(t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("cls, extra", [(AdamW, {}), (MGUPAdamW, {"alpha": 1.0, "gamma": 1.0})])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_agrees_with_torch_adamw_up_to_eps_placement(cls, extra: dict, eps: float) -> None:
    """Flavour A (spec §1.1) equals torch.optim.AdamW (flavour B) run with ε_torch = ε/sqrt(1−β2^t) at
    step t; with ε = 0 the two coincide directly. Agreement is to rounding, not bitwise. The tie-heavy tensor
    is left out: a coordinate whose gradient stayed 0 would be 0/0 at ε = 0."""
    shapes = MIXED_SHAPES[:TIE_HEAVY]
    values, sequence = initial_params(shapes), gradient_sequence(5, shapes, GRAD_SCALES[:TIE_HEAVY])
    betas = (0.9, 0.99)
    params = make_params(values)
    optimizer = cls(params, lr=1e-2, betas=betas, eps=eps, weight_decay=0.1, **extra)
    for grads in sequence:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected = _torch_adamw_run(values, sequence, lambda t: eps / math.sqrt(1 - betas[1] ** t),
                                lr=1e-2, betas=betas, weight_decay=0.1)
    for ours, theirs in zip(params, expected):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-13)


NATIVE_SHAPES = ((300, 200), (40_000,), (1000,), (64, 3, 3, 3))  # the first two take the sampled, fused path


@pytest.mark.parametrize("name", ["adamw", "mgup_adamw", "cmgup_adamw", "alpha_adam"])
def test_same_bits_with_and_without_native_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32, 4 steps with a tie-heavy gradient: parameters and state identical bit for bit whether the native
    kernels (direction, fused first counting pass, masked update) run or the portable path does."""
    values = initial_params(NATIVE_SHAPES, seed=3)
    sequence = gradient_sequence(4, NATIVE_SHAPES, (1.0,) * 4, seed=4)
    for grads in sequence:
        grads[1][torch.rand(grads[1].shape, generator=torch.Generator().manual_seed(5)) < 0.6] = 0.0
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("MGUP_DIST_NATIVE", native)
        runs.append(run_package(name, values, sequence, dtype=torch.float32, **COMMON))
    (native_params, native_opt), (portable_params, portable_opt) = runs
    for a, b, start in zip(native_params, portable_params, values):
        assert torch.equal(a, b)
        assert not torch.equal(a, start.float())  # it moved
        for key, value in native_opt.state[a].items():
            other = portable_opt.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
