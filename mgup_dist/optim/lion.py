"""Lion and MGUP-Lion (spec §1.2, §2.5)."""
from __future__ import annotations

from typing import Any

from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.rules import lion as rules
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.slot import Slot

_LION = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}


class Lion(RuleOptimizer):
    """Lion: ``θ ← θ·(1−ηλ) − η·sign(β1·m + (1−β1)·g)``."""

    DEFAULTS = dict(_LION)

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        return rules.lion(slot, group)


class MGUPLion(RuleOptimizer):
    """MGUP-Lion: Lion whose sign step is masked by the exact top ``mask_ratio`` of ``c ⊙ g``."""

    DEFAULTS = {**_LION, "mask_ratio": 0.5, "alpha": 2.0, "gamma": 0.1}

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        return rules.mgup_lion(slot, group)
