"""Backend ``ddp``: torch DistributedDataParallel (gloo on CPU, NCCL on CUDA), full optimizer on every rank."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.registry import register
from launch.backends.replicated import ReplicatedEngine
from launch.errors import LaunchError


@register
class DDPBackend(Backend):
    """Gradients are averaged across ranks by DDP's bucketed all-reduce on the last micro-batch of each step.

    Option ``bucket_cap_mb`` (number > 0, default 25) is DDP's gradient bucket size.
    """

    name = "ddp"
    OPTIONS = {"bucket_cap_mb": 25}

    def check(self) -> None:
        cap = self.options["bucket_cap_mb"]
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0:
            raise LaunchError(f"backend_options.bucket_cap_mb must be a number > 0, got {cap!r}")

    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.options["bucket_cap_mb"])
        return ReplicatedEngine(model, wrapped, make_optimizer(model), no_sync=wrapped.no_sync)
