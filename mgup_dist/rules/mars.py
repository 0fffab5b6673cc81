"""MARS-AdamW per-tensor rules (spec §4.2, §4.4)."""
from __future__ import annotations

import math
from typing import Any, Mapping

from mgup_dist.rules.adam import decay
from mgup_dist.rules.adam_direction import update_moments
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.muon import wide_dtype
from mgup_dist.rules.slot import Slot
from mgup_dist.rules.tensor_norm import clip_to_unit_norm

import torch


def mars_adamw(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """MARS-AdamW on a 2-D tensor (or any tensor with ``optimize_1d``): corrected, clipped, torch-style ε."""
    step = slot.next_step()
    beta1, beta2 = hp["betas"]
    grad = slot.grad
    last_grad = slot.buffer("last_grad", wide_dtype(grad.dtype))
    exp_avg, exp_avg_sq = slot.buffer("exp_avg"), slot.buffer("exp_avg_sq")
    corrected = (grad - last_grad).mul_(hp["gamma"] * beta1 / (1 - beta1)).add_(grad)
    yield from clip_to_unit_norm(corrected, slot.segment)
    corrected = corrected.to(exp_avg.dtype)
    update_moments(exp_avg, exp_avg_sq, corrected, beta1, beta2)
    second = exp_avg_sq
    if hp["amsgrad"]:
        second = slot.buffer("max_exp_avg_sq")
        torch.maximum(second, exp_avg_sq, out=second)
    denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(hp["eps"]).mul_(1 - beta1**step)
    decay(slot.param, hp["lr"], hp["weight_decay"])
    slot.param.addcdiv_(exp_avg, denom, value=-hp["lr"])
    if hp["is_approx"]:
        last_grad.copy_(grad)


def mars_fallback_adamw(slot: Slot, hp: Mapping[str, Any], lr_ratio: float) -> Rule:
    """The non-2-D branch: torch-style (flavour B) AdamW on the raw gradient with ``betas_1d``,
    lr ``η·lr_ratio`` and ``weight_decay_1d``; ``last_grad`` still tracks the gradient in approx mode."""
    step = slot.next_step()
    beta1, beta2 = hp["betas_1d"]
    lr = hp["lr"] * lr_ratio
    exp_avg, exp_avg_sq = slot.buffer("exp_avg"), slot.buffer("exp_avg_sq")
    update_moments(exp_avg, exp_avg_sq, slot.grad, beta1, beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(hp["eps"])
    decay(slot.param, lr, hp["weight_decay_1d"])
    slot.param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    if hp["is_approx"]:
        slot.buffer("last_grad", wide_dtype(slot.grad.dtype)).copy_(slot.grad)
    return
    yield  # elementwise: no requests
