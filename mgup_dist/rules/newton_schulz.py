"""Newton–Schulz quintic iteration (NS5), the orthogonalisation of the Muon family (spec §1.3)."""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_DTYPES = (torch.bfloat16, torch.float32)


def newton_schulz(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NS5 of a 2-D ``(r, c)`` matrix, computed in ``dtype``; returns a contiguous ``(r, c)`` tensor in ``dtype``.

    Iterates on the wide orientation (transposing when ``r > c``) after normalising by the Frobenius norm,
    with ``B = b*A + c*(A @ A)`` and ``X = a*X + B @ X`` exactly as the spec writes them (each product and sum
    rounded to ``dtype``; computed in place, and a sum's operands swapped, which changes no bit).

    The wide orientation is iterated on as a contiguous copy, taken after the norm (whose float32 summation
    order follows the input's memory layout): a tall matrix's transposed view would make ``a*X`` read across
    rows (~8% slower per matrix on CPU), and the matmuls then see the same layout whatever the input's, so
    ``newton_schulz(m.T).T`` equals ``newton_schulz(m)`` bitwise. Against iterating on the view, bf16 results
    are bitwise the same on x86 CPUs (checked over many shapes); float32 ones can differ in the last bits, as
    the BLAS sums some shapes in a layout-dependent order.
    """
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.to(dtype)
    norm = x.norm()  # before the copy: a float32 norm's summation order follows the memory layout
    x = (x.T if tall else x).contiguous() / (norm + NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        poly = (gram @ gram).mul_(c).add_(gram.mul_(b))  # b*A + c*(A@A): same roundings, in place
        x = (poly @ x).add_(x.mul_(a))  # a*X + B@X
    return x.T.contiguous() if tall else x.contiguous()
