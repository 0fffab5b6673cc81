"""Distributors: how an optimizer finds, for each tensor it steps, the local segments and the tensor-wide ops.

A distributor is the boundary between update math (`mgup_dist.rules`) and an engine. `LocalDistributor` is the
single-process one: every parameter is whole. Sharded engines provide their own with the same interface.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from mgup_dist.ops.base import TensorOps
from mgup_dist.ops.local import LocalOps
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.segment import Segment


class Distributor(Protocol):
    """Yields ``(group, slot)`` for every tensor to step, in the same order on every rank, and the ops."""

    ops: TensorOps

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        ...


def _flat(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError(f"{what} of shape {tuple(tensor.shape)} is not contiguous; mgup_dist needs contiguous tensors")
    return tensor.view(-1)


class LocalDistributor:
    """Every parameter is held whole by this process; state tensors take the parameter's shape."""

    def __init__(self) -> None:
        self.ops: TensorOps = LocalOps()

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        index = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                index += 1
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
                )
