"""Backend ``fsdp2``: torch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded.

Each transformer block is sharded on its own, then the root (embeddings, tied ``lm_head``, final norm), on a
1-D mesh over all ranks, or with option ``mesh_shape: [replicas, shards]`` on a 2-D (HSDP) mesh whose product
is the world size. mgup_dist optimizers step the DTensor shards (`mgup_dist.integrations.fsdp`). Gradients are
reduce-scattered (averaged) on the last micro-batch of a step only (``set_requires_gradient_sync``);
``torch.nn.utils.clip_grad_norm_`` on the DTensor gradients gives the global norm.

Checkpoints use ``torch.distributed.checkpoint.state_dict`` (``get_state_dict``/``set_state_dict``): entries
``model.<fqn>`` and ``optim.state.<fqn>.<key>`` are DTensors of the parameter's shape, which DCP reshards, so
a run resumes under ``fsdp2`` at any world size or mesh. It is not mgup_dist.checkpoint's flattened format:
resuming across backends is refused with a `LaunchError`.
"""
from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.registry import register
from launch.errors import LaunchError

MARKER_KEY = "fsdp2.format"
FORMAT = 1


class FSDP2Engine(Engine):
    """``model`` is the root `FSDPModule`; the optimizer steps its DTensor parameters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def micro_step(self, sync: bool) -> AbstractContextManager[Any]:
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        limit = max_norm if max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state, MARKER_KEY: FORMAT}

    def load_checkpoint(self, path: str) -> None:
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        if MARKER_KEY not in metadata:
            raise LaunchError(
                f"checkpoint {path} was not written by backend fsdp2 (its state is in mgup_dist.checkpoint's "
                "flattened format or DeepSpeed's); resume it with the backend that wrote it"
            )
        state = self.state_dict()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@register
class FSDP2Backend(Backend):
    """FSDP2 over all ranks (1-D mesh) or an HSDP ``mesh_shape``; see the module docstring."""

    name = "fsdp2"
    OPTIONS = {"mesh_shape": None}

    def check(self) -> None:
        shape = self.options["mesh_shape"]
        if shape is None:
            return
        if (
            not isinstance(shape, (list, tuple)) or len(shape) != 2
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape)
        ):
            raise LaunchError(f"backend_options.mesh_shape must be null or [replicas, shards] of integers >= 1, got {shape!r}")
        if math.prod(shape) != self.env.world_size:
            raise LaunchError(
                f"backend_options.mesh_shape {list(shape)} has {math.prod(shape)} ranks, the launch has world_size "
                f"{self.env.world_size}"
            )

    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        device = self.env.device.type
        shape = self.options["mesh_shape"]
        if shape is None:
            mesh = init_device_mesh(device, (self.env.world_size,), mesh_dim_names=("shard",))
        else:
            mesh = init_device_mesh(device, tuple(shape), mesh_dim_names=("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return FSDP2Engine(model, make_optimizer(model))
