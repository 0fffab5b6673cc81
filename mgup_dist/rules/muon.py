"""Muon-family matrix-path rules: Muon, MGUP-Muon, MARS-M (spec §1.4, §1.5, §2.6, §5.2).

The matrix is the tensor's ``(shape[0], prod(shape[1:]))`` view (conv weights flattened). Newton–Schulz is a
request (`Orthogonalize`), so the rule never holds more than its local segment.
"""
from __future__ import annotations

import math
from typing import Any, Generator, Mapping

import torch

from mgup_dist.rules.adam import decay
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.masks import in_dtype, masked_step, mgup_selection
from mgup_dist.rules.requests import Orthogonalize, PackedMask, Request
from mgup_dist.rules.slot import Slot
from mgup_dist.rules.tensor_norm import clip_to_unit_norm


def moonlight_scale(rows: int, cols: int) -> float:
    """Moonlight's update scale ``0.2·sqrt(max(A, B))``."""
    return 0.2 * math.sqrt(max(rows, cols))


def _orthogonalize(
    slot: Slot, matrix: torch.Tensor, hp: Mapping[str, Any]
) -> Generator[Request, Any, torch.Tensor]:
    rows, cols = slot.segment.matrix_shape
    update = yield Orthogonalize(slot.segment, matrix, rows, cols, hp["ns_steps"], hp["ns_dtype"])
    return update.to(slot.param.dtype)


def _apply(slot: Slot, update: torch.Tensor, hp: Mapping[str, Any], factors: tuple[float, float] | None = None,
           selected: torch.Tensor | PackedMask | None = None) -> None:
    """Decay, then ``θ ← θ − lr·scale·update``, with ``update ⊙ Φ`` when ``selected`` is given (Φ = the
    ``factors`` (high, low) where ``selected``, in ``update``'s dtype)."""
    rows, cols = slot.segment.matrix_shape
    step_size = hp["lr"] * moonlight_scale(rows, cols)
    decay(slot.param, hp["lr"], hp["weight_decay"])
    if selected is None:
        slot.param.add_(update, alpha=-step_size)
    else:
        masked_step(slot.param, update, selected, *factors, step_size)


def muon(slot: Slot, hp: Mapping[str, Any], masked: bool = False) -> Rule:
    """Moonlight Muon: ``M ← μM + G``, Nesterov input ``G + μM``, NS5, scaled step; MGUP mask when ``masked``.

    MGUP-Muon scores the Nesterov input against the raw gradient before orthogonalisation and masks after.
    """
    momentum, grad = hp["momentum"], slot.grad
    buf = slot.buffer("momentum_buffer")
    buf.mul_(momentum).add_(grad)
    direction = grad.add(buf, alpha=momentum) if hp["nesterov"] else buf
    selected = (yield from mgup_selection(direction, grad, slot.segment, hp, slot.scratch)) if masked else None
    update = yield from _orthogonalize(slot, direction, hp)
    # Φ is MGUP_MASK's, in the direction's dtype (then the update's, as a cast of Φ would give)
    factors = in_dtype((hp["alpha"], hp["gamma"]), direction.dtype) if masked else None
    _apply(slot, update, hp, factors, selected)


def mgup_muon(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """MGUP-Muon matrix path."""
    return muon(slot, hp, masked=True)


def mars_m(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """MARS-M (approx or exact): corrected gradient, unit-norm clip, EMA momentum, NS5, scaled step."""
    momentum, grad = hp["momentum"], slot.grad
    last_grad = slot.buffer("last_grad", wide_dtype(grad.dtype))
    buf = slot.buffer("momentum_buffer")
    correction = hp["gamma"] * momentum / (1 - momentum)
    corrected = (grad - last_grad).mul_(correction).add_(grad)
    yield from clip_to_unit_norm(corrected, slot.segment)
    buf.mul_(momentum).add_(corrected, alpha=1 - momentum)
    update = yield from _orthogonalize(slot, buf, hp)
    _apply(slot, update, hp)
    if hp["is_approx"]:
        last_grad.copy_(grad)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype persistent gradient copies are kept in: float32 for 16-bit gradients, else unchanged."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
