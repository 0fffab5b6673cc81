"""`ShardedDistributor`: steps an optimizer built over full parameters on the segments an engine holds locally.

Users construct optimizers over the model's full, logically shaped parameters. A sharded engine then swaps in
``optimizer.distributor = ShardedDistributor(ops, engine_shards)``: every step, the engine supplies one
`LocalShard` per logical tensor, in the same order on every rank and including tensors whose local segment
is empty, and the optimizer's rules run on those 1-D local pieces. Optimizer state stays keyed by the full
parameter (``optimizer.state[param]``), so param groups, ``state_dict`` and hooks work unchanged, but every
state tensor has the segment's length.

`ShardedTensors` is a simple in-memory engine over that interface (tests, and a building block for the ZeRO
engine): local 1-D copies of each parameter's segment, gradients copied in, updated parameters gathered back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from mgup_dist.ops.base import TensorOps
from mgup_dist.optim.nonfinite import any_rank
from mgup_dist.optim.state_entries import StateEntry, param_state_entries
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.ops import ShardedOps
from mgup_dist.shard.segment import Segment


@dataclass
class LocalShard:
    """This rank's piece of one logical tensor for one step.

    ``param_key``: the full parameter the optimizer was built over (selects its group and state).
    ``param`` / ``grad``: contiguous 1-D tensors of ``segment.length`` elements; the rule updates ``param`` in
    place. ``grad=None`` skips the tensor, which the engine must then do on every rank.
    """

    param_key: torch.Tensor
    segment: Segment
    param: torch.Tensor
    grad: torch.Tensor | None


def _check_shard(shard: LocalShard) -> None:
    segment = shard.segment
    if tuple(shard.param_key.shape) != segment.shape:
        raise ValueError(
            f"tensor {segment.index}: the optimizer's parameter has shape {tuple(shard.param_key.shape)} but the "
            f"engine's segment has logical shape {segment.shape} (an engine lost the original shape?)"
        )
    for name, local in (("param", shard.param), ("grad", shard.grad)):
        if local.dim() != 1 or local.numel() != segment.length or not local.is_contiguous():
            raise ValueError(
                f"tensor {segment.index}: local {name} must be contiguous 1-D with {segment.length} elements "
                f"(segment [{segment.lo}, {segment.hi})), got shape {tuple(local.shape)}"
            )


def _zeros(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(length, dtype=dtype, device=device)


class ShardedDistributor:
    """Yields ``(group, Slot)`` for every `LocalShard` from ``shards()`` that has a gradient, in order.

    State tensors are allocated as zeros of the segment's length (dtype as the rule asks), on the local
    parameter's device. ``ops`` resolves the rules' requests (e.g. `ShardedOps`).
    """

    sharded = True

    def __init__(self, ops: TensorOps, shards: Callable[[], Iterable[LocalShard]]) -> None:
        self.ops = ops
        self.shards = shards

    def state_entries(self, optimizer: torch.optim.Optimizer) -> list[StateEntry]:
        """The optimizer's parameters (the full ones the engine shards), each with the `Segment` this rank holds
        and its state in ``optimizer.state[param]``."""
        return param_state_entries(optimizer, {id(shard.param_key): shard.segment for shard in self.shards()})

    def any_rank(self, flag: torch.Tensor) -> bool:
        """``flag`` ORed over the ranks of ``ops``' group (one all-reduce; `ShardedOps` only, else local)."""
        return any_rank(self.ops.comm if isinstance(self.ops, ShardedOps) else None, flag)

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for shard in self.shards():
            if shard.grad is None:
                continue
            group = groups.get(id(shard.param_key))
            if group is None:
                raise ValueError(
                    f"tensor {shard.segment.index} (shape {shard.segment.shape}) is not a parameter of "
                    f"{type(optimizer).__name__}; build the optimizer over the full parameters the engine shards"
                )
            _check_shard(shard)
            yield group, Slot(
                param=shard.param,
                grad=shard.grad,
                state=optimizer.state[shard.param_key],
                segment=shard.segment,
                allocate=functools.partial(_zeros, shard.segment.length, shard.param.device),
            )


def local_piece(full: torch.Tensor, segment: Segment) -> torch.Tensor:
    """A 1-D copy of ``segment``'s range of the row-major flattening of ``full``."""
    return full.detach().reshape(-1)[segment.lo : segment.hi].clone()


def gather_full(comm: Collectives, layout: ShardLayout, local_params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Full tensors (logical shapes) from every rank's 1-D local pieces (``local_params[i]`` is this rank's
    segment of tensor ``i``). Collective: one uneven all-gather per dtype, dtypes in first-appearance order."""
    if len(local_params) != len(layout.shapes):
        raise ValueError(f"{len(local_params)} local pieces for a layout of {len(layout.shapes)} tensors")
    full = [torch.empty(shape, dtype=p.dtype, device=p.device) for shape, p in zip(layout.shapes, local_params)]
    for dtype in dict.fromkeys(p.dtype for p in local_params):
        indices = [i for i, p in enumerate(local_params) if p.dtype == dtype]
        mine = torch.cat([local_params[i].reshape(-1) for i in indices])
        sizes = [sum(layout.lengths(i)[rank] for i in indices) for rank in range(layout.world_size)]
        received = comm.all_gather_uneven(mine, sizes).split(sizes)
        for rank, flat in enumerate(received):
            pieces = flat.split([layout.lengths(i)[rank] for i in indices])
            for i, piece in zip(indices, pieces):
                lo, hi = layout.bounds[rank][i]
                full[i].view(-1)[lo:hi] = piece
    return full


class ShardedTensors:
    """In-memory engine: this rank's 1-D copies of its segments of ``params`` under ``layout``.

    ``params`` are the full parameters (the optimizer's); they are not modified until `write_back`. Use
    `distributor` to point an optimizer at the local copies, `load_grads` before each step.
    """

    def __init__(self, params: Sequence[torch.Tensor], layout: ShardLayout, rank: int) -> None:
        shapes = tuple(tuple(p.shape) for p in params)
        if shapes != layout.shapes:
            raise ValueError(f"parameter shapes {shapes} differ from the layout's {layout.shapes}")
        self.params = list(params)
        self.layout = layout
        self.segments = layout.segments(rank)
        self.local_params = [local_piece(p, s) for p, s in zip(self.params, self.segments)]
        self.local_grads: list[torch.Tensor | None] = [None] * len(self.params)

    def load_grads(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Copies this rank's segment of each full gradient (``None``: the tensor is skipped this step)."""
        self.local_grads = [None if g is None else local_piece(g, s) for g, s in zip(grads, self.segments)]

    def shards(self) -> list[LocalShard]:
        return [
            LocalShard(p, s, local, grad)
            for p, s, local, grad in zip(self.params, self.segments, self.local_params, self.local_grads)
        ]

    def distributor(self, ops: TensorOps) -> ShardedDistributor:
        return ShardedDistributor(ops, self.shards)

    def write_back(self, comm: Collectives) -> None:
        """Gathers the updated pieces from every rank into the full parameters (collective)."""
        with torch.no_grad():
            for param, full in zip(self.params, gather_full(comm, self.layout, self.local_params)):
                param.copy_(full)
