"""The alignment-mask engine shared by MGUP, CMGUP and AlphaAdam (spec §2.2, §2.4, §3.2, §3.4).

A mask is a per-element factor Φ built from three parts: a score (the update direction times the raw
gradient), a selection (exact top-k of the scores, or the sign test ``score ≥ 0``) and factors (fixed α/γ,
or the dynamic 1/ā and ā). Masks are recomputed every step and never stored per element.
"""
from __future__ import annotations

import math
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


_SPAN = {torch.float16: 2.0**14}  # a power of two whose double is finite in the dtype; 2**100 for wider ones
_CPU_BLOCK = 1 << 20  # elements per block on CPU: the second pass then reads the first's output from cache


def sign_factors(
    selected: torch.Tensor, high: float, low: float, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Φ = ``high`` where ``selected`` else ``low``, each rounded once to ``dtype``; written into ``out`` (a
    tensor of ``selected``'s size and ``dtype``) when given.

    Bit for bit ``torch.where(selected, high, low)`` in ``dtype``, but built from plain elementwise ops
    (``where`` is several times slower on CPU): see `_clamped_factors`.
    """
    high_value, low_value = (torch.tensor(v, dtype=dtype).item() for v in (high, low))
    if out is None:
        out = torch.empty(selected.shape, dtype=dtype, device=selected.device)
    factors = out.view(selected.shape)
    span = _SPAN.get(dtype, 2.0**100)
    signed_zeros = high_value == low_value and math.copysign(1, high_value) != math.copysign(1, low_value)
    if abs(high_value) <= span and abs(low_value) <= span and not signed_zeros:
        return _clamped_factors(selected, high_value, low_value, span, factors)
    values = (torch.tensor(v, dtype=dtype, device=selected.device) for v in (high_value, low_value))
    return factors.copy_(torch.where(selected, *values))


def _clamped_factors(
    selected: torch.Tensor, high: float, low: float, span: float, factors: torch.Tensor
) -> torch.Tensor:
    """``factors`` ← ``high`` where ``selected`` else ``low`` (both exact in ``factors.dtype``, at most ``span``
    in magnitude), in two passes: the 0/1 selection maps exactly to ``±span`` (a power of two), and clamping
    that to ``[min, max]`` of the two values returns them unchanged. On CPU the passes go block by block."""
    sign = 1.0 if high >= low else -1.0  # selected -> sign*span, the rest -> -sign*span
    offset = torch.tensor(-sign * span, dtype=factors.dtype, device=factors.device)
    flat, bits = factors.view(-1), selected.reshape(-1).view(torch.uint8)
    size = _CPU_BLOCK if factors.device.type == "cpu" else max(flat.numel(), 1)
    for block, chosen in zip(flat.split(size), bits.split(size)):
        torch.add(offset, chosen, alpha=2 * sign * span, out=block)
        block.clamp_(min(high, low), max(high, low))
    return factors


def mgup_factors(
    direction: torch.Tensor, grad: torch.Tensor, segment: Segment, hp: Mapping[str, Any]
) -> Generator[Request, Any, torch.Tensor]:
    """MGUP_MASK: α on the exact top-k of ``direction ⊙ grad`` over the whole tensor, γ elsewhere.

    Once the answer is back the scores are dead, so for a float32 ``direction`` the factors overwrite their
    buffer: the mask costs one float tensor of the segment's size beside the bool selection.
    """
    k = mask_k(hp["mask_ratio"], segment.numel)
    scores = alignment_scores(direction, grad)
    selected = yield TopKMask(segment, scores, k)
    reuse = scores if direction.dtype == torch.float32 else None  # a fresh tensor, no longer needed
    return sign_factors(selected, hp["alpha"], hp["gamma"], direction.dtype, out=reuse)


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
