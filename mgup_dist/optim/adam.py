"""Adam-family optimizers: AdamW (flavour A), MGUP-AdamW, CMGUP-AdamW, AlphaAdam (spec §1.1, §2.3, §2.4, §3.2)."""
from __future__ import annotations

from typing import Any

from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.rules import adam as rules
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.slot import Slot

_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "correct_bias": True}
_MGUP = {"alpha": 2.0, "gamma": 0.1}


class AdamW(RuleOptimizer):
    """HF-style AdamW: ``θ·(1−ηλ) − η·sqrt(1−β2^t)/(1−β1^t)·m/(sqrt(v)+ε)``."""

    DEFAULTS = dict(_ADAM)

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        return rules.adamw(slot, group)


class MGUPAdamW(RuleOptimizer):
    """MGUP-AdamW: the exact top ``mask_ratio`` of ``u ⊙ g`` per tensor gets ``alpha``, the rest ``gamma``."""

    DEFAULTS = {**_ADAM, "mask_ratio": 0.5, **_MGUP}

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        return rules.mgup_adamw(slot, group)


class CMGUPAdamW(RuleOptimizer):
    """Cautious-MGUP AdamW: ``alpha`` where ``u ⊙ g ≥ 0``, ``gamma`` elsewhere."""

    DEFAULTS = {**_ADAM, **_MGUP}

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        return rules.cmgup_adamw(slot, group)


class AlphaAdam(RuleOptimizer):
    """AlphaAdam (project definition): alignment mask with dynamic factors ``1/ā`` and ``ā`` per tensor."""

    DEFAULTS = {**_ADAM, "alpha_min": 0.01, "alpha_ema": 0.0, "score_source": "momentum"}

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        return rules.alpha_adam(slot, group)
