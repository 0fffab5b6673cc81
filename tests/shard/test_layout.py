"""`ShardLayout` validation and the engines' layout builders (`mgup_dist.shard.layout`)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgup_dist.shard.layout import (
    ShardLayout,
    balanced_whole_tensor_layout,
    even_split_layout,
    flat_layout,
    row_split_layout,
    tensor_cost,
    whole_tensor_layout,
)
from mgup_dist.shard.planner import balanced_owners
from mgup_dist.shard.segment import Segment

SHAPES = [(3, 4), (5,), (2, 2)]  # 12 + 5 + 4 = 21 elements

shapes_strategy = st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


def _per_tensor(layout: ShardLayout) -> list[list[tuple[int, int]]]:
    return [[layout.bounds[r][i] for r in range(layout.world_size)] for i in range(len(layout.shapes))]


# --- validation ---------------------------------------------------------------------------------------------


def test_valid_layout_gives_segments_per_rank() -> None:
    layout = ShardLayout(((2, 3), (4,)), (((0, 4), (0, 0)), ((4, 6), (0, 4))))
    assert layout.world_size == 2
    assert layout.segments(0) == [Segment(0, (2, 3), 0, 4), Segment(1, (4,), 0, 0)]
    assert layout.segment(1, 1).is_whole and layout.lengths(0) == [4, 2] and layout.local_numel(1) == 6


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((((0, 3),), ((4, 6),)), r"tensor 0 \(shape \(6,\)\): elements \[3, 4\) are held by no rank"),
        ((((0, 3),), ((3, 5),)), r"tensor 0 \(shape \(6,\)\): elements \[5, 6\) are held by no rank"),
        ((((0, 0),), ((0, 0),)), r"elements \[0, 6\) are held by no rank"),
        ((((0, 4),), ((3, 6),)), r"tensor 0 \(shape \(6,\)\): ranks 0 and 1 both hold \[3, 4\)"),
        ((((0, 6),), ((0, 6),)), r"ranks 0 and 1 both hold \[0, 6\)"),
        ((((0, 3),), ((3, 7),)), r"tensor 0 \(shape \(6,\), 6 elements\): rank 1's range \[3, 7\) is out of range"),
        ((((-1, 3),), ((3, 6),)), r"rank 0's range \[-1, 3\) is out of range"),
        ((((4, 3),), ((0, 6),)), r"rank 0's range \[4, 3\) is out of range"),
    ],
)
def test_invalid_cover_is_a_clear_error(bounds: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShardLayout(((6,),), bounds)


def test_error_names_the_offending_tensor() -> None:
    with pytest.raises(ValueError, match=r"tensor 1 \(shape \(2, 2\)\): elements \[2, 4\) are held by no rank"):
        ShardLayout(((3,), (2, 2)), (((0, 3), (0, 2)),))


def test_wrong_number_of_ranges_or_ranks() -> None:
    with pytest.raises(ValueError, match="rank 1 has 1 ranges for 2 tensors"):
        ShardLayout(((3,), (2,)), (((0, 3), (0, 2)), ((3, 3),)))
    with pytest.raises(ValueError, match="at least one rank"):
        ShardLayout(((3,),), ())


def test_empty_tensors_and_no_tensors_are_valid() -> None:
    assert ShardLayout(((0, 4),), (((0, 0),), ((0, 0),))).lengths(0) == [0, 0]
    assert flat_layout([], 3).segments(2) == []


# --- flat (ZeRO-1/2, Megatron) -----------------------------------------------------------------------------


def test_flat_layout_default_cuts_equal_parts() -> None:
    layout = flat_layout(SHAPES, 4)  # parts of ceil(21/4) = 6: [0,6) [6,12) [12,18) [18,21)
    assert _per_tensor(layout) == [
        [(0, 6), (6, 12), (12, 12), (12, 12)],
        [(0, 0), (0, 0), (0, 5), (5, 5)],
        [(0, 0), (0, 0), (0, 1), (1, 4)],
    ]
    assert [layout.local_numel(r) for r in range(4)] == [6, 6, 6, 3]


def test_flat_layout_explicit_cuts_one_tensor_over_every_rank_and_empty_ranks() -> None:
    layout = flat_layout(SHAPES, 5, cuts=[2, 2, 7, 9])
    assert _per_tensor(layout)[0] == [(0, 2), (2, 2), (2, 7), (7, 9), (9, 12)]  # over every rank
    assert layout.local_numel(1) == 0  # an empty rank
    assert _per_tensor(layout)[2] == [(0, 0), (0, 0), (0, 0), (0, 0), (0, 4)]


def test_flat_layout_more_ranks_than_tensors() -> None:
    layout = flat_layout([(2,), (1,)], 6)
    assert [layout.local_numel(r) for r in range(6)] == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("cuts", [[3], [5, 3, 9], [-1, 3, 9], [3, 9, 22]])
def test_flat_layout_rejects_bad_cuts(cuts: list[int]) -> None:
    with pytest.raises(ValueError, match="cuts"):
        flat_layout(SHAPES, 4, cuts=cuts)


@settings(max_examples=60, deadline=None)
@given(shapes_strategy, st.integers(1, 5), st.data())
def test_flat_layout_follows_the_flat_buffer(
    shapes: list[tuple[int, ...]], world_size: int, data: st.DataObject
) -> None:
    total = sum(math.prod(s) for s in shapes)
    cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=world_size - 1, max_size=world_size - 1)))
    layout = flat_layout(shapes, world_size, cuts)
    edges = [0, *cuts, total]
    offsets = [sum(math.prod(s) for s in shapes[:i]) for i in range(len(shapes))]
    for rank in range(world_size):
        held = [offsets[i] + j for i, (lo, hi) in enumerate(layout.bounds[rank]) for j in range(lo, hi)]
        assert held == list(range(edges[rank], edges[rank + 1]))


# --- even split (ZeRO-3), rows (FSDP2), whole tensors (layer-wise) ------------------------------------------


def test_even_split_layout_ceil_parts() -> None:
    layout = even_split_layout([(10,), (2,), (1,)], 4)
    assert _per_tensor(layout) == [
        [(0, 3), (3, 6), (6, 9), (9, 10)],
        [(0, 1), (1, 2), (2, 2), (2, 2)],
        [(0, 1), (1, 1), (1, 1), (1, 1)],
    ]


@settings(max_examples=60, deadline=None)
@given(shapes_strategy, st.integers(1, 5))
def test_row_split_layout_matches_torch_chunk(shapes: list[tuple[int, ...]], world_size: int) -> None:
    layout = row_split_layout(shapes, world_size)
    for index, shape in enumerate(shapes):
        full = torch.arange(math.prod(shape)).reshape(shape)
        rows = full.reshape(1) if not shape else full
        chunks = rows.chunk(world_size) if rows.shape[0] else []
        for rank in range(world_size):
            lo, hi = layout.bounds[rank][index]
            expected = chunks[rank].reshape(-1).tolist() if rank < len(chunks) else []
            assert list(range(lo, hi)) == expected


def test_row_split_layout_example() -> None:
    assert _per_tensor(row_split_layout([(5, 3)], 4))[0] == [(0, 6), (6, 12), (12, 15), (15, 15)]


def test_whole_tensor_layout() -> None:
    layout = whole_tensor_layout(SHAPES, 3, owners=[2, 0, 2])
    assert layout.segment(2, 0).is_whole and layout.segment(0, 1).is_whole and layout.segment(2, 2).is_whole
    assert layout.local_numel(1) == 0


@pytest.mark.parametrize(
    ("owners", "message"), [([0, 1], "2 owners for 3 tensors"), ([0, 3, 1], "owner 3 of tensor 1")]
)
def test_whole_tensor_layout_rejects_bad_owners(owners: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        whole_tensor_layout(SHAPES, 3, owners)


def test_tensor_cost_is_newton_schulz_work_or_numel() -> None:
    assert tensor_cost((8, 2)) == 8 * 2 * 2 and tensor_cost((2, 8)) == 8 * 2 * 2
    assert tensor_cost((4, 3, 2, 2)) == 12 * 4 * 4  # conv: the (4, 12) view
    assert tensor_cost((7,)) == 7 and tensor_cost(()) == 1


def test_balanced_whole_tensor_layout_uses_the_planner() -> None:
    shapes = [(64, 16), (16, 64), (32, 32), (8,), (128, 4), (4, 4)]
    layout = balanced_whole_tensor_layout(shapes, 3)
    owners = [next(r for r in range(3) if layout.segment(r, i).is_whole) for i in range(len(shapes))]
    assert owners == balanced_owners([tensor_cost(s) for s in shapes], 3)
    assert len(set(owners)) == 3


@pytest.mark.parametrize("builder", [flat_layout, even_split_layout, row_split_layout])
def test_builders_reject_bad_world_size(builder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="world_size"):
        builder(SHAPES, 0)
