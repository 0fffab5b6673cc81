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
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.segment import Segment
from mgup_dist.shard.select import NonFiniteVerdict, raise_nonfinite, topk_masks, whole_topk_masks

Orthogonalizer = Callable[[Sequence[Orthogonalize]], list[torch.Tensor]]

_SUM_DTYPES = (torch.float64, torch.int64)


def held_whole(layout: ShardLayout) -> dict[int, tuple[int, ...]]:
    """The logical shape of each tensor of ``layout`` that one rank holds whole, by tensor index."""
    return {
        index: shape for index, shape in enumerate(layout.shapes)
        if any(layout.segment(rank, index).is_whole for rank in range(layout.world_size))
    }


class ShardedOps:
    """Collective `TensorOps` over ``comm``.

    - `tensor_sums`: one all-reduce per dtype (float64, then int64) for the whole batch;
    - `topk_masks`: exact distributed radix select (`mgup_dist.shard.select`). With the engine's ``layout``
      (global knowledge, the same on every rank), a round whose tensors are each held whole by one rank is
      answered locally (`whole_topk_masks`) and its non-finite flags' all-reduce is left in flight until
      `settle`, so it overlaps whatever the round resolves next (Newton–Schulz);
    - `orthogonalize`: delegated to ``orthogonalizer`` (e.g. `DistributedOrthogonalizer`); without one, the
      Muon family's matrix path raises;
    - `settle`: raises `NonFiniteScoresError` on every rank if a pending verdict names a tensor. The driver calls
      it after every round, before any rule sees an answer.
    """

    def __init__(
        self, comm: Collectives, orthogonalizer: Orthogonalizer | None = None, layout: ShardLayout | None = None
    ) -> None:
        self.comm = comm
        self.orthogonalizer = orthogonalizer
        self._held_whole = held_whole(layout) if layout is not None else {}
        self._verdicts: list[NonFiniteVerdict] = []

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
        if requests and all(self._known_whole(r.segment) for r in requests):
            answers, verdict = whole_topk_masks(self.comm, requests)
            self._verdicts.append(verdict)
            return answers  # type: ignore[return-value]  # None only where the verdict will raise
        return topk_masks(self.comm, requests)

    def _known_whole(self, segment: Segment) -> bool:
        """Whether the layout shows one rank holding ``segment``'s tensor whole (False without a layout)."""
        return self._held_whole.get(segment.index) == segment.shape

    def settle(self) -> None:
        """Waits for the pending non-finite verdicts of `topk_masks`; `NonFiniteScoresError` on every rank if any
        names a tensor. Collective only in that it waits for all-reduces every rank started."""
        verdicts, self._verdicts = self._verdicts, []
        raise_nonfinite([index for verdict in verdicts for index in verdict.settle()])

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

    def settle(self) -> None:
        for ops in self.ops:
            ops.settle()
