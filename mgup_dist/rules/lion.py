"""Lion and MGUP-Lion per-tensor rules (spec §1.2, §2.5)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mgup_dist.rules.adam import decay
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.masks import masked_step, mgup_selection
from mgup_dist.rules.slot import Slot


def lion(slot: Slot, hp: Mapping[str, Any], masked: bool = False) -> Rule:
    """``θ·(1−ηλ)``; ``c = sign(β1·m + (1−β1)·g)``; ``θ ← θ − η·c`` (``c ⊙ Φ`` when ``masked``); ``m`` update."""
    beta1, beta2 = hp["betas"]
    exp_avg, grad = slot.buffer("exp_avg"), slot.grad
    decay(slot.param, hp["lr"], hp["weight_decay"])
    direction = torch.mul(exp_avg, beta1, out=slot.scratch("direction", exp_avg.dtype))
    direction.add_(grad, alpha=1 - beta1).sign_()
    if masked:
        selected = yield from mgup_selection(direction, grad, slot.segment, hp, slot.scratch)
        masked_step(slot.param, direction, selected, hp["alpha"], hp["gamma"], hp["lr"])
    else:
        slot.param.add_(direction, alpha=-hp["lr"])
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def mgup_lion(slot: Slot, hp: Mapping[str, Any]) -> Rule:
    """MGUP-Lion: Lion with the MGUP mask on ``c ⊙ g``."""
    return lion(slot, hp, masked=True)
