"""The alignment-mask engine shared by MGUP, CMGUP and AlphaAdam (spec §2.2, §2.4, §3.2, §3.4).

A mask is a per-element factor Φ built from three parts: a score (the update direction times the raw
gradient), a selection (exact top-k of the scores, or the sign test ``score ≥ 0``) and factors (fixed α/γ,
or the dynamic 1/ā and ā). Masks are recomputed every step and never stored per element.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping

import torch

from mgup_dist.native import kernels
from mgup_dist.rules.requests import PackedMask, Request, ScoreProduct, TensorSum, TopKMask
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.segment import Segment


def alignment(direction: torch.Tensor, grad: torch.Tensor, slot: Slot | None = None) -> torch.Tensor:
    """Bool ``direction ⊙ grad ≥ 0`` computed in the operands' dtype (a zero product counts as aligned); the
    product and the result go to ``slot``'s scratch space (``"scores"``, ``"aligned"``) when given."""
    if slot is None:
        return (direction * grad) >= 0
    product = torch.mul(direction, grad, out=slot.scratch("scores", torch.result_type(direction, grad)))
    return torch.ge(product, 0, out=slot.scratch("aligned", torch.bool))


def mask_k(mask_ratio: float, numel: int) -> int:
    """``k = int(float(τ)·d)`` (truncating: τ = 0.29, d = 100 gives 28)."""
    return int(float(mask_ratio) * numel)


_SPAN = {torch.float16: 2.0**14}  # a power of two whose double is finite in the dtype; 2**100 for wider ones
_CPU_BLOCK = 1 << 18  # elements per block on CPU: later passes read the block's operands from cache


@dataclass(frozen=True)
class _Factors:
    """The two factor values rounded to ``dtype``; ``clamped``: whether `_fill_factors` may build them by
    clamping ``±span`` (both at most ``span`` in magnitude and not a pair of signed zeros)."""

    high: float
    low: float
    dtype: torch.dtype
    clamped: bool


def _factors(high: float, low: float, dtype: torch.dtype) -> _Factors:
    high_value, low_value = in_dtype((high, low), dtype)
    span = _SPAN.get(dtype, 2.0**100)
    signed_zeros = high_value == low_value and math.copysign(1, high_value) != math.copysign(1, low_value)
    clamped = abs(high_value) <= span and abs(low_value) <= span and not signed_zeros
    return _Factors(high_value, low_value, dtype, clamped)


def _fill_factors(selected: torch.Tensor, values: _Factors, out: torch.Tensor) -> torch.Tensor:
    """``out`` (1-D, ``values.dtype``) ← ``values.high`` where 1-D ``selected`` else ``values.low``.

    When ``values.clamped``, in two elementwise passes: the 0/1 selection maps exactly to ``±span`` (a power of
    two), and clamping that to ``[min, max]`` of the two values returns them unchanged (bit for bit
    ``torch.where``, which is several times slower on CPU); otherwise through ``torch.where``."""
    high, low = values.high, values.low
    if not values.clamped:
        scalars = (torch.tensor(v, dtype=out.dtype, device=out.device) for v in (high, low))
        return out.copy_(torch.where(selected, *scalars))
    span = _SPAN.get(out.dtype, 2.0**100)
    sign = 1.0 if high >= low else -1.0  # selected -> sign*span, the rest -> -sign*span
    offset = torch.tensor(-sign * span, dtype=out.dtype, device=out.device)
    torch.add(offset, selected.view(torch.uint8), alpha=2 * sign * span, out=out)
    return out.clamp_(min(high, low), max(high, low))


def _block_size(tensor: torch.Tensor) -> int:
    return _CPU_BLOCK if tensor.device.type == "cpu" else max(tensor.numel(), 1)


