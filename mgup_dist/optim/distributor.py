"""Distributors: how an optimizer finds, for each tensor it steps, the local segments and the tensor-wide ops.

A distributor is the boundary between update math (`mgup_dist.rules`) and an engine. `LocalDistributor` is the
single-process one: every parameter is whole. Sharded engines provide their own with the same interface.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Protocol, Sequence

import torch

from mgup_dist.ops.base import TensorOps
from mgup_dist.ops.local import LocalOps
from mgup_dist.optim.nonfinite import any_rank
from mgup_dist.optim.scratch import ScratchPool
from mgup_dist.optim.state_entries import StateEntry, param_state_entries
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.segment import Segment


class Distributor(Protocol):
    """Yields ``(group, slot)`` for every tensor to step, in the same order on every rank, and the ops.

    ``sharded`` is False when every rank holds whole tensors (replicated state); `state_entries` lists, for every
    logical tensor, where its optimizer state lives on this rank and which `Segment` it covers (what
    `mgup_dist.checkpoint` saves and loads).
    `any_rank` ORs a 0-d flag over the ranks sharing the tensors (collective where they are sharded).
    An optional ``lockstep`` attribute (default True) set False lets the optimizer run the tensors' rules one
    at a time instead of in batched rounds (`mgup_dist.rules.driver.run_rules`): only for a single process.
    An optional ``known_finite()`` method returning True lets the non-finite guard skip its check for the current
    step (`mgup_dist.optim.nonfinite`): only when the engine has established, identically on every rank, that
    none of the gradients handed to the optimizer holds NaN/inf.
    """

    ops: TensorOps
    sharded: bool

    def state_entries(self, optimizer: torch.optim.Optimizer) -> list[StateEntry]:
        ...

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        ...

    def any_rank(self, flag: torch.Tensor) -> bool:
        ...


def _flat(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError(f"{what} of shape {tuple(tensor.shape)} is not contiguous; mgup_dist needs contiguous tensors")
    return tensor.view(-1)


class LocalDistributor:
    """Every parameter is held whole by this process; state tensors take the parameter's shape.

    Rules run one tensor at a time (``lockstep`` False), so their temporaries come from one `ScratchPool`,
    ``scratch``, reused across tensors and steps: it holds a few buffers of the largest tensor's size between
    steps (``scratch.clear()`` releases them).
    """

    sharded = False
    lockstep = False

    def __init__(self) -> None:
        self.ops: TensorOps = LocalOps()
        self.scratch = ScratchPool()

    def state_entries(self, optimizer: torch.optim.Optimizer) -> list[StateEntry]:
        """Every parameter whole, its state in ``optimizer.state[param]``."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return param_state_entries(optimizer, {id(p): Segment.whole(i, tuple(p.shape)) for i, p in enumerate(params)})

    def any_rank(self, flag: torch.Tensor) -> bool:
        """``flag`` itself: every rank holding whole tensors sees the same (already reduced) gradients."""
        return any_rank(None, flag)

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        index = 0
        registered = getattr(optimizer, "registered_params", None)
        for group in optimizer.param_groups:
            for param in group["params"]:
                index += 1
                if registered is not None and id(param) not in registered:
                    raise RuntimeError(
                        f"{type(optimizer).__name__} holds a tensor of shape {tuple(param.shape)} that was never added "
                        "through add_param_group: an engine replaced its parameters (e.g. DeepSpeed ZeRO's flat "
                        "partitions), so per-tensor masks and Newton-Schulz would see the wrong tensors. Use "
                        "mgup_dist.deepspeed.initialize (or ZeroEngine / FSDP2) instead of handing the optimizer over"
                    )
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
                yield group, Slot(
                    param=_flat(param.data, "parameter"),
                    grad=_flat(param.grad, "gradient"),
                    state=optimizer.state[param],
                    segment=Segment.whole(index - 1, tuple(param.shape)),
                    allocate=lambda dtype, p=param: torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
                    workspace=None if self.lockstep else self.scratch,  # shared scratch needs one-at-a-time rules
                )


def distributor_for(current: Distributor, params: Sequence[torch.Tensor]) -> Distributor:
    """The distributor to use once ``params`` join the optimizer: ``current``, unless some are DTensors
    (FSDP2), which switch it to `mgup_dist.integrations.fsdp.FSDPDistributor` (validating their placements)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported yet: no parameter can be a DTensor
    if dtensor is None or not any(isinstance(p, dtensor.DTensor) for p in params):
        return current
    from mgup_dist.integrations.fsdp import adopt_dtensors  # lazy: only FSDP2 users pay for the integration

    return adopt_dtensors(current, params)
