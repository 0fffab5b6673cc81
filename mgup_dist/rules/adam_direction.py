"""The Adam direction ``u = m/(sqrt(v) + ε)`` (spec §1.1, not bias-corrected), formed now or on demand, with the
moment update that precedes it fused into the same pass where the native kernels can.

Every path forms it with a correctly rounded square root, so the native CPU kernel, the portable CPU path and
CUDA agree bit for bit. (torch's CPU ``sqrt`` is not correctly rounded for float32: on AVX-512 machines it
differs from IEEE ``sqrt`` in the last bit for a few percent of inputs, and it is several times slower on zeros,
e.g. the second moments of embedding rows that never saw a token.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mgup_dist.native import kernels


def _correct_sqrt(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = sqrt(values)`` correctly rounded: numpy's (the IEEE instruction) for float32/float64 CPU tensors,
    torch's elsewhere (correctly rounded on CUDA)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and out.dtype == values.dtype:
        np.sqrt(values.detach().numpy(), out=out.detach().numpy())
        return out
    return torch.sqrt(values, out=out)


_FLOAT32 = (torch.float32,)


def update_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> None:
    """``m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²`` in place (torch's operations)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


@dataclass(frozen=True)
class MomentUpdate:
    """The moment update (`update_moments`) still to apply before a direction is formed: the gradient
    (the moments' length) and the betas."""

    grad: torch.Tensor
    beta1: float
    beta2: float

    def coefficients(self) -> np.ndarray:
        """What the native passes take (`mgup_dist.native.kernels.moment_coefficients`)."""
        return kernels.moment_coefficients(self.beta1, self.beta2)

    def reads(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` (1-D, contiguous) is this update's gradient: the same memory, length and dtype."""
        own = self.grad
        return own.data_ptr() == grad.data_ptr() and own.shape == grad.shape and own.dtype == grad.dtype


def adam_direction(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float, out: torch.Tensor | None = None,
    moments: MomentUpdate | None = None,
) -> torch.Tensor:
    """``u = m/(sqrt(v) + ε)`` (1-D tensors of one length and dtype) in ``out`` (same length and dtype; it may be
    ``exp_avg_sq`` when there are no ``moments``), or in a fresh tensor. With ``moments``, ``m`` and ``v`` are
    updated in place first (`update_moments`). Each operation is rounded to the tensors' dtype. Float32 CPU
    tensors go through one native pass that also updates the moments
    (`mgup_dist.native.kernels.adam_direction`), bit for bit the portable operations on CPUs with FMA."""
    out = torch.empty_like(exp_avg_sq) if out is None else out
    grad = None if moments is None else moments.grad
    if kernels.usable(exp_avg, exp_avg_sq, out, grad, dtypes=_FLOAT32):
        kernels.adam_direction(exp_avg, exp_avg_sq, eps, out, grad, None if moments is None else moments.coefficients())
        return out
    if moments is not None:
        update_moments(exp_avg, exp_avg_sq, grad, moments.beta1, moments.beta2)
    denom = _correct_sqrt(exp_avg_sq, out).add_(eps)
    return torch.div(exp_avg, denom, out=denom)


@dataclass
class AdamQuotient:
    """The Adam direction of one tensor, formed on demand into ``out`` (1-D, all tensors of one length; ``out``
    none of the others). With ``moments``, ``exp_avg`` and ``exp_avg_sq`` are the previous step's until the
    direction is formed, which updates them first: read them only after `form`.

    A rule hands it to MGUP's selection inside a `mgup_dist.rules.requests.ScoreProduct`: the native selection
    forms it (moments included) in the same pass that counts the first bracket of scores (`fusable`), every
    other path calls `form`. Either way the rule reads the direction from `form` afterwards; its bits, and the
    moments', never depend on which path formed it.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    eps: float
    out: torch.Tensor
    moments: MomentUpdate | None = None
    formed: bool = False

    def form(self) -> torch.Tensor:
        """The direction in ``out``, computed (after the moment update) on the first call."""
        if not self.formed:
            adam_direction(self.exp_avg, self.exp_avg_sq, self.eps, out=self.out, moments=self.moments)
            self.formed = True
        return self.out

    def fusable(self, grad: torch.Tensor) -> bool:
        """Whether the native counting pass can form it while scoring against ``grad``: not yet formed, every
        operand a float32 contiguous CPU tensor, and ``grad`` the moment update's gradient (if there is one)."""
        return (
            not self.formed
            and kernels.usable(self.exp_avg, self.exp_avg_sq, self.out, grad, dtypes=_FLOAT32)
            and (self.moments is None or self.moments.reads(grad))
        )

    def operands(self) -> kernels.Quotient:
        """What the native counting pass takes (see `fusable`)."""
        coefficients = None if self.moments is None else self.moments.coefficients()
        return kernels.Quotient(self.exp_avg_sq, self.eps, self.out, coefficients)
