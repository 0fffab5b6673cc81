"""Optimizer names and `build_optimizer` (spec §0.1)."""
from __future__ import annotations

from typing import Any

from mgup_dist.optim.adam import AdamW, AlphaAdam, CMGUPAdamW, MGUPAdamW
from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.lion import Lion, MGUPLion
from mgup_dist.optim.mars import MARSAdamW
from mgup_dist.optim.muon import MARSM, MGUPMuon, Muon

OPTIMIZERS: dict[str, type[RuleOptimizer]] = {
    "adamw": AdamW,
    "lion": Lion,
    "muon": Muon,
    "mars_adamw": MARSAdamW,
    "mgup_adamw": MGUPAdamW,
    "cmgup_adamw": CMGUPAdamW,
    "mgup_lion": MGUPLion,
    "mgup_muon": MGUPMuon,
    "alpha_adam": AlphaAdam,
    "mars_m": MARSM,
}


def _key(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


_BY_KEY = {_key(alias): cls for name, cls in OPTIMIZERS.items() for alias in (name, cls.__name__)}


def optimizer_class(name: str) -> type[RuleOptimizer]:
    """The class for a factory or class name, matched case-insensitively (``"mgup_adamw"``, ``"MGUPAdamW"``,
    ``"mgupadamw"``); `ValueError` listing the valid names otherwise."""
    if not isinstance(name, str) or _key(name) not in _BY_KEY:
        valid = ", ".join(f"{n} ({c.__name__})" for n, c in OPTIMIZERS.items())
        raise ValueError(f"unknown optimizer {name!r}; valid names: {valid}")
    return _BY_KEY[_key(name)]


def build_optimizer(name: str, params: Any, **hparams: Any) -> RuleOptimizer:
    """Builds optimizer ``name`` over ``params``; ``hparams`` go to the constructor unchanged (an unknown
    keyword is a `TypeError` naming the valid ones)."""
    return optimizer_class(name)(params, **hparams)
