"""`ShardedOps`: the `TensorOps` of a sharded layout, resolving each round's requests with batched collectives;
`RoutedOps`: several of them, one per process group, each for its own tensors.

Every method is collective: all ranks of ``comm``'s group call it with the same requests (same tensors, kinds,
dtypes and order), each passing its own local segments (possibly empty).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from mgup_dist.rules.requests import Orthogonalize, PackedMask, Request, TensorSum, TopKMask
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

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor | PackedMask]:
        return topk_masks(self.comm, requests)

    def orthogonalize(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        if self.orthogonalizer is None:
            raise RuntimeError(
                "ShardedOps was built without an orthogonalizer, so it cannot run the Muon family's matrix path; "
                "pass one, e.g. ShardedOps(comm, DistributedOrthogonalizer(comm))"
            )
        return self.orthogonalizer(requests)


class RoutedOps:
    """`TensorOps` for tensors sharded over different process groups: request of tensor ``i`` goes to
    ``ops[route[i]]`` (e.g. Megatron's tensor-parallel matrices over the tensor-and-data-parallel group, the
    tensor-parallel replicas of a norm over the data-parallel group only).

    Each kind's batch is split by route and resolved by each ``ops`` in list order, so the ranks of every
    group make the same calls in the same order as long as they route the same tensors alike. ``comm``: the
    group that spans all of them (for the non-finite flag).
    """

    def __init__(self, ops: Sequence["ShardedOps"], route: Sequence[int], comm: Collectives) -> None:
        if any(not 0 <= r < len(ops) for r in route):
            raise ValueError(f"routes {sorted(set(route))} name ops outside [0, {len(ops)})")
        self.ops, self.route, self.comm = list(ops), list(route), comm

    def _resolve(self, requests: Sequence[Request], kind: str) -> list[torch.Tensor]:
        answers: list[torch.Tensor | None] = [None] * len(requests)
        for position, ops in enumerate(self.ops):
            picked = [i for i, r in enumerate(requests) if self.route[r.segment.index] == position]
            if picked:
                for i, answer in zip(picked, getattr(ops, kind)([requests[i] for i in picked])):
                    answers[i] = answer
        return answers  # type: ignore[return-value]

    def tensor_sums(self, requests: Sequence[TensorSum]) -> list[torch.Tensor]:
        return self._resolve(requests, "tensor_sums")

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor | PackedMask]:
        return self._resolve(requests, "topk_masks")

    def orthogonalize(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        return self._resolve(requests, "orthogonalize")
