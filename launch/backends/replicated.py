"""`ReplicatedEngine`: every rank holds the whole model and optimizer state (the `single` and `ddp` backends).

Checkpoints use `mgup_dist.checkpoint`'s format (keyed by the unwrapped module's FQNs, optimizer state
flattened), the same as every other backend, so a run can resume under another backend or world size.
"""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import nn

from mgup_dist.checkpoint import (
    load_model_state_dict, load_optimizer_state_dict, model_state_dict, optimizer_state_dict,
)

from launch.backends.base import Engine


class ReplicatedEngine(Engine):
    """``model`` is ``module`` itself or a wrapper around it; ``no_sync`` (if given) suppresses gradient
    reduction on non-final micro-batches."""

    def __init__(
        self,
        module: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.module = module
        self.model = model
        self.optimizer = optimizer
        self._no_sync = no_sync

    def micro_step(self, sync: bool) -> AbstractContextManager[Any]:
        if sync or self._no_sync is None:
            return contextlib.nullcontext()
        return self._no_sync()

    def clip_grad_norm(self, max_norm: float) -> float:
        limit = max_norm if max_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit))

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {**model_state_dict(self.module), **optimizer_state_dict(self.optimizer, self.module)}

    def load_checkpoint(self, path: str) -> None:
        load_model_state_dict(self.module, path, verify=False)  # launch.checkpoint.load verified it
        load_optimizer_state_dict(self.optimizer, self.module, path, verify=False)
