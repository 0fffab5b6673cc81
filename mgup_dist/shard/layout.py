"""`ShardLayout`: which contiguous range of each logical tensor every rank holds, and the engines' builders.

A layout is global knowledge (every rank builds the same one): for ``world_size`` ranks and a list of logical
shapes it gives each rank one `Segment` per tensor, a range ``[lo, hi)`` of the tensor's row-major flattening,
possibly empty (or, with ``blocks``, of one column block's flattening: tensor parallelism's column split).
Construction checks that the ranges of every tensor cover each of its elements exactly once.

Builders for the engines' schemes:

- `flat_layout`: all tensors concatenated into one flat buffer cut at arbitrary offsets (DeepSpeed ZeRO-1/2,
  Megatron's distributed optimizer);
- `even_split_layout`: every tensor split evenly over the ranks (ZeRO-3);
- `row_split_layout`: ranges of whole rows, ``torch.chunk`` on dim 0 (FSDP2 ``Shard(0)``);
- `whole_tensor_layout` / `balanced_whole_tensor_layout`: each tensor wholly on one rank (layer-wise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from mgup_dist.shard.planner import balanced_owners, ns_cost
from mgup_dist.shard.segment import Segment

Shape = tuple[int, ...]
Bounds = tuple[int, int]
Block = tuple[int, int] | None


def _tile(extent: int, ranges: Sequence[tuple[int, int, int]]) -> str | None:
    """Why ``(lo, hi, rank)`` ranges fail to tile ``[0, extent)`` exactly once, or None."""
    covered, last_rank = 0, None
    for lo, hi, rank in sorted(r for r in ranges if r[1] > r[0]):
        if lo < covered:
            return f"ranks {last_rank} and {rank} both hold [{lo}, {min(hi, covered)})"
        if lo > covered:
            return f"elements [{covered}, {lo}) are held by no rank"
        covered, last_rank = hi, rank
    return None if covered == extent else f"elements [{covered}, {extent}) are held by no rank"


def tiling_problem(rows: int, cols: int, pieces: Sequence[tuple[int, int, int, int]]) -> str | None:
    """Why every rank's piece ``(lo, hi, c0, c1)`` (flat range of columns ``[c0, c1)`` of a ``rows × cols``
    matrix; rank = position) fails to cover the matrix exactly once, or None when it does. Non-empty pieces
    must share column blocks that tile ``[0, cols)``, and each block's ranges must tile its elements."""
    blocks: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for rank, (lo, hi, c0, c1) in enumerate(pieces):
        if hi > lo:
            blocks.setdefault((c0, c1), []).append((lo, hi, rank))
    edge = 0
    for c0, c1 in sorted(blocks):
        if c0 != edge:
            return f"column blocks {sorted(blocks)} do not tile the {cols} columns"
        problem = _tile(rows * (c1 - c0), blocks[c0, c1])
        if problem:
            return f"column block [{c0}, {c1}): {problem}"
        edge = c1
    return None if edge == cols else f"column blocks {sorted(blocks)} do not tile the {cols} columns"


