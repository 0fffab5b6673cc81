"""Flat ranges against rectangles: `runs` lists exactly the range's elements inside a region, in flat order."""
import random

import pytest
import torch

from mgup_dist.shard.regions import Region, block_view, even_blocks, flat_view, runs


@pytest.mark.parametrize("seed", range(30))
def test_runs_cover_the_intersection_in_flat_order(seed: int) -> None:
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 7), rng.randint(1, 7)
    numel = rows * cols
    lo = rng.randint(0, numel)
    hi = rng.randint(lo, numel)
    r0 = rng.randint(0, rows)
    c0 = rng.randint(0, cols)
    region = Region(r0, rng.randint(r0, rows), c0, rng.randint(c0, cols))
    expected = [
        f for f in range(lo, hi) if region.r0 <= f // cols < region.r1 and region.c0 <= f % cols < region.c1
    ]
    matrix = torch.arange(numel).view(rows, cols)
    piece = matrix.view(-1)[lo:hi]
    block = matrix[region.r0 : region.r1, region.c0 : region.c1]
    rects = runs(lo, hi, cols, region)
    assert len(rects) <= 3
    assert torch.cat([flat_view(piece, lo, cols, r).reshape(-1) for r in rects] + [piece[:0]]).tolist() == expected
    assert torch.cat([block_view(block, region, r).reshape(-1) for r in rects] + [piece[:0]]).tolist() == expected
    assert sum(r.numel for r in rects) == len(expected)


def test_flat_view_writes_through() -> None:
    piece = torch.zeros(10)  # flat range [3, 13) of a (·, 4) matrix: rows 1 and 2 whole, two partial rows
    (rect,) = runs(3, 13, 4, Region(0, 4, 1, 3))  # columns 1..2: the partial rows' elements fall outside
    assert rect == Region(1, 3, 1, 3)
    flat_view(piece, 3, 4, rect).fill_(1)
    assert piece.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("rows, cols, world", [(10, 3, 4), (3, 10, 4), (5, 5, 2), (2, 9, 5), (3, 2, 5)])
def test_even_blocks_split_the_long_side_of_the_wide_orientation(rows: int, cols: int, world: int) -> None:
    blocks = even_blocks(rows, cols, world)
    assert sorted(blocks) == list(range(world))
    tall = rows > cols
    sizes = [b.shape[0] if tall else b.shape[1] for b in blocks.values()]
    assert sum(sizes) == (rows if tall else cols)
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert all((b.shape[1] == cols) if tall else (b.shape[0] == rows) for b in blocks.values())
    assert sum(b.numel for b in blocks.values()) == rows * cols
