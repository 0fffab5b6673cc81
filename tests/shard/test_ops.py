"""`ShardedOps`: batching of tensor sums, delegation of top-k and orthogonalisation (single process, with a
stand-in for `Collectives`; the multi-rank behaviour is exercised in test_invariance and test_select)."""
from __future__ import annotations

import pytest
import torch

from mgup_dist.ops.select import topk_mask
from mgup_dist.rules.requests import Orthogonalize, TensorSum, TopKMask
from mgup_dist.shard.ops import ShardedOps
from mgup_dist.shard.segment import Segment


class ReplicatedComm:
    """Stands in for `Collectives` over ``world_size`` ranks that all contribute this rank's values."""

    def __init__(self, world_size: int) -> None:
        self.world_size, self.rank = world_size, 0
        self.calls: list[tuple[torch.dtype, int]] = []

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append((tensor.dtype, tensor.numel()))
        return tensor.mul_(self.world_size)

    def all_gather_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return values.unsqueeze(0).expand(self.world_size, -1).clone()


def _segment(index: int) -> Segment:
    return Segment(index, (4, 4), 0, 8)


def test_tensor_sums_take_one_all_reduce_per_dtype_in_request_order() -> None:
    comm = ReplicatedComm(3)
    requests = [
        TensorSum(_segment(0), torch.tensor(1.5, dtype=torch.float64)),
        TensorSum(_segment(1), torch.tensor(7, dtype=torch.int64)),
        TensorSum(_segment(2), torch.tensor(-2.0, dtype=torch.float64)),
    ]
    answers = ShardedOps(comm).tensor_sums(requests)
    assert comm.calls == [(torch.float64, 2), (torch.int64, 1)]
    assert [a.dtype for a in answers] == [torch.float64, torch.int64, torch.float64]
    assert [a.item() for a in answers] == [4.5, 21, -6.0] and all(a.dim() == 0 for a in answers)


def test_tensor_sums_of_nothing_make_no_call() -> None:
    comm = ReplicatedComm(2)
    assert ShardedOps(comm).tensor_sums([]) == [] and comm.calls == []


@pytest.mark.parametrize("value", [torch.tensor(1.0), torch.tensor([1.0], dtype=torch.float64)])
def test_tensor_sums_reject_other_dtypes_and_shapes(value: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="TensorSum of tensor 5 must be a 0-d float64 or int64 tensor"):
        ShardedOps(ReplicatedComm(2)).tensor_sums([TensorSum(_segment(5), value)])


def test_topk_masks_resolve_through_the_distributed_select() -> None:
    scores = torch.tensor([0.5, -0.0, 2.0, 0.0, 0.5])
    request = TopKMask(Segment.whole(0, (5,)), scores, 3)
    comm = ReplicatedComm(1)
    (mask,) = ShardedOps(comm).topk_masks([request])
    assert torch.equal(mask, topk_mask(scores, 3)) and comm.calls  # the flags all-reduce ran


def test_orthogonalize_needs_an_orthogonalizer() -> None:
    request = Orthogonalize(Segment.whole(0, (2, 2)), torch.eye(2).view(-1), 2, 2, 5, torch.float32)
    with pytest.raises(RuntimeError, match="without an orthogonalizer"):
        ShardedOps(ReplicatedComm(2)).orthogonalize([request])
    seen: list = []
    answer = [torch.ones(4)]
    ops = ShardedOps(ReplicatedComm(2), orthogonalizer=lambda requests: seen.append(requests) or answer)
    assert ops.orthogonalize([request]) is answer and seen == [[request]]