def sign_factors(
    selected: torch.Tensor, high: float, low: float, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Φ = ``high`` where ``selected`` else ``low``, each rounded once to ``dtype``; written into ``out`` (a
    tensor of ``selected``'s size and ``dtype``) when given. Bit for bit ``torch.where(selected, high, low)``
    in ``dtype`` (see `_fill_factors`); on CPU block by block, so the second pass reads from cache."""
    values = _factors(high, low, dtype)
    if out is None:
        out = torch.empty(selected.shape, dtype=dtype, device=selected.device)
    factors = out.view(selected.shape)
    size = _block_size(factors)
    for block, chosen in zip(factors.view(-1).split(size), selected.reshape(-1).split(size)):
        _fill_factors(chosen, values, block)
    return factors


def masked_step(
    param: torch.Tensor, direction: torch.Tensor, selected: torch.Tensor | PackedMask, high: float, low: float,
    step_size: float,
) -> None:
    """``param ← param − step_size·(direction ⊙ Φ)``, Φ = `sign_factors` (``selected``, ``high``, ``low``) in
    ``direction``'s dtype (1-D tensors of one length; ``selected`` bool, or a `PackedMask` of that length);
    ``direction``'s contents afterwards are unspecified.

    Bit for bit ``param.add_(direction.mul_(sign_factors(...)), alpha=-step_size)`` (on CPUs with FMA, which
    torch's ``add_`` uses there). Float32 CPU tensors go through one native loop
    (`mgup_dist.native.kernels.scaled_update`); otherwise, on CPU, block by block with Φ in a block-sized
    buffer, so Φ never goes to memory and the product is read back from cache.
    """
    values = _factors(high, low, direction.dtype)
    packed = isinstance(selected, PackedMask)
    mask = selected.storage if packed else selected
    if param.dtype == direction.dtype == torch.float32 and kernels.usable(param, direction, mask):
        kernels.scaled_update(param, direction, mask, values.high, values.low, -step_size, packed=packed)
        return
    if packed:
        selected = selected.unpack()
    size = _block_size(direction)
    buffer = torch.empty(min(size, direction.numel()), dtype=direction.dtype, device=direction.device)
    for block, update, chosen in zip(param.split(size), direction.split(size), selected.split(size)):
        factors = _fill_factors(chosen, values, buffer[: update.numel()])
        block.add_(update.mul_(factors), alpha=-step_size)


def mgup_request(
    direction: torch.Tensor, grad: torch.Tensor, segment: Segment, hp: Mapping[str, Any],
    scratch: Callable[[str, torch.dtype], torch.Tensor] | None = None,
) -> TopKMask:
    """MGUP's selection as a request: True on the exact top-k (``k = mask_k(mask_ratio, numel)``) of the float32
    scores ``direction ⊙ grad`` over the whole tensor, answered by a bool tensor or a `PackedMask`
    (`masked_step` takes either). The scores go out as a `ScoreProduct`, formed (if the ops need them at all)
    in ``scratch``'s ``"scores"``; the selection may be written into its ``"mask"``. ``scratch`` is a
    `Slot.scratch`; without it both are fresh tensors."""
    k = mask_k(hp["mask_ratio"], segment.numel)
    scores = ScoreProduct(direction, grad, buffer=scratch("scores", torch.float32) if scratch else None)
    out = scratch("mask", torch.bool) if scratch else None
    return TopKMask(segment, scores, k, out=out, packed=True)


def mgup_selection(
    direction: torch.Tensor, grad: torch.Tensor, segment: Segment, hp: Mapping[str, Any],
    scratch: Callable[[str, torch.dtype], torch.Tensor] | None = None,
) -> Generator[Request, Any, torch.Tensor]:
    """Asks `mgup_request` and returns its answer."""
    return (yield mgup_request(direction, grad, segment, hp, scratch))


def in_dtype(values: tuple[float, ...], dtype: torch.dtype) -> tuple[float, ...]:
    """``values`` each rounded once to ``dtype`` (as Python floats). Remembered per exact value (keyed by the
    float's hex form, so ``-0.0`` and ``0.0`` stay apart): rules round the same few factors every step."""
    return _rounded(tuple(float(v).hex() for v in values), dtype)


@functools.lru_cache(maxsize=256)
def _rounded(hex_values: tuple[str, ...], dtype: torch.dtype) -> tuple[float, ...]:
    return tuple(torch.tensor(float.fromhex(h), dtype=dtype).item() for h in hex_values)


def dynamic_alpha(aligned: torch.Tensor, slot: Slot, hp: Mapping[str, Any]) -> Generator[Request, Any, float]:
    """AlphaAdam's ``ā = max(f, alpha_min)`` (float64) from the tensor's aligned fraction ``f``, smoothed into
    ``state['alpha_bar']`` when ``alpha_ema > 0``."""
    count = yield TensorSum(slot.segment, torch.count_nonzero(aligned))
    fraction = int(count) / slot.segment.numel
    alpha_bar = max(fraction, hp["alpha_min"])
    ema = hp["alpha_ema"]
    if ema > 0:
        alpha_bar = ema * slot.state.get("alpha_bar", 1.0) + (1 - ema) * alpha_bar
        slot.state["alpha_bar"] = alpha_bar
    return alpha_bar

