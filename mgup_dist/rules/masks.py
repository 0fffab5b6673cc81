"""The alignment-mask engine shared by MGUP, CMGUP and AlphaAdam (spec §2.2, §2.4, §3.2, §3.4).

A mask is a per-element factor Φ built from three parts: a score (the update direction times the raw
gradient), a selection (exact top-k of the scores, or the sign test ``score ≥ 0``) and factors (fixed α/γ,
or the dynamic 1/ā and ā). Masks are recomputed every step and never stored per element.
"""
from __future__ import annotations

from typing import Any, Generator, Mapping

import torch

from mgup_dist.rules.requests import Request, TensorSum, TopKMask
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.segment import Segment


def alignment_scores(direction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``s = direction ⊙ grad`` in float32 (the MGUP score)."""
    if direction.dtype == torch.float32 and grad.dtype == torch.float32:
        return direction * grad
    return direction.float() * grad.float()


def alignment(direction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Bool ``direction ⊙ grad ≥ 0`` computed in the operands' dtype (a zero product counts as aligned)."""
    return (direction * grad) >= 0


def mask_k(mask_ratio: float, numel: int) -> int:
    """``k = int(float(τ)·d)`` (truncating: τ = 0.29, d = 100 gives 28)."""
    return int(float(mask_ratio) * numel)


def sign_factors(selected: torch.Tensor, high: float, low: float, dtype: torch.dtype) -> torch.Tensor:
    """Φ = ``high`` where ``selected`` else ``low``, each rounded once to ``dtype``."""
    return torch.where(
        selected,
        torch.tensor(high, dtype=dtype, device=selected.device),
        torch.tensor(low, dtype=dtype, device=selected.device),
    )


def mgup_factors(
    direction: torch.Tensor, grad: torch.Tensor, segment: Segment, hp: Mapping[str, Any]
) -> Generator[Request, Any, torch.Tensor]:
    """MGUP_MASK: α on the exact top-k of ``direction ⊙ grad`` over the whole tensor, γ elsewhere."""
    k = mask_k(hp["mask_ratio"], segment.numel)
    scores = alignment_scores(direction, grad)
    selected = yield TopKMask(segment, scores, k)
    return sign_factors(selected, hp["alpha"], hp["gamma"], direction.dtype)


def dynamic_factors(
    aligned: torch.Tensor, slot: Slot, hp: Mapping[str, Any], dtype: torch.dtype
) -> Generator[Request, Any, torch.Tensor]:
    """AlphaAdam's factors: ``1/ā`` where aligned, ``ā`` elsewhere, ā from the tensor's aligned fraction.

    ``ā = max(f, alpha_min)`` (float64), smoothed into ``state['alpha_bar']`` when ``alpha_ema > 0``.
    """
    count = yield TensorSum(slot.segment, aligned.sum(dtype=torch.int64))
    fraction = int(count) / slot.segment.numel
    alpha_bar = max(fraction, hp["alpha_min"])
    ema = hp["alpha_ema"]
    if ema > 0:
        alpha_bar = ema * slot.state.get("alpha_bar", 1.0) + (1 - ema) * alpha_bar
        slot.state["alpha_bar"] = alpha_bar
    return sign_factors(aligned, 1 / alpha_bar, alpha_bar, dtype)
