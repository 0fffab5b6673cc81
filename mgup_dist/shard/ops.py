"""`ShardedOps`: the `TensorOps` of a sharded layout, resolving each round's requests with batched collectives.

Every method is collective: all ranks of ``comm``'s group call it with the same requests (same tensors, kinds,
dtypes and order), each passing its own local segments (possibly empty).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mgup_dist.rules.requests import Orthogonalize, TensorSum, TopKMask
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.select import topk_masks

Orthogonalizer = Callable[[Sequence[Orthogonalize]], list[torch.Tensor]]

_SUM_DTYPES = (torch.float64, torch.int64)


class ShardedOps:
    """Collective `TensorOps` over ``comm``.

    - `tensor_sums`: one all-reduce per dtype (float64, then int64) for the whole batch;
    - `topk_masks`: exact distributed radix select (`mgup_dist.shard.select`);
    - `orthogonalize`: delegated to ``orthogonalizer`` (e.g. `DistributedOrthogonalizer`); without one, the
      Muon family's matrix path raises.
    """

    def __init__(self, comm: Collectives, orthogonalizer: Orthogonalizer | None = None) -> None:
        self.comm = comm
        self.orthogonalizer = orthogonalizer

    def tensor_sums(self, requests: Sequence[TensorSum]) -> list[torch.Tensor]:
        """Global sums: each request's 0-d ``value`` summed over ranks, identical on every rank."""
        for r in requests:
            if r.value.dtype not in _SUM_DTYPES or r.value.dim() != 0:
                raise TypeError(
                    f"TensorSum of tensor {r.segment.index} must be a 0-d float64 or int64 tensor, "
                    f"got dtype {r.value.dtype} and shape {tuple(r.value.shape)}"
                )
        answers: list[torch.Tensor | None] = [None] * len(requests)
        for dtype in _SUM_DTYPES:
            picked = [i for i, r in enumerate(requests) if r.value.dtype == dtype]
            if not picked:
                continue
            summed = self.comm.all_reduce(torch.stack([requests[i].value for i in picked]))
            for i, value in zip(picked, summed.unbind()):
                answers[i] = value
        return answers  # type: ignore[return-value]

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor]:
        return topk_masks(self.comm, requests)

    def orthogonalize(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        if self.orthogonalizer is None:
            raise RuntimeError(
                "ShardedOps was built without an orthogonalizer, so it cannot run the Muon family's matrix path; "
                "pass one, e.g. ShardedOps(comm, DistributedOrthogonalizer(comm))"
            )
        return self.orthogonalizer(requests)
