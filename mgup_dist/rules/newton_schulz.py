"""Newton–Schulz quintic iteration (NS5), the orthogonalisation of the Muon family (spec §1.3)."""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_DTYPES = (torch.bfloat16, torch.float32)


# Below this many rows of the wide orientation one full product is fastest; from it on, `symmetric_product`
# multiplies only the upper block-triangle (measured on x86 CPUs with oneDNN bf16 and float32 GEMMs: 10-20% less
# NS time at 512-1024 rows, a loss at 256 rows, where panels are too thin for the GEMM to run at full speed).
PANEL_MIN_ROWS = 384
_PANEL_ROWS = 384  # rows per panel beyond 4 panels (at most 8)


def panel_count(rows: int, device: torch.device) -> int:
    """Row panels `symmetric_product` uses for a ``rows × rows`` result on ``device``: 1 below `PANEL_MIN_ROWS`
    or off the CPU (measured on CPUs only), else ``rows // 384`` clamped to [4, 8]."""
    if device.type != "cpu" or rows < PANEL_MIN_ROWS:
        return 1
    return min(8, max(4, rows // _PANEL_ROWS))


def symmetric_product(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = left @ right.T`` for 2-D ``(r, n)`` operands whose product is symmetric (``X @ X.T``, or
    ``A @ A`` of a symmetric ``A`` passed as ``right = A``); written into the ``(r, r)`` ``out`` and returned.

    Only the upper block-triangle is multiplied, one row panel ``[lo, hi)`` at a time
    (``left[lo:hi] @ right[lo:].T``), and mirrored below the diagonal: each entry is the same dot product, over
    the same terms in the same order, that the full product computes (the results are bitwise those of the full
    product on this package's tested CPUs), for up to 1/2 fewer multiply-adds (`panel_count` panels).
    """
    rows = left.shape[0]
    panels = panel_count(rows, left.device)
    if panels == 1:
        return torch.mm(left, right.T, out=out)
    bounds = [rows * i // panels for i in range(panels + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        panel = left[lo:hi] @ right[lo:].T
        out[lo:hi, lo:] = panel
        out[hi:, lo:hi] = panel[:, hi - lo :].T
    return out


def newton_schulz(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NS5 of a 2-D ``(r, c)`` matrix, computed in ``dtype``; returns a contiguous ``(r, c)`` tensor in ``dtype``.

    Iterates on the wide orientation (transposing when ``r > c``) after normalising by the Frobenius norm,
    with ``B = b*A + c*(A @ A)`` and ``X = a*X + B @ X`` exactly as the spec writes them (each product and sum
    rounded to ``dtype``; computed in place, and a sum's operands swapped, which changes no bit). The symmetric
    products ``X @ X.T`` and ``A @ A`` go through `symmetric_product`.

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
    rows = x.shape[0]
    gram, square = (torch.empty(rows, rows, dtype=dtype, device=x.device) for _ in range(2))
    for _ in range(steps):
        symmetric_product(x, x, gram)
        poly = symmetric_product(gram, gram, square).mul_(c).add_(gram.mul_(b))  # b*A + c*(A@A), in place
        x = (poly @ x).add_(x.mul_(a))  # a*X + B@X
    return x.T.contiguous() if tall else x.contiguous()
