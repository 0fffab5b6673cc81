"""Reference per-coordinate factors Φ of MGUP (§2.2), CMGUP (§2.4) and AlphaAdam (§3.2), in float64.

Everything here is written from the spec with plain sorting and counting, so that it is an independent
check of the package's selection code.
"""
import math

import torch

# Relative gap that separates "clearly different" scores from the threshold score. The package may form
# the fp32 score with a different rounding than this reference; below this gap the top-k set could differ.
AMBIGUITY_GAP = 1e-5


class AmbiguousMask(AssertionError):
    """A test input puts a score within rounding distance of the top-k threshold without being equal to it."""


def fp32_scores(update: torch.Tensor, grad: torch.Tensor) -> list[float]:
    """s_i = U_i·G_i rounded once to float32, −0.0 canonicalised to +0.0, in flat row-major order."""
    product = (update.to(torch.float64) * grad.to(torch.float64)).flatten().to(torch.float32)
    return [0.0 if v == 0.0 else float(v) for v in product.tolist()]


def selected_indices(scores: list[float], k: int) -> set[int]:
    """The first k flat indices ordered by (score descending, index ascending) (spec §2.2)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:k])


def check_unambiguous(update: torch.Tensor, grad: torch.Tensor, k: int) -> None:
    """Raise AmbiguousMask unless every exact float64 score is equal to or well apart from the k-th one."""
    exact = (update.to(torch.float64) * grad.to(torch.float64)).flatten().tolist()
    if k == 0 or k == len(exact):
        return
    order = sorted(range(len(exact)), key=lambda i: (-exact[i], i))
    threshold = exact[order[k - 1]]
    for value in exact:
        if value != threshold and abs(value - threshold) <= AMBIGUITY_GAP * abs(threshold):
            raise AmbiguousMask(f"score {value!r} is too close to the threshold {threshold!r}")


def mgup_factors(
    update: torch.Tensor, grad: torch.Tensor, tau: float, alpha: float, gamma: float, strict: bool = True,
) -> torch.Tensor:
    """Φ of MGUP_MASK(U, G, τ, α, γ): α on the top k = int(float(τ)·d) scores, γ elsewhere; U's shape/dtype.

    With `strict`, inputs whose top-k set could depend on how the fp32 score is rounded are rejected.
    """
    d = update.numel()
    k = int(float(tau) * d)
    if strict:
        check_unambiguous(update, grad, k)
    chosen = selected_indices(fp32_scores(update, grad), k)
    flat = [alpha if i in chosen else gamma for i in range(d)]
    return torch.tensor(flat, dtype=update.dtype).reshape(update.shape)


def cautious_factors(update: torch.Tensor, grad: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """CMGUP's Φ = α where u·g ≥ 0 (a zero product counts as aligned), γ elsewhere."""
    aligned = (update * grad) >= 0
    return torch.where(aligned, torch.full_like(update, alpha), torch.full_like(update, gamma))


def aligned_fraction(scores: torch.Tensor) -> float:
    """f = (number of s_i ≥ 0) / d as a float64 scalar."""
    return int((scores >= 0).sum().item()) / scores.numel()


def dynamic_alpha(fraction: float, alpha_min: float, alpha_ema: float, previous: float) -> float:
    """ā_t = max(f, alpha_min), smoothed as ρ·ā_{t−1} + (1−ρ)·ā_t when ρ = alpha_ema > 0."""
    current = max(fraction, alpha_min)
    if alpha_ema > 0:
        current = alpha_ema * previous + (1.0 - alpha_ema) * current
    return current


def alpha_factors(scores: torch.Tensor, alpha_bar: float, dtype: torch.dtype) -> torch.Tensor:
    """AlphaAdam's Φ_i = 1/ā where s_i ≥ 0, else ā; each factor rounded once to `dtype`."""
    if not math.isfinite(alpha_bar) or alpha_bar <= 0:
        raise ValueError(f"alpha_bar must be positive and finite, got {alpha_bar}")
    up = torch.tensor(1.0 / alpha_bar, dtype=dtype)
    down = torch.tensor(alpha_bar, dtype=dtype)
    return torch.where(scores >= 0, up, down)
