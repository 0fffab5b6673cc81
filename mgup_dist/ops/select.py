"""Exact local top-k selection with the spec's tie rule (score descending, then flat index ascending)."""
from __future__ import annotations

import torch

from mgup_dist.rules.requests import NonFiniteScoresError


def check_finite(scores: torch.Tensor) -> None:
    """Raises `NonFiniteScoresError` if ``scores`` holds NaN or infinity."""
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteScoresError("MGUP mask scores contain NaN or infinity (non-finite gradient?)")


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of 1-D float32 ``scores``; ties go to the lowest indices."""
    check_finite(scores)
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    if k == n:
        return mask.fill_(True)
    order = torch.sort(scores, descending=True, stable=True).indices
    mask[order[:k]] = True
    return mask
