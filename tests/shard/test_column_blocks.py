"""Segments of column blocks (Megatron's row-parallel split): geometry checks, and the distributed top-k mask
and Newton-Schulz over them equal the local ones bit for bit.

Layout used (3 ranks, a 5 × 7 matrix): columns [0, 3) split between rank 0 (flat [0, 7) of the block: two rows
and one element of the third) and rank 1 (the rest of that block), columns [3, 7) wholly on rank 2; so ranks'
runs interleave inside rows and one cut falls mid-row. Scores take three values only, so almost every k cuts
through a block of ties spread over all ranks: the global tie rule (lowest row-major index first) is exercised.
"""
from __future__ import annotations

import pytest
import torch

from mgup_dist.ops.select import topk_mask
from mgup_dist.rules.newton_schulz import newton_schulz
from mgup_dist.rules.requests import Orthogonalize, TopKMask
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout, tiling_problem
from mgup_dist.shard.orthogonalize import DistributedOrthogonalizer
from mgup_dist.shard.segment import Segment
from mgup_dist.shard.select import topk_masks
from tests.distributed import run_distributed

SHAPE = (5, 7)
PIECES = [((0, 3), 0, 7), ((0, 3), 7, 15), ((3, 7), 0, 20)]  # (block, lo, hi) per rank


def _segment(rank: int, index: int = 0) -> Segment:
    block, lo, hi = PIECES[rank]
    return Segment(index, SHAPE, lo, hi, block)


def _local(full: torch.Tensor, segment: Segment) -> torch.Tensor:
    c0, c1 = segment.block
    return full[:, c0:c1].reshape(-1)[segment.lo : segment.hi].clone()


def _scores(seed: int) -> torch.Tensor:
    return torch.randint(0, 3, SHAPE, generator=torch.Generator().manual_seed(seed)).float()


def _worker(rank: int, world_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    comm = Collectives()
    segment = _segment(rank)
    masks = []
    for k in range(0, 36):
        scores = _scores(k)
        masks.append(topk_masks(comm, [TopKMask(segment, _local(scores, segment), k)])[0])
    matrix = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    request = Orthogonalize(segment, _local(matrix, segment), SHAPE[0], SHAPE[1], 5, torch.float32)
    return masks, DistributedOrthogonalizer(comm)([request])[0]


@pytest.fixture(scope="module")
def runs() -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    return run_distributed(3, _worker)


def test_topk_masks_over_column_blocks_equal_local(runs) -> None:
    for k in range(0, 36):
        want = topk_mask(_scores(k).reshape(-1), k).view(SHAPE)
        for rank, (masks, _) in enumerate(runs):
            assert torch.equal(masks[k], _local(want, _segment(rank))), f"k={k}, rank {rank}"


def test_newton_schulz_over_column_blocks_equals_local(runs) -> None:
    matrix = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    want = newton_schulz(matrix, 5, torch.float32)
    for rank, (_, answer) in enumerate(runs):
        assert torch.equal(answer, _local(want, _segment(rank)))


def test_segment_block_geometry() -> None:
    assert Segment(0, SHAPE, 0, 35, (0, 7)).block is None  # all columns: a contiguous segment
    assert Segment(0, SHAPE, 0, 15, (0, 3)).extent == 15
    assert not Segment(0, SHAPE, 0, 15, (0, 3)).is_whole
    with pytest.raises(ValueError, match="outside its 15 elements"):
        Segment(0, SHAPE, 0, 16, (0, 3))
    with pytest.raises(ValueError, match="column block"):
        Segment(0, SHAPE, 0, 1, (3, 8))


def test_layout_checks_column_block_cover() -> None:
    bounds = [[(lo, hi)] for _, lo, hi in PIECES]
    layout = ShardLayout([SHAPE], bounds, [[block] for block, _, _ in PIECES])
    assert layout.segment(1, 0) == _segment(1)
    with pytest.raises(ValueError, match=r"column block \[0, 3\): elements \[14, 15\)"):
        ShardLayout([SHAPE], [[(0, 7)], [(7, 14)], [(0, 20)]], [[(0, 3)], [(0, 3)], [(3, 7)]])
    assert "do not tile" in tiling_problem(5, 7, [(0, 15, 0, 3), (0, 15, 2, 5), (0, 10, 5, 7)])
    assert tiling_problem(5, 7, [(lo, hi, *block) for block, lo, hi in PIECES]) is None
