"""`TensorOps`: the interface through which update rules reach whole-tensor information.

Each method takes the requests of one kind from one round (all tensors of the step that asked), in the same
order on every rank, and returns their answers in that order. A single process resolves them locally
(`mgup_dist.ops.local.LocalOps`); sharded layouts resolve them with batched collectives
(`mgup_dist.shard`). All ranks of the process group must call each method with matching request lists.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from mgup_dist.rules.requests import Orthogonalize, PackedMask, TensorSum, TopKMask


class TensorOps(Protocol):
    """Resolves batched whole-tensor requests. See `mgup_dist.rules.requests` for each answer's contract."""

    def tensor_sums(self, requests: Sequence[TensorSum]) -> list[torch.Tensor]:
        ...

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor | PackedMask]:
        ...

    def orthogonalize(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        ...

    def settle(self) -> None:
        """Raises for anything the round's answers left pending (e.g. `NonFiniteScoresError` for non-finite mask
        scores seen on some rank), on every rank alike; the driver calls it after each round, before any rule
        sees an answer."""
        ...