@dataclass(frozen=True)
class ShardLayout:
    """``bounds[rank][index] = (lo, hi)``: the flat range of tensor ``index`` (logical shape ``shapes[index]``)
    held by ``rank``; ``blocks[rank][index]``, when ``blocks`` is given, the `Segment` column block that range
    indexes into (``None``: the whole tensor). Raises `ValueError` unless every tensor's ranges cover its
    elements exactly once."""

    shapes: tuple[Shape, ...]
    bounds: tuple[tuple[Bounds, ...], ...]
    blocks: tuple[tuple[Block, ...], ...] | None = None

    def __post_init__(self) -> None:
        check_shapes(self.shapes)
        for rank, ranges in enumerate(self.bounds):
            for index, pair in enumerate(ranges):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_int(v) for v in pair):
                    raise ValueError(f"rank {rank}'s range of tensor {index} must be an integer pair (lo, hi), got {pair!r}")
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        object.__setattr__(self, "bounds", tuple(tuple((int(lo), int(hi)) for lo, hi in r) for r in self.bounds))
        if not self.bounds:
            raise ValueError("a layout needs at least one rank")
        for rank, ranges in enumerate(self.bounds):
            if len(ranges) != len(self.shapes):
                raise ValueError(f"rank {rank} has {len(ranges)} ranges for {len(self.shapes)} tensors")
        if self.blocks is not None:
            blocks = tuple(tuple(None if b is None else (int(b[0]), int(b[1])) for b in r) for r in self.blocks)
            object.__setattr__(self, "blocks", blocks)
            if len(blocks) != self.world_size or any(len(r) != len(self.shapes) for r in blocks):
                raise ValueError("blocks must give one entry per rank and tensor, like bounds")
        for index in range(len(self.shapes)):
            if self.blocks is not None and any(r[index] is not None for r in self.blocks):
                self._check_blocks(index)
            else:
                self._check_cover(index)

    def _check_blocks(self, index: int) -> None:
        segments = [self.segment(rank, index) for rank in range(self.world_size)]
        rows, cols = segments[0].matrix_shape
        pieces = [(s.lo, s.hi, s.columns(cols)[0], sum(s.columns(cols))) for s in segments]
        problem = tiling_problem(rows, cols, pieces)
        if problem:
            raise ValueError(f"tensor {index} (shape {self.shapes[index]}): {problem}")

    def _check_cover(self, index: int) -> None:
        shape, numel = self.shapes[index], math.prod(self.shapes[index])
        held = []
        for rank in range(self.world_size):
            lo, hi = self.bounds[rank][index]
            if not 0 <= lo <= hi <= numel:
                raise ValueError(
                    f"tensor {index} (shape {shape}, {numel} elements): "
                    f"rank {rank}'s range [{lo}, {hi}) is out of range"
                )
            held.append((lo, hi, rank))
        problem = _tile(numel, held)
        if problem:
            raise ValueError(f"tensor {index} (shape {shape}): {problem}")

    @property
    def world_size(self) -> int:
        return len(self.bounds)

    def segment(self, rank: int, index: int) -> Segment:
        """Rank ``rank``'s segment of tensor ``index`` (`ValueError` if out of its range or block)."""
        lo, hi = self.bounds[rank][index]
        block = None if self.blocks is None else self.blocks[rank][index]
        return Segment(index, self.shapes[index], lo, hi, block)

    def segments(self, rank: int) -> list[Segment]:
        """Rank ``rank``'s segment of every tensor, in tensor order (empty ones included)."""
        return [self.segment(rank, index) for index in range(len(self.shapes))]

    def lengths(self, index: int) -> list[int]:
        """Elements of tensor ``index`` held by each rank."""
        return [ranges[index][1] - ranges[index][0] for ranges in self.bounds]

    def local_numel(self, rank: int) -> int:
        """Elements of all tensors held by ``rank``."""
        return sum(hi - lo for lo, hi in self.bounds[rank])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """`ValueError` unless every shape is a sequence of integers >= 0."""
    for index, shape in enumerate(shapes):
        if not isinstance(shape, (tuple, list)) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"shape of tensor {index} must be a sequence of integers >= 0, got {shape!r}")


def _numels(shapes: Sequence[Sequence[int]]) -> list[int]:
    check_shapes(shapes)
    return [math.prod(shape) for shape in shapes]


