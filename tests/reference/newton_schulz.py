"""Float64 Newton–Schulz quintic (spec §1.3), written from the spec alone.

`newton_schulz5(matrix)` takes any real 2-D tensor (r, c) and returns a float64 (r, c) tensor:
transpose to the wide orientation, divide by (Frobenius norm + 1e-7), iterate
``A = X Xᵀ; B = b·A + c·A²; X = a·X + B X`` and transpose back.
"""
import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz5(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """NS5 of a 2-D matrix computed entirely in float64; same shape as `matrix`."""
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz5 needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    x = matrix.to(torch.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x, ord="fro") + NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


def ns_polynomial(sigma: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """p applied `steps` times to normalised singular values, p(x) = a·x + b·x³ + c·x⁵ (spec §1.3)."""
    a, b, c = NS_COEFFICIENTS
    x = sigma.to(torch.float64)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x
