"""Backend ``single``: one process, no process group, the model used as is."""
from __future__ import annotations

from torch import nn

from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.registry import register
from launch.backends.replicated import ReplicatedEngine
from launch.errors import LaunchError


@register
class SingleBackend(Backend):
    """Trains in this process alone; a launch with more than one rank is an error."""

    name = "single"
    needs_process_group = False

    def check(self) -> None:
        if self.env.world_size != 1:
            raise LaunchError(
                f"backend single runs one process, but this launch has world_size {self.env.world_size}; "
                "use backend ddp (or launch one process)"
            )

    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        return ReplicatedEngine(model, model, make_optimizer(model))