def _check_world(world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def _per_tensor(
    shapes: Sequence[Sequence[int]], world_size: int, split: Callable[[int, int], Bounds]
) -> ShardLayout:
    """Layout whose rank ``rank`` holds range ``split(index, rank)`` of tensor ``index``."""
    bounds = tuple(tuple(split(index, rank) for index in range(len(shapes))) for rank in range(world_size))
    return ShardLayout(tuple(tuple(s) for s in shapes), bounds)


def flat_layout(
    shapes: Sequence[Sequence[int]], world_size: int, cuts: Sequence[int] | None = None
) -> ShardLayout:
    """Tensors concatenated in order into one flat buffer; rank ``r`` holds ``[cuts[r-1], cuts[r])`` of it.

    ``cuts``: the ``world_size - 1`` non-decreasing offsets in ``[0, total]`` between consecutive ranks.
    Default: equal parts of ``ceil(total / world_size)`` elements (the last ranks hold what is left, as with a
    buffer padded to a multiple of the world size).
    """
    _check_world(world_size)
    numels = _numels(shapes)
    total = sum(numels)
    if cuts is None:
        part = -(-total // world_size)
        cuts = [min(r * part, total) for r in range(1, world_size)]
    cuts = [int(c) for c in cuts]
    if len(cuts) != world_size - 1:
        raise ValueError(f"flat_layout needs {world_size - 1} cuts for {world_size} ranks, got {len(cuts)}")
    edges = [0, *cuts, total]
    if any(b < a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"cuts {cuts} must be non-decreasing offsets within [0, {total}]")
    offsets = [sum(numels[:i]) for i in range(len(numels))]

    def split(index: int, rank: int) -> Bounds:
        start, n = offsets[index], numels[index]
        lo = min(max(edges[rank] - start, 0), n)
        hi = min(max(edges[rank + 1] - start, 0), n)
        return lo, hi

    return _per_tensor(shapes, world_size, split)


def even_split_layout(shapes: Sequence[Sequence[int]], world_size: int) -> ShardLayout:
    """Each tensor split evenly: rank ``r`` holds ``[r·c, (r+1)·c)`` clipped to the tensor, ``c = ceil(numel/W)``
    (ZeRO-3 partitioning; the last ranks' parts may be short or empty)."""
    _check_world(world_size)
    numels = _numels(shapes)

    def split(index: int, rank: int) -> Bounds:
        n = numels[index]
        part = -(-n // world_size)
        return min(rank * part, n), min((rank + 1) * part, n)

    return _per_tensor(shapes, world_size, split)


def row_split_layout(shapes: Sequence[Sequence[int]], world_size: int) -> ShardLayout:
    """Whole rows per rank with ``torch.chunk`` semantics on dim 0 (FSDP2 ``Shard(0)``): ``ceil(rows/W)`` rows
    each, the last ranks short or empty. A 0-d tensor counts as one row."""
    _check_world(world_size)
    numels = _numels(shapes)

    def split(index: int, rank: int) -> Bounds:
        shape = tuple(shapes[index])
        rows = shape[0] if shape else 1
        row_size = numels[index] // rows if rows else 0
        part = -(-rows // world_size)
        return min(rank * part, rows) * row_size, min((rank + 1) * part, rows) * row_size

    return _per_tensor(shapes, world_size, split)


def whole_tensor_layout(shapes: Sequence[Sequence[int]], world_size: int, owners: Sequence[int]) -> ShardLayout:
    """Tensor ``i`` wholly on rank ``owners[i]``, empty elsewhere (layer-wise sharding)."""
    _check_world(world_size)
    if len(owners) != len(shapes):
        raise ValueError(f"{len(owners)} owners for {len(shapes)} tensors")
    for index, owner in enumerate(owners):
        if not isinstance(owner, int) or not 0 <= owner < world_size:
            raise ValueError(f"owner {owner!r} of tensor {index} is not a rank in [0, {world_size})")
    numels = _numels(shapes)

    def split(index: int, rank: int) -> Bounds:
        return (0, numels[index]) if owners[index] == rank else (0, 0)

    return _per_tensor(shapes, world_size, split)


def tensor_cost(shape: Sequence[int]) -> int:
    """Work estimate for layer-wise balancing: `ns_cost` (``max(m,n)·min(m,n)²``) of the ``(shape[0],
    prod(shape[1:]))`` view for ``ndim >= 2``, the element count otherwise."""
    if len(shape) < 2:
        return math.prod(shape)
    return ns_cost(shape[0], math.prod(shape[1:]))


def balanced_whole_tensor_layout(shapes: Sequence[Sequence[int]], world_size: int) -> ShardLayout:
    """`whole_tensor_layout` with owners from `balanced_owners` over `tensor_cost` (no rank ever needs another
    rank's piece of a matrix, so the Muon family orthogonalises without communication)."""
    _check_world(world_size)
    return whole_tensor_layout(shapes, world_size, balanced_owners([tensor_cost(s) for s in shapes], world_size))
