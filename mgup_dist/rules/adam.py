"""Adam-family per-tensor rules: AdamW flavour A (HF-style ε) and the masked variants built on it.

Spec §1.1, §2.3, §2.4, §3.2. Every rule here is a generator over one `Slot` (see `mgup_dist.rules.driver`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from mgup_dist.rules.adam_direction import AdamQuotient, MomentUpdate
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.masks import alignment, dynamic_alpha, masked_step, mgup_selection
from mgup_dist.rules.slot import Slot


def decay_factor(lr: float, weight_decay: float) -> float:
    """The decoupled weight decay's factor ``1 − η·λ`` (unscaled lr); exactly 1 when λ = 0."""
    return 1 - lr * weight_decay if weight_decay != 0 else 1.0


def decay(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay ``θ ← θ·(1 − η·λ)`` with the unscaled lr; skipped when λ = 0."""
    if weight_decay != 0:
        param.mul_(decay_factor(lr, weight_decay))


def flavour_a_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """``η·sqrt(1−β2^t)/(1−β1^t)`` if ``correct_bias`` else ``η``, as a float64 scalar."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def _adam_moments(slot: Slot, hp: Mapping[str, Any], betas: tuple[float, float], eps: float) -> tuple[AdamQuotient, float]:
    """Shared prologue: step count, decay; the moment update and the direction u (an `AdamQuotient` that does
    both when formed, on demand, in the slot's ``"direction"`` scratch) and the flavour-A step size."""
    step = slot.next_step()
    beta1, beta2 = betas
    exp_avg, exp_avg_sq = slot.buffer("exp_avg"), slot.buffer("exp_avg_sq")
    decay(slot.param, hp["lr"], hp["weight_decay"])
    moments = MomentUpdate(slot.grad, beta1, beta2)
    direction = AdamQuotient(exp_avg, exp_avg_sq, eps, slot.scratch("direction", exp_avg_sq.dtype), moments)
    return direction, flavour_a_step_size(hp["lr"], beta1, beta2, step, hp.get("correct_bias", True))


def _adam_moments_and_direction(
    slot: Slot, hp: Mapping[str, Any], betas: tuple[float, float], eps: float
) -> tuple[torch.Tensor, float]:
    """`_adam_moments` with the direction formed."""
    direction, step_size = _adam_moments(slot, hp, betas, eps)
    return direction.form(), step_size


def adamw(slot: Slot, hp: Mapping[str, Any], betas_key: str = "betas", eps_key: str = "eps") -> Rule:
    """Flavour-A AdamW: decay, moments, ``θ ← θ − step_size·u``. Also the AdamW path of the Muon family."""
    direction, step_size = _adam_moments_and_direction(slot, hp, hp[betas_key], hp[eps_key])
    slot.param.add_(direction, alpha=-step_size)
    return
    yield  # a rule with no requests


def mgup_adamw(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """MGUP-AdamW (§2.3): the top ``mask_ratio`` of ``u ⊙ g`` scaled by α, the rest by γ. The direction goes
    to the selection unformed, so the native selection can form it in its first counting pass."""
    direction, step_size = _adam_moments(slot, hp, hp["betas"], hp["eps"])
    selected = yield from mgup_selection(direction, slot.grad, slot.segment, hp, slot.scratch)
    masked_step(slot.param, direction.form(), selected, hp["alpha"], hp["gamma"], step_size)


def cmgup_adamw(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """CMGUP-AdamW (§2.4): α where ``u ⊙ g ≥ 0``, γ elsewhere."""
    direction, step_size = _adam_moments_and_direction(slot, hp, hp["betas"], hp["eps"])
    masked_step(slot.param, direction, alignment(direction, slot.grad, slot), hp["alpha"], hp["gamma"], step_size)
    return
    yield  # elementwise: no requests


def alpha_adam(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """AlphaAdam, the project definition (§3.2): alignment mask with dynamic factors 1/ā and ā."""
    from_momentum = hp["score_source"] == "momentum"
    aligned = alignment(slot.buffer("exp_avg"), slot.grad, slot) if from_momentum else None
    direction, step_size = _adam_moments_and_direction(slot, hp, hp["betas"], hp["eps"])
    if aligned is None:
        aligned = alignment(direction, slot.grad, slot)
    alpha_bar = yield from dynamic_alpha(aligned, slot, hp)
    masked_step(slot.param, direction, aligned, 1 / alpha_bar, alpha_bar, step_size)
