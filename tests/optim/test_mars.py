"""MARSAdamW against the float64 reference and torch.optim.AdamW (spec §4.2, §4.4, §8 items 13 and 16)."""
import pytest
import torch

from mgup_dist import MARSAdamW
from tests.optim.stepping import apply_grads, make_params, reference_errors
from tests.reference.cases import gradient_sequence, initial_params

COMMON = {"lr": 1e-2, "weight_decay": 0.1}


@pytest.mark.parametrize(
    "hparams",
    [
        {},
        {"gamma": 0.1, "betas": (0.9, 0.95), "lr_1d": 4e-3, "weight_decay_1d": 0.05},
        {"optimize_1d": True},
        {"optimize_1d": True, "amsgrad": True},
    ],
)
def test_matches_float64_reference(hparams: dict) -> None:
    """Mixed shapes: 2-D tensors (one below the clip, the others above) take MARS, the 1-D, 1-element and 4-D
    ones the torch-style fallback unless optimize_1d; weight decay on; 5 approx-mode steps."""
    errors = reference_errors("mars_adamw", **COMMON, **hparams)
    assert max(errors) <= 1e-12, errors


def _torch_adamw(values, sequence, **hparams) -> list[torch.Tensor]:
    params = make_params(values)
    optimizer = torch.optim.AdamW(params, **hparams)
    for grads in sequence:
        apply_grads(optimizer, params, grads)
    return [p.detach() for p in params]


@pytest.mark.parametrize("scale", [0.02, 3.0])
def test_gamma_zero_is_torch_adamw_on_clipped_gradients(scale: float) -> None:
    """§8.13: γ = 0 on 2-D tensors equals torch AdamW(lr, betas, eps, wd), fed g/‖g‖_F when ‖g‖_F > 1."""
    shapes = ((5, 3), (3, 4))
    values = initial_params(shapes)
    sequence = gradient_sequence(5, shapes, (scale, scale))
    assert all((g.norm() > 1) == (scale > 1) for grads in sequence for g in grads)
    params = make_params(values)
    optimizer = MARSAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, gamma=0.0)
    for grads in sequence:
        apply_grads(optimizer, params, grads)
    clipped = [[g / g.norm() if g.norm() > 1 else g for g in grads] for grads in sequence]
    expected = _torch_adamw(values, clipped, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for ours, theirs in zip(params, expected):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-13)


def test_non_2d_fallback_is_torch_adamw_with_1d_hyperparameters() -> None:
    """§8.16: with optimize_1d=False a 1-D, a 1-element and a 4-D tensor follow torch AdamW with lr
    η·lr_1d/lr_ctor, betas_1d and weight_decay_1d, whatever the group's weight_decay; the lr ratio is fixed
    at construction, so a later group lr change scales the fallback lr too."""
    shapes = ((6,), (1,), (2, 3, 2, 2))
    values, sequence = initial_params(shapes), gradient_sequence(4, shapes, (1.0, 1.0, 5.0))
    params = make_params(values)
    optimizer = MARSAdamW(params, lr=2e-2, lr_1d=5e-3, betas_1d=(0.8, 0.9), weight_decay=0.7,
                          weight_decay_1d=0.2, eps=1e-6)
    expected_params = make_params(values)
    baseline = torch.optim.AdamW(expected_params, lr=5e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2)
    for t, grads in enumerate(sequence):
        if t == 2:
            optimizer.param_groups[0]["lr"] = 1e-2
            baseline.param_groups[0]["lr"] = 2.5e-3
        apply_grads(optimizer, params, grads)
        apply_grads(baseline, expected_params, grads)
    for ours, theirs in zip(params, expected_params):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-13)
