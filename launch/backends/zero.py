"""Backend ``zero``: mgup_dist's own ZeRO (`mgup_dist.zero.ZeroEngine`): optimizer state sharded over ranks.

Options: ``stage`` (1: all-reduce gradients; 2: reduce-scatter them, default), ``layout`` (``"flat"``: equal
contiguous parts of all parameters; ``"layerwise"``: whole tensors per rank balanced by Newton–Schulz cost,
so the Muon family adds no communication), ``gather_max_numel`` (matrices larger than this run Newton–Schulz
sharded instead of gathered to one owner; null = always gather).
"""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.registry import register
from launch.errors import LaunchError
from mgup_dist.checkpoint import (
    load_model_state_dict, load_optimizer_state_dict, model_state_dict, optimizer_state_dict,
)
from mgup_dist.zero import LAYOUTS, STAGES, ZeroEngine


class ZeroTrainingEngine(Engine):
    """Gradients accumulate locally over micro-batches and are reduced once per step by the ZeRO engine."""

    def __init__(self, model: nn.Module, zero: ZeroEngine) -> None:
        self.model = model
        self.optimizer = zero.optimizer
        self.zero = zero

    def micro_step(self, sync: bool) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        return self.zero.clip_grad_norm(max_norm)

    def step(self) -> None:
        self.zero.step()

    def zero_grad(self) -> None:
        self.zero.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return {
            **model_state_dict(self.model),
            **optimizer_state_dict(self.optimizer, self.model),
            **self.zero.master_state_dict(self.model),
        }

    def load_checkpoint(self, path: str) -> None:
        load_model_state_dict(self.model, path, verify=False)  # launch.checkpoint.load verified it
        self.zero.load_master_state_dict(self.model, path)
        load_optimizer_state_dict(self.optimizer, self.model, path, verify=False)


@register
class ZeroBackend(Backend):
    """mgup_dist's ZeRO stage 1/2 with a flat or layer-wise layout."""

    name = "zero"
    OPTIONS = {"stage": 2, "layout": "flat", "gather_max_numel": None}

    def check(self) -> None:
        if self.options["stage"] not in STAGES:
            raise LaunchError(f"backend_options.stage must be one of {list(STAGES)}, got {self.options['stage']!r}")
        if self.options["layout"] not in LAYOUTS:
            raise LaunchError(f"backend_options.layout must be one of {list(LAYOUTS)}, got {self.options['layout']!r}")
        limit = self.options["gather_max_numel"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise LaunchError(f"backend_options.gather_max_numel must be null or an integer >= 1, got {limit!r}")

    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        optimizer = make_optimizer(model)
        if any(group.get("is_approx") is False for group in optimizer.param_groups):
            raise LaunchError("backend zero does not run MARS exact mode (is_approx: false) yet; use backend ddp")
        zero = ZeroEngine(
            model,
            optimizer,
            stage=self.options["stage"],
            layout=self.options["layout"],
            gather_max_numel=self.options["gather_max_numel"],
        )
        return ZeroTrainingEngine(model, zero)
