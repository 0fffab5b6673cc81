"""Where each logical tensor lies in the flat fp32 partitions DeepSpeed hands a client optimizer.

DeepSpeed steps a client optimizer on flat 1-D fp32 master tensors (one per param group, or per ZeRO-3
sub-group), not on the model's parameters. A `FlatPartition` names one such tensor and, for every logical
tensor of its group, a `TensorPiece`: the `Segment` this rank holds (possibly empty) and where that segment's
elements start in the flat tensor. The schemes, read from each wrapper's own bookkeeping:

- ZeRO-1/2 (`DeepSpeedZeroOptimizer`): a group's parameters are concatenated (in ``round_robin_bit16_groups``
  order, at ``round_robin_bit16_offsets``, which include ``parameter_alignment`` padding), padded to a multiple
  of the world size and cut into equal parts of ``partition_size``; rank ``r`` holds
  ``[r·size, (r+1)·size)`` (`flat_cut_pieces`). A parameter may straddle ranks.
- bf16 with fp32 gradient accumulation at ZeRO-1 (`BF16_Optimizer`): the same cut, parameters concatenated in
  group order without padding.
- ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): every parameter split evenly, ``c = ceil(numel / W)`` elements per
  rank (the last parts short or empty, padded to ``c``), and a sub-group's flat tensor concatenates its
  parameters' padded parts (`even_split_pieces`). Shapes come from ``ds_shape``: under ``zero.Init`` the
  parameters themselves are 1-D.

DeepSpeed's per-parameter ``_hp_mapping`` is not used: at ZeRO-1/2 without alignment padding it places the
parameters in ``bit16_groups`` order, which ``round_robin_gradients`` breaks (the flat buffer follows the
round-robin order), so there DeepSpeed's own ``safe_get_full_fp32_param`` reads the wrong ranges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from mgup_dist.optim.param_groups import logical_shape
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.segment import Segment

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorPiece:
    """Logical tensor number ``position`` of its flat partition: its `Segment` on this rank and the offset of
    the segment's first element in the flat tensor."""

    position: int
    segment: Segment
    offset: int


@dataclass(frozen=True)
class FlatPartition:
    """A flat 1-D master tensor DeepSpeed steps, with one `TensorPiece` per logical tensor of its group (every
    rank lists the same tensors in the same order) and, when known, the model parameters those tensors are
    (``params[i]`` is piece ``i``'s; under ZeRO-3 the partitioned parameters), for naming them in checkpoints.
    ``group``: the index of the client optimizer's param group the partition belongs to when DeepSpeed puts it
    in ``param_groups`` only while stepping it (ZeRO-3), else None (it is always there)."""

    flat: torch.Tensor
    pieces: tuple[TensorPiece, ...]
    params: tuple[torch.Tensor, ...] = ()
    group: int | None = None

    def __post_init__(self) -> None:
        if self.params and len(self.params) != len(self.pieces):
            raise ValueError(f"{len(self.params)} parameters for {len(self.pieces)} pieces of a flat partition")
        end = 0
        for piece in sorted(self.pieces, key=lambda p: p.offset):
            if piece.offset < end and piece.segment.length:
                raise ValueError(f"tensor {piece.segment.index} overlaps another one in its flat partition")
            end = max(end, piece.offset + piece.segment.length)
        if end > self.flat.numel():
            raise ValueError(f"the pieces reach element {end} of a flat partition of {self.flat.numel()} elements")


def flat_cut_pieces(
    shapes: Sequence[Shape], offsets: Sequence[int], start: int, size: int, first_index: int
) -> list[TensorPiece]:
    """Pieces of tensors placed at ``offsets`` in a flat buffer of which this rank holds ``[start, start+size)``.
    Segment indices count from ``first_index``."""
    pieces = []
    for position, (shape, offset) in enumerate(zip(shapes, offsets)):
        numel = math.prod(shape)
        lo = min(max(start - offset, 0), numel)
        hi = min(max(start + size - offset, 0), numel)
        local = offset + lo - start if hi > lo else 0
        pieces.append(TensorPiece(position, Segment(first_index + position, shape, lo, max(lo, hi)), local))
    return pieces


