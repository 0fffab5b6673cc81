"""The contract between the training loop and a backend (how model and optimizer are distributed).

A `Backend` is constructed at startup from the process's `DistEnv` and the config's ``backend_options``; its
constructor validates both (a `LaunchError` before any work starts). `Backend.build` then turns the model and
an optimizer factory into an `Engine`, the only object the loop touches. All ranks call every method.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from launch.dist_env import DistEnv
from launch.errors import LaunchError
from launch.model import GPT, GPTShape

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Engine(ABC):
    """A model and optimizer prepared by a backend. ``model`` is what the loop calls forward on;
    ``optimizer.param_groups`` is where the loop sets the scheduled lr."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    @abstractmethod
    def micro_step(self, sync: bool) -> AbstractContextManager[Any]:
        """Context for one micro-batch's forward and backward; ``sync`` is True on the last micro-batch of a
        step, when gradients must be reduced across ranks."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Scales gradients so their global L2 norm is at most ``max_norm`` (no scaling when ``max_norm`` is
        0); returns the norm before clipping, identical on every rank."""

    @abstractmethod
    def step(self) -> None:
        """One optimizer step on the current (reduced, clipped) gradients."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drops all gradients (``set_to_none``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state in `mgup_dist.checkpoint`'s reshardable format (``model.<key>``,
        ``optim.state.<fqn>.<key>``, ...), ready for torch.distributed.checkpoint. Collective."""

    @abstractmethod
    def load_checkpoint(self, path: str) -> None:
        """Loads model and optimizer state saved by any backend's `state_dict`, at any world size. Collective."""


class Backend(ABC):
    """Base of every backend. Subclasses set ``name``, ``OPTIONS`` (option → default) and implement `build`."""

    name: ClassVar[str]
    needs_process_group: ClassVar[bool] = True
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, env: DistEnv, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            valid = ", ".join(sorted(self.OPTIONS)) or "none"
            raise LaunchError(f"unknown backend_options {unknown} for backend {self.name}; valid: {valid}")
        self.env = env
        self.options = {**self.OPTIONS, **options}
        self.micro_batch, self.accum_steps, self.grad_clip = 1, 1, 0.0
        self.check()

    def configure(self, micro_batch: int, accum_steps: int, grad_clip: float) -> None:
        """Records the run's batch split and ``train.grad_clip`` (for backends that must know them at `build`,
        e.g. DeepSpeed's config). Called by the launcher before `build`; defaults 1, 1 and 0."""
        self.micro_batch, self.accum_steps, self.grad_clip = micro_batch, accum_steps, grad_clip

    def check(self) -> None:
        """Hook: validate ``self.options`` and ``self.env``, raising `LaunchError`."""

    def make_model(self, shape: GPTShape) -> nn.Module:
        """The model to train (on the CPU; the loop moves it to ``env.device``), built from torch's default
        generator, which the loop seeds identically on every rank. Default: the launcher's `GPT`."""
        return GPT(shape)

    @abstractmethod
    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        """Places ``model`` (already on ``env.device``, same initial weights on every rank), wraps it, and
        builds its optimizer with ``make_optimizer``."""
