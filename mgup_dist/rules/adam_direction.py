"""The Adam direction ``u = m/(sqrt(v) + ε)`` (spec §1.1, not bias-corrected), formed now or on demand.

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


def adam_direction(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``u = m/(sqrt(v) + ε)`` (1-D tensors of one length and dtype) in ``out`` (same length and dtype; it may be
    ``exp_avg_sq``), or in a fresh tensor. Each operation is rounded to the tensors' dtype. Float32 CPU tensors
    go through one native pass (`mgup_dist.native.kernels.adam_direction`), bit for bit the portable one."""
    out = torch.empty_like(exp_avg_sq) if out is None else out
    if kernels.usable(exp_avg, exp_avg_sq, out, dtypes=_FLOAT32):
        kernels.adam_direction(exp_avg, exp_avg_sq, eps, out)
        return out
    denom = _correct_sqrt(exp_avg_sq, out).add_(eps)
    return torch.div(exp_avg, denom, out=denom)


@dataclass
class AdamQuotient:
    """The Adam direction of one tensor, formed on demand into ``out`` (1-D, all four tensors of one length).

    A rule hands it to MGUP's selection inside a `mgup_dist.rules.requests.ScoreProduct`: the native selection
    forms it in the same pass that counts the first bracket of scores (`fusable`), every other path calls
    `form`. Either way the rule reads the direction from `form` afterwards; its bits never depend on which
    path formed it.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    eps: float
    out: torch.Tensor
    formed: bool = False

    def form(self) -> torch.Tensor:
        """The direction in ``out``, computed on the first call."""
        if not self.formed:
            adam_direction(self.exp_avg, self.exp_avg_sq, self.eps, out=self.out)
            self.formed = True
        return self.out

    def fusable(self, grad: torch.Tensor) -> bool:
        """Whether the native counting pass can form it while scoring against ``grad``: not yet formed, and every
        operand a float32 contiguous CPU tensor."""
        return not self.formed and kernels.usable(self.exp_avg, self.exp_avg_sq, self.out, grad, dtypes=_FLOAT32)

    def operands(self) -> kernels.Quotient:
        """What the native counting pass takes (see `fusable`)."""
        return kernels.Quotient(self.exp_avg_sq, self.eps, self.out)
