"""Muon-family matrix-path rules: Muon, MGUP-Muon, MARS-M (spec §1.4, §1.5, §2.6, §5.2).

The matrix is the tensor's ``(shape[0], prod(shape[1:]))`` view (conv weights flattened). Newton–Schulz is a
request (`Orthogonalize`), so the rule never holds more than its local segment.
"""
from __future__ import annotations

import math
from typing import Any, Generator, Mapping

import torch

from mgup_dist.native import kernels
from mgup_dist.rules.adam import decay, decay_factor
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.masks import in_dtype, masked_step, mgup_request
from mgup_dist.rules.requests import Orthogonalize, PackedMask, Request
from mgup_dist.rules.slot import Slot
from mgup_dist.rules.tensor_norm import clip_to_unit_norm


def moonlight_scale(rows: int, cols: int) -> float:
    """Moonlight's update scale ``0.2·sqrt(max(A, B))``."""
    return 0.2 * math.sqrt(max(rows, cols))


def _ns_request(slot: Slot, matrix: torch.Tensor, hp: Mapping[str, Any]) -> Orthogonalize:
    """NS5 of the matrix: answered by this rank's piece, in the NS dtype (`_apply` widens it to the parameter's)."""
    rows, cols = slot.segment.matrix_shape
    return Orthogonalize(slot.segment, matrix, rows, cols, hp["ns_steps"], hp["ns_dtype"])


def _orthogonalize(
    slot: Slot, matrix: torch.Tensor, hp: Mapping[str, Any]
) -> Generator[Request, Any, torch.Tensor]:
    """Asks `_ns_request` and returns its answer."""
    return (yield _ns_request(slot, matrix, hp))


_APPLY_DTYPES = (torch.float32, torch.bfloat16, torch.bool, torch.uint8)


def _apply(slot: Slot, update: torch.Tensor, hp: Mapping[str, Any], factors: tuple[float, float] | None = None,
           selected: torch.Tensor | PackedMask | None = None) -> None:
    """Decay, then ``θ ← θ − lr·scale·update`` with ``update`` (NS dtype) cast to the parameter's dtype, and
    ``update ⊙ Φ`` when ``selected`` is given (Φ = the ``factors`` (high, low) where ``selected``, in the
    parameter's dtype).

    Float32 CPU parameters take one native pass (`kernels.scaled_update`: decay, widening, Φ and the step fused),
    bit for bit the torch sequence below it.
    """
    rows, cols = slot.segment.matrix_shape
    step_size = hp["lr"] * moonlight_scale(rows, cols)
    param, packed = slot.param, isinstance(selected, PackedMask)
    mask = selected.storage if packed else selected
    if param.dtype == torch.float32 and kernels.usable(param, update, mask, dtypes=_APPLY_DTYPES):
        high, low = in_dtype(factors, torch.float32) if selected is not None else (1.0, 1.0)
        kernels.scaled_update(param, update, mask, high, low, -step_size, packed=packed,
                              decay=decay_factor(hp["lr"], hp["weight_decay"]))
        return
    decay(param, hp["lr"], hp["weight_decay"])
    update = update.to(param.dtype)
    if selected is None:
        param.add_(update, alpha=-step_size)
    else:
        masked_step(param, update, selected, *factors, step_size)


def _momentum(slot: Slot, hp: Mapping[str, Any]) -> torch.Tensor:
    """Sum-style momentum ``M ← μM + G`` in place; returns the Nesterov input ``G + μM`` (in the slot's
    ``"direction"`` scratch) or ``M`` itself. Float32 CPU tensors take one native pass (`kernels.momentum`), bit
    for bit the torch operations below it."""
    momentum, grad = hp["momentum"], slot.grad
    buf = slot.buffer("momentum_buffer")
    if buf.dtype == grad.dtype == torch.float32 and kernels.usable(buf, grad):
        direction = slot.scratch("direction") if hp["nesterov"] else None
        kernels.momentum(buf, grad, momentum, direction)
        return buf if direction is None else direction
    buf.mul_(momentum).add_(grad)
    return grad.add(buf, alpha=momentum) if hp["nesterov"] else buf


def muon(slot: Slot, hp: Mapping[str, Any], masked: bool = False) -> Rule:
    """Moonlight Muon: ``M ← μM + G``, Nesterov input ``G + μM``, NS5, scaled step; MGUP mask when ``masked``.

    MGUP-Muon scores the Nesterov input against the raw gradient before orthogonalisation and masks after. It
    asks for the mask and for Newton–Schulz together (one round), so a sharded engine's mask verdict can settle
    while Newton–Schulz runs.
    """
    direction = _momentum(slot, hp)
    if masked:
        selection = mgup_request(direction, slot.grad, slot.segment, hp, slot.scratch)
        selected, update = yield (selection, _ns_request(slot, direction, hp))
    else:
        selected, update = None, (yield from _orthogonalize(slot, direction, hp))
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
