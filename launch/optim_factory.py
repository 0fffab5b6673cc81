"""Builds the configured mgup_dist optimizer for a model (Muon-family optimizers get `muon_param_groups`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mgup_dist.optim import build_optimizer, muon_param_groups, optimizer_class
from mgup_dist.optim.muon import MuonFamily

from launch.errors import LaunchError


def resolve_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``name`` (any name `mgup_dist.build_optimizer` accepts); `LaunchError` otherwise."""
    try:
        return optimizer_class(name)
    except ValueError as exc:
        raise LaunchError(f"optimizer.name: {exc}") from None


def is_muon_family(name: str) -> bool:
    """True for Muon, MGUP-Muon and MARS-M, whose parameters are split by `muon_param_groups`."""
    return issubclass(resolve_class(name), MuonFamily)


def peak_lr(name: str, hparams: Mapping[str, Any]) -> float:
    """The configured ``lr``, or the optimizer's default when the config leaves it out."""
    return float(hparams.get("lr", resolve_class(name).DEFAULTS["lr"]))


def _param_groups(model: nn.Module, name: str) -> Any:
    return muon_param_groups(model) if is_muon_family(name) else model.parameters()


def build(model: nn.Module, name: str, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``model``'s parameters with ``hparams``; bad names/values are a `LaunchError`."""
    try:
        return build_optimizer(name, _param_groups(model, name), **dict(hparams))
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"optimizer: {exc}") from None


def check(name: str, hparams: Mapping[str, Any]) -> None:
    """Validates ``name`` and ``hparams`` by building the optimizer over a two-parameter stand-in model."""
    stand_in = nn.Sequential(nn.Linear(2, 2))
    build(stand_in, name, hparams)
