"""Newton–Schulz quintic iteration (NS5), the orthogonalisation of the Muon family (spec §1.3)."""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_DTYPES = (torch.bfloat16, torch.float32)


def newton_schulz(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NS5 of a 2-D ``(r, c)`` matrix, computed in ``dtype``; returns a contiguous ``(r, c)`` tensor in ``dtype``.

    Iterates on the wide orientation (transposing when ``r > c``) after normalising by the Frobenius norm,
    with ``B = b*A + c*(A @ A)`` and ``X = a*X + B @ X`` exactly as the spec writes them.
    """
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz takes a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * (gram @ gram)
        x = _scaled_add(a, x, poly @ x)
    if tall:
        x = x.T
    return x.contiguous()


def _scaled_add(a: float, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``a * x + update`` (``update`` contiguous), bitwise and in memory layout: when ``x`` is the transposed
    view of a contiguous tensor (a tall matrix's wide orientation), eager ``a * x + update`` keeps ``x``'s
    layout and reads ``update`` across its rows, several times slower on CPU than transposing ``update`` in one
    blocked copy and adding contiguously. The same two roundings happen either way, and the result has the
    layout the next ``@`` expects, so the matmuls, too, see exactly what they saw before."""
    if x.T.is_contiguous() and not x.is_contiguous():
        return (a * x.T + update.T.contiguous()).T
    return a * x + update