def even_split_pieces(shapes: Sequence[Shape], parts: Sequence[int], rank: int, first_index: int) -> list[TensorPiece]:
    """Pieces of tensors each split into parts of ``parts[i]`` elements (rank ``r`` holds
    ``[r·c, (r+1)·c)`` clipped to the tensor), stored back to back, each padded to its part size."""
    pieces, offset = [], 0
    for position, (shape, part) in enumerate(zip(shapes, parts)):
        numel = math.prod(shape)
        lo = min(rank * part, numel)
        hi = min(lo + part, numel)
        pieces.append(TensorPiece(position, Segment(first_index + position, shape, lo, hi), offset))
        offset += part
    return pieces


def _offsets(shapes: Sequence[Shape]) -> list[int]:
    out, total = [], 0
    for shape in shapes:
        out.append(total)
        total += math.prod(shape)
    return out


def zero12_partitions(zero: Any) -> list[FlatPartition]:
    """Flat partitions of a ZeRO-1/2 ``DeepSpeedZeroOptimizer``."""
    partitions, index = [], 0
    for g, params in enumerate(zero.bit16_groups):
        order, offsets = zero.round_robin_bit16_groups[g], zero.round_robin_bit16_offsets[g]
        placed = {id(p): offset for p, offset in zip(order, offsets)}
        size = int(zero.partition_size[g])
        rank = dist.get_rank(group=zero.real_dp_process_group[g])
        shapes = [logical_shape(p) for p in params]
        pieces = flat_cut_pieces(shapes, [placed[id(p)] for p in params], rank * size, size, index)
        partitions.append(FlatPartition(zero.single_partition_of_fp32_groups[g], tuple(pieces), tuple(params)))
        index += len(params)
    return partitions


def bf16_partitions(bf16: Any) -> list[FlatPartition]:
    """Flat partitions of a ``BF16_Optimizer`` (bf16 model, fp32 gradient accumulation, ZeRO-1)."""
    partitions, index = [], 0
    for g, params in enumerate(bf16.bf16_groups):
        group = bf16.real_dp_process_group[g]
        size = bf16.bf16_groups_flat[g].numel() // dist.get_world_size(group=group)
        shapes = [logical_shape(p) for p in params]
        pieces = flat_cut_pieces(shapes, _offsets(shapes), dist.get_rank(group=group) * size, size, index)
        partitions.append(FlatPartition(bf16.fp32_groups_flat_partition[g], tuple(pieces), tuple(params)))
        index += len(params)
    return partitions


def zero3_partitions(zero: Any) -> list[FlatPartition]:
    """Flat partitions (one per sub-group, with its param group) of a ``DeepSpeedZeroOptimizer_Stage3``."""
    partitions, index = [], 0
    for i, params in enumerate(zero.fp16_groups):
        rank = dist.get_rank(group=zero.sub_group_process_groups[i])
        shapes = [logical_shape(p) for p in params]
        pieces = even_split_pieces(shapes, [p.partition_numel() for p in params], rank, index)
        group = int(zero.sub_group_to_group_id[i])
        partitions.append(FlatPartition(zero.fp32_partitioned_groups_flat[i], tuple(pieces), tuple(params), group))
        index += len(params)
    return partitions


def check_cover(partitions: Sequence[FlatPartition], comm: Collectives) -> ShardLayout:
    """The global layout of all ranks' pieces; raises `ValueError` (on every rank) unless the ranks' segments
    of every tensor cover it exactly once. Collective over ``comm``."""
    pieces = [piece for partition in partitions for piece in partition.pieces]
    mine = torch.tensor([[p.segment.lo, p.segment.hi] for p in pieces], dtype=torch.int64).reshape(-1)
    table = comm.all_gather_scalars(mine).view(comm.world_size, len(pieces), 2)
    shapes = [p.segment.shape for p in pieces]
    try:
        return ShardLayout(shapes, table.tolist())
    except ValueError as error:
        raise ValueError(f"DeepSpeed's partitioning does not cover the parameters exactly: {error}") from None
