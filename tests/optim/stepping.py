"""Helpers that step an mgup_dist optimizer over a fixed gradient sequence (no autograd involved)."""
from collections.abc import Sequence

import torch

from mgup_dist import build_optimizer
from tests.reference import ReferenceOptimizer
from tests.reference.cases import gradient_sequence, initial_params


def make_params(values: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64,
                grad_dtype: torch.dtype | None = None) -> list[torch.nn.Parameter]:
    """Fresh leaf Parameters holding copies of `values` in `dtype`, with gradients in `grad_dtype` if given."""
    params = [torch.nn.Parameter(v.detach().to(dtype).clone()) for v in values]
    for p in params:
        p.grad_dtype = grad_dtype or dtype
    return params


def apply_grads(optimizer: torch.optim.Optimizer, params, grads: Sequence[torch.Tensor | None]) -> None:
    """Sets each param's .grad to a copy of its gradient in the param's grad dtype (None leaves it None) and
    takes one step."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().to(p.grad_dtype).clone()
    optimizer.step()


def run_package(name: str, values: Sequence[torch.Tensor], sequence, dtype: torch.dtype = torch.float64,
                grad_dtype: torch.dtype | None = None, **hparams) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Builds optimizer `name` over copies of `values` and applies every step of `sequence`."""
    params = make_params(values, dtype, grad_dtype)
    optimizer = build_optimizer(name, params, **hparams)
    for grads in sequence:
        apply_grads(optimizer, params, grads)
    return params, optimizer


def reference_errors(name: str, steps: int = 5, package_only: dict | None = None, **hparams) -> list[float]:
    """Relative Frobenius error of the package's displacement θ_T − θ_0 against the float64 reference's,
    per tensor of the mixed-shape case (0 where both did not move), after `steps` steps in float64.

    `package_only` holds keywords given to the package alone (e.g. ns_dtype, which the reference lacks).
    """
    values, sequence = initial_params(), gradient_sequence(steps)
    params, _ = run_package(name, values, sequence, **hparams, **(package_only or {}))
    reference = ReferenceOptimizer(name, values, **hparams)
    for grads in sequence:
        reference.step(grads)
    errors = []
    for ours, theirs, start in zip(params, reference.params, values):
        moved = (theirs - start).norm().item()
        gap = (ours.detach() - theirs).norm().item()
        errors.append(gap / moved if moved > 0 else gap)
    return errors
