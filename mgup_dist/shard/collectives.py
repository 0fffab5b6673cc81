"""`Collectives`: the process-group calls mgup_dist makes, with per-kind call and byte accounting.

All sharded code talks to other ranks only through this class, so communication volume is measured in one
place (benchmarks read `stats`). Works on gloo and NCCL; uneven gathers go through ``all_to_all_single``
(gloo cannot all_gather uneven tensors). Every method is a collective: all ranks of ``group`` must call it in
the same order with matching shapes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


# torch >= 2.13 renamed all_gather_into_tensor/reduce_scatter_tensor; prefer the new names (PLATFORM §3).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Calls and bytes sent by this rank, per collective kind."""

    calls: int = 0
    bytes: int = 0


@dataclass
class PendingReduction:
    """An all-reduce in flight (`Collectives.start_all_reduce`): ``work`` is None when there was nothing to wait
    for (a group of one)."""

    tensor: torch.Tensor
    work: dist.Work | None

    def wait(self) -> torch.Tensor:
        """Blocks until the reduction is done; returns the reduced tensor."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


class Collectives:
    """Thin wrapper over a process group (default: the world) that counts what it sends."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats: dict[str, CommStats] = defaultdict(CommStats)

    def _count(self, kind: str, nbytes: int) -> None:
        entry = self.stats[kind]
        entry.calls += 1
        entry.bytes += nbytes

    def reset_stats(self) -> None:
        self.stats.clear()

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.stats.values())

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce of ``tensor``; returns it."""
        return self.start_all_reduce(tensor, op).wait()

    def start_all_reduce(
        self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> PendingReduction:
        """Starts an in-place all-reduce of ``tensor`` without waiting for it; the result is ``tensor`` once the
        returned handle's `PendingReduction.wait` returns (``tensor`` must not be touched before)."""
        self._count("all_reduce", tensor.numel() * tensor.element_size())
        work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True) if self.world_size > 1 else None
        return PendingReduction(tensor, work)

    def all_to_all(
        self, input: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int]
    ) -> torch.Tensor:
        """``all_to_all_single`` of a 1-D ``input`` cut into ``input_splits`` (one piece per destination rank);
        returns the 1-D concatenation of the pieces received, sized by ``output_splits``."""
        sent = sum(n for r, n in enumerate(input_splits) if r != self.rank)
        self._count("all_to_all", sent * input.element_size())
        output = input.new_empty(sum(output_splits))
        if self.world_size == 1:
            output.copy_(input)
            return output
        dist.all_to_all_single(
            output, input.contiguous(), list(output_splits), list(input_splits), group=self.group
        )
        return output

    def all_gather_uneven(self, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenation over ranks of each rank's 1-D ``tensor`` (rank r's has ``sizes[r]`` elements)."""
        own = tensor.contiguous()
        return self.all_to_all(own.repeat(self.world_size), [own.numel()] * self.world_size, sizes)

    def reduce_scatter(self, input: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of 1-D ``input`` (``world_size`` equal chunks); returns this rank's summed chunk."""
        if input.numel() % self.world_size:
            raise ValueError(f"reduce_scatter input of {input.numel()} elements is not divisible by {self.world_size}")
        chunk = input.numel() // self.world_size
        self._count("reduce_scatter", (input.numel() - chunk) * input.element_size())
        if self.world_size == 1:
            return input.clone()
        out = input.new_empty(chunk)
        _reduce_scatter_single(out, input.contiguous(), group=self.group)
        return out

    def all_gather_equal(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks of each rank's 1-D ``tensor`` (same size everywhere)."""
        self._count("all_gather", tensor.numel() * tensor.element_size())
        if self.world_size == 1:
            return tensor.clone()
        out = tensor.new_empty(self.world_size * tensor.numel())
        _all_gather_single(out, tensor.contiguous(), group=self.group)
        return out

    def all_gather_scalars(self, values: torch.Tensor) -> torch.Tensor:
        """``(world_size, n)`` stack of every rank's 1-D ``values`` (same ``n`` on every rank)."""
        self._count("all_gather", values.numel() * values.element_size())
        if self.world_size == 1:
            return values.unsqueeze(0).clone()
        out = values.new_empty(self.world_size * values.numel())  # gloo needs a flat output
        _all_gather_single(out, values.contiguous(), group=self.group)
        return out.view(self.world_size, values.numel())
