"""Random training windows that depend only on (seed, step), and a fixed set of validation windows.

The global batch of step ``t`` is ``global_batch`` window offsets drawn by a `torch.Generator` seeded from
``sha256(seed, t)``. Rank ``r`` of ``W`` takes the contiguous slice ``[r·G/W, (r+1)·G/W)`` of it and splits
that into micro-batches, so ranks see disjoint samples and the union is the same at every world size: the
data position saved in a checkpoint is just ``(seed, step)``, and a run resumed at another world size sees
the same global batches. A window is ``block_size + 1`` consecutive tokens: input ``x`` and target ``y``
shifted by one, both int64 ``(micro_batch, block_size)``.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from launch.errors import LaunchError

Batch = tuple[torch.Tensor, torch.Tensor]


def _generator(*key: object) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def _windows(tokens: torch.Tensor, offsets: torch.Tensor, block_size: int, device: torch.device) -> Batch:
    index = offsets[:, None] + torch.arange(block_size + 1)
    rows = tokens[index].to(device=device, dtype=torch.long)
    return rows[:, :-1], rows[:, 1:]


def _check_length(tokens: torch.Tensor, block_size: int, what: str) -> None:
    if tokens.numel() < block_size + 1:
        raise LaunchError(
            f"the {what} split has {tokens.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "use more data (data.max_bytes, --data) or a smaller model.block_size"
        )


class TrainWindows:
    """The deterministic stream of global training batches over ``tokens`` (1-D uint8)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, global_batch: int, seed: int) -> None:
        _check_length(tokens, block_size, "training")
        self.tokens = tokens
        self.block_size = block_size
        self.global_batch = global_batch
        self.seed = seed

    def offsets(self, step: int) -> torch.Tensor:
        """int64 ``(global_batch,)``: the start offsets of step ``step``'s windows (all ranks)."""
        high = self.tokens.numel() - self.block_size
        return torch.randint(0, high, (self.global_batch,), generator=_generator("train", self.seed, step))

    def micro_batches(
        self, step: int, rank: int, world_size: int, micro_batch: int, device: torch.device
    ) -> Iterator[Batch]:
        """Rank ``rank``'s share of step ``step``, in micro-batches of ``micro_batch`` windows."""
        per_rank = self.global_batch // world_size
        mine = self.offsets(step)[rank * per_rank:(rank + 1) * per_rank]
        for chunk in mine.split(micro_batch):
            yield _windows(self.tokens, chunk, self.block_size, device)


class EvalWindows:
    """``count`` fixed validation windows (the same at every evaluation and world size); rank ``r`` of ``W``
    evaluates windows ``r, r+W, r+2W, ...``."""

    def __init__(self, tokens: torch.Tensor, block_size: int, count: int, seed: int) -> None:
        _check_length(tokens, block_size, "validation")
        high = tokens.numel() - block_size
        self.tokens = tokens
        self.block_size = block_size
        self.all_offsets = torch.randint(0, high, (count,), generator=_generator("val", seed))

    def micro_batches(self, rank: int, world_size: int, micro_batch: int, device: torch.device) -> Iterator[Batch]:
        """This rank's windows in micro-batches of at most ``micro_batch``."""
        for chunk in self.all_offsets[rank::world_size].split(micro_batch):
            yield _windows(self.tokens, chunk, self.block_size, device)
