"""Muon-family optimizers: Muon (Moonlight), MGUP-Muon, MARS-M (spec §0.4, §1.5, §2.6, §5.2).

Each parameter takes the matrix path (momentum, Newton–Schulz) or the AdamW path (flavour A with
``adamw_betas``/``adamw_eps``): the group key ``use_muon`` decides, else ``ndim ≥ 2`` of the logical shape.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch

from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.mars_hooks import MarsExactHooks
from mgup_dist.optim.param_groups import logical_shape
from mgup_dist.rules import muon as rules
from mgup_dist.rules.adam import adamw
from mgup_dist.rules.driver import Rule
from mgup_dist.rules.slot import Slot

_MUON = {
    "lr": 1e-3,
    "weight_decay": 0.1,
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "ns_dtype": torch.bfloat16,
    "adamw_betas": (0.9, 0.95),
    "adamw_eps": 1e-8,
}


class MuonFamily(RuleOptimizer):
    """Routes each tensor to ``MATRIX_RULE`` or to flavour-A AdamW."""

    MATRIX_RULE: ClassVar[Callable[[Slot, Mapping[str, Any]], Rule]]

    def prepare_group(self, group: dict[str, Any]) -> None:
        if group.get("use_muon"):
            for param in group["params"]:
                if len(logical_shape(param)) < 2:
                    raise ValueError(
                        f"{type(self).__name__}: a parameter of shape {logical_shape(param)} is in a use_muon=True "
                        "group, but the matrix path needs ndim >= 2; put it in a use_muon=False group "
                        "(muon_param_groups(model) does this)"
                    )

    @staticmethod
    def is_matrix(group: Mapping[str, Any], slot: Slot) -> bool:
        """True when ``slot``'s tensor takes the matrix path."""
        use_muon = group.get("use_muon")
        return bool(use_muon) if use_muon is not None else len(slot.segment.shape) >= 2

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        if self.is_matrix(group, slot):
            return type(self).MATRIX_RULE(slot, group)
        return adamw(slot, group, betas_key="adamw_betas", eps_key="adamw_eps")


class Muon(MuonFamily):
    """Moonlight-style Muon: sum momentum with Nesterov, NS5, update scaled by ``0.2·sqrt(max(A, B))``."""

    DEFAULTS = dict(_MUON)
    MATRIX_RULE = staticmethod(rules.muon)


class MGUPMuon(MuonFamily):
    """MGUP-Muon: Muon whose orthogonalised update is masked by the top ``mask_ratio`` of ``N ⊙ G``."""

    DEFAULTS = {**_MUON, "adamw_betas": (0.95, 0.95), "mask_ratio": 0.5, "alpha": 2.0, "gamma": 0.1}
    MATRIX_RULE = staticmethod(rules.mgup_muon)


class MARSM(MarsExactHooks, MuonFamily):
    """MARS-M: variance-reduced gradient, unit-norm clip, EMA momentum (no Nesterov), NS5, Moonlight scale."""

    DEFAULTS = {key: value for key, value in _MUON.items() if key != "nesterov"} | {"gamma": 0.025, "is_approx": True}
    MATRIX_RULE = staticmethod(rules.mars_m)

    def takes_exact_hooks(self, group: Mapping[str, Any], slot: Slot) -> bool:
        return self.is_matrix(group, slot)
