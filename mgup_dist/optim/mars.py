"""MARS-AdamW (spec §4.2, §4.4)."""
from __future__ import annotations

from typing import Any

from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.mars_hooks import MarsExactHooks
from mgup_dist.rules import mars as rules
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.slot import Slot


class MARSAdamW(MarsExactHooks, RuleOptimizer):
    """MARS-AdamW: corrected, clipped gradient into torch-style AdamW on 2-D tensors (any tensor with
    ``optimize_1d``); other tensors take plain AdamW with ``betas_1d``, ``weight_decay_1d`` and lr scaled by the
    ``lr_1d/lr`` ratio fixed at construction."""

    DEFAULTS = {
        "lr": 3e-3,
        "betas": (0.95, 0.99),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "gamma": 0.025,
        "is_approx": True,
        "amsgrad": False,
        "optimize_1d": False,
        "lr_1d": 3e-3,
        "betas_1d": (0.9, 0.95),
        "weight_decay_1d": 0.1,
    }

    def __init__(self, params: Any, **hparams: Any) -> None:
        lr = hparams.get("lr", self.DEFAULTS["lr"])
        lr_1d = hparams.get("lr_1d", self.DEFAULTS["lr_1d"])
        if isinstance(lr, (int, float)) and lr == 0:
            raise ValueError("MARSAdamW fixes the lr_1d/lr ratio at construction, so it needs lr > 0 there")
        super().__init__(params, **hparams)
        self.lr_1d_ratio = lr_1d / lr

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        if group["optimize_1d"] or len(slot.segment.shape) == 2:
            return rules.mars_adamw(slot, group)
        return rules.mars_fallback_adamw(slot, group, self.lr_1d_ratio)
