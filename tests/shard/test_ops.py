"""`ShardedOps`: batching of tensor sums, delegation of top-k and orthogonalisation (single process, with a
stand-in for `Collectives`), and top-k rounds over tensors the layout shows held whole (gloo, W=2 and 3: answered
locally, the non-finite verdict pending until `settle`). The split-tensor selection is exercised in test_select,
whole optimizers in test_invariance."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from mgup_dist.ops.select import topk_mask
from mgup_dist.rules.requests import NonFiniteScoresError, Orthogonalize, TensorSum, TopKMask
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout, balanced_whole_tensor_layout, flat_layout, whole_tensor_layout
from mgup_dist.shard.ops import ShardedOps, held_whole
from mgup_dist.shard.segment import Segment
from tests.distributed import run_distributed


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


def test_held_whole_gives_the_shape_of_each_tensor_one_rank_holds_entirely() -> None:
    shapes = ((2, 3), (4,), (5,))
    assert held_whole(flat_layout(shapes, 2, [7])) == {0: (2, 3), 2: (5,)}  # the cut splits (4,)
    assert held_whole(flat_layout(shapes, 2, [6])) == dict(enumerate(shapes))
    assert held_whole(whole_tensor_layout(shapes, 3, [2, 0, 2])) == dict(enumerate(shapes))
    columns = ShardLayout(((2, 3),), (((0, 2),), ((0, 4),)), (((0, 1),), ((1, 3),)))  # a column split
    assert held_whole(columns) == {}
    every_column = ShardLayout(((2, 3),), (((0, 6),), ((0, 0),)), (((0, 3),), ((0, 3),)))
    assert held_whole(every_column) == {0: (2, 3)}


SHAPES = ((6, 5), (40,), (3,), (7,))
KS = (15, 0, 3, 2)  # k = 0 and k = numel among them


def _scores() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(math.prod(shape), generator=gen) for shape in SHAPES]
    scores[0][:10] = 0.0  # ties at the cut
    return scores


def _requests(layout: ShardLayout, rank: int, poison: int | None = None) -> list[TopKMask]:
    requests = []
    for index, (full, k) in enumerate(zip(_scores(), KS)):
        segment = layout.segment(rank, index)
        local = full[segment.lo : segment.hi].clone()
        if index == poison and local.numel():
            local[-1] = float("nan")
        requests.append(TopKMask(segment, local, k))
    return requests


def _settled(ops: ShardedOps) -> str | None:
    try:
        ops.settle()
    except NonFiniteScoresError as err:
        return str(err)
    return None


def _whole_rounds(rank: int, world_size: int) -> dict:
    comm = Collectives()
    layout = balanced_whole_tensor_layout(SHAPES, world_size)
    ops = ShardedOps(comm, layout=layout)
    comm.reset_stats()
    masks = ops.topk_masks(_requests(layout, rank))
    stats = {kind: (s.calls, s.bytes) for kind, s in comm.stats.items()}
    clean = _settled(ops)
    ops.topk_masks(_requests(layout, rank, poison=0))  # answered without raising
    poisoned = _settled(ops)
    after = ops.topk_masks(_requests(layout, rank))
    after_settled = _settled(ops)
    split = flat_layout(SHAPES, world_size, [15] + [30 + i for i in range(world_size - 2)])  # (6, 5) is split
    split_ops = ShardedOps(comm, layout=split)
    try:
        split_ops.topk_masks(_requests(split, rank, poison=0))
        split_raised = None
    except NonFiniteScoresError as err:  # the collective selection raises at once
        split_raised = str(err)
    return {"masks": masks, "stats": stats, "clean": clean, "poisoned": poisoned, "after": after,
            "after_settled": after_settled, "split_raised": split_raised, "split_pending": _settled(split_ops),
            "bounds": [layout.segment(rank, i) for i in range(len(SHAPES))]}


@functools.lru_cache(maxsize=None)
def _whole_results(world_size: int) -> tuple[dict, ...]:
    return tuple(run_distributed(world_size, _whole_rounds))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rounds_of_tensors_held_whole_answer_locally_and_settle_their_verdict_later(world_size: int) -> None:
    results = _whole_results(world_size)
    for index, (full, k) in enumerate(zip(_scores(), KS)):
        expected = topk_mask(full, k)
        for result in results:
            segment = result["bounds"][index]
            assert torch.equal(result["masks"][index], expected[segment.lo : segment.hi])
            assert torch.equal(result["after"][index], expected[segment.lo : segment.hi])
    for result in results:
        # one all-reduce: an int32 non-finite flag per request, nothing else
        assert result["stats"] == {"all_reduce": (1, 4 * len(SHAPES))}
        assert result["clean"] is None and result["after_settled"] is None
        assert result["poisoned"] == "MGUP mask scores of tensors [0] contain NaN or infinity (non-finite gradient?)"
        assert result["split_raised"] == result["poisoned"] and result["split_pending"] is None
