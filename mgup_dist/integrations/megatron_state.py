"""`MegatronShardDistributor`: steps our rules on the 1-D parameter shards of Megatron's ``DistributedOptimizer``.

Megatron-core's distributed optimizer cuts each DDP gradient buffer into one contiguous range per data-parallel
rank, without respecting parameter boundaries, and hands the inner optimizer one 1-D fp32 *main shard* per
parameter that overlaps this rank's range (``param_groups[g]["params"]``; a view of the parameter itself for fp32
parameters, an fp32 copy for 16-bit ones). Its bookkeeping says which range of the parameter's row-major
flattening each shard is (``param_range_map[param]["param"]``), which is exactly a `Segment` of the parameter.

Under tensor parallelism the *logical* tensor is the whole matrix, the concatenation of the tensor-parallel
ranks' parameters along ``partition_dim`` (`tensor_parallel_piece`). A piece of a column-parallel parameter
(``partition_dim`` 0) is a contiguous row block, so its segment is the same range shifted by the block's offset;
a piece of a row-parallel one (``partition_dim`` 1) is a column block, a `Segment` with ``block``. Those tensors
are sharded over the tensor-and-data-parallel group; parameters every tensor-parallel rank holds whole (norms,
row-parallel biases) are sharded over the data-parallel group only, each tensor-parallel rank stepping its own
identical replica (the same gradient, state and arithmetic, as Megatron's Adam does), so no copy needs
broadcasting. Under pipeline parallelism a stage sees only its own parameters and its own groups.

Every rank steps every logical tensor, in the order our optimizer was built with (identical on all ranks of the
data-parallel group), with empty pieces for tensors it holds none of, so all ranks make the same collective
calls. Optimizer state of a held piece is ``optimizer.state[main_shard]`` (where Megatron looks for it); a
tensor this rank holds nothing of keeps its per-tensor scalars in the distributor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from mgup_dist.ops.base import TensorOps
from mgup_dist.optim.nonfinite import any_rank
from mgup_dist.optim.param_groups import logical_shape
from mgup_dist.optim.state_entries import StateEntry
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.segment import Segment


@dataclass(frozen=True)
class ShardEntry:
    """One logical tensor as this rank sees it: the model parameter, the index of its group in the inner
    optimizer's ``param_groups``, this rank's `Segment` and its main shard (``None`` when the segment is empty)."""

    model_param: torch.Tensor
    group_index: int
    segment: Segment
    main: torch.Tensor | None
    tensor_parallel: bool = False  # split over the tensor-parallel ranks (else held whole by each)


def tensor_parallel_piece(
    param: torch.Tensor, tp_rank: int, tp_size: int
) -> tuple[tuple[int, ...], int, tuple[int, int] | None] | None:
    """``(logical shape, flat offset, column block)`` of this tensor-parallel rank's piece of ``param`` in the
    logical tensor, or ``None`` when ``param`` is not split (``tensor_model_parallel`` unset, or one rank).
    `NotImplementedError` for strided splits and splits of a dimension other than 0 or 1."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return None
    shape, dim = tuple(param.shape), getattr(param, "partition_dim", -1)
    if getattr(param, "partition_stride", 1) != 1 or dim not in (0, 1) or (dim == 1 and len(shape) < 2):
        raise NotImplementedError(
            f"tensor-parallel parameter of shape {shape} split on dim {dim} with stride "
            f"{getattr(param, 'partition_stride', 1)}: only stride-1 splits of dim 0 or dim 1 are supported"
        )
    logical = shape[:dim] + (shape[dim] * tp_size,) + shape[dim + 1 :]
    if dim == 0:
        return logical, tp_rank * param.numel(), None
    width = param.numel() // shape[0]
    return logical, 0, (tp_rank * width, (tp_rank + 1) * width)


def main_shards(wrapper: Any) -> dict[int, torch.Tensor]:
    """``id(model parameter) -> main shard`` for every parameter of which ``wrapper`` (a Megatron
    ``DistributedOptimizer``) gives this rank a piece."""
    pairs = (
        (wrapper.model_fp32_groups, wrapper.shard_fp32_groups),
        (wrapper.model_float16_groups, wrapper.shard_fp32_from_float16_groups),
    )
    shards: dict[int, torch.Tensor] = {}
    for model_groups, shard_groups in pairs:
        for model_group, shard_group in zip(model_groups, shard_groups):
            shards.update((id(p), s) for p, s in zip(model_group, shard_group))
    return shards


def shard_entries(
    wrapper: Any, groups: Sequence[Sequence[torch.Tensor]], tp_rank: int = 0, tp_size: int = 1
) -> list[ShardEntry]:
    """The entries of every parameter of ``groups`` (the model parameters of each inner-optimizer group, in the
    order the inner optimizer was built with), numbered in that order; segments of the logical tensors of
    this tensor-parallel rank's pieces (`tensor_parallel_piece`)."""
    shards = main_shards(wrapper)
    entries = []
    for group_index, params in enumerate(groups):
        for param in params:
            piece = tensor_parallel_piece(param, tp_rank, tp_size)
            shape, offset, block = piece or (logical_shape(param), 0, None)
            main = shards.get(id(param))
            if main is None:
                segment = Segment(len(entries), shape, 0, 0, block)
            else:
                bounds = wrapper._get_model_param_range_map(param)["param"]
                segment = Segment(len(entries), shape, offset + bounds.start, offset + bounds.end, block)
                if main.numel() != segment.length:
                    raise RuntimeError(
                        f"Megatron's main shard of a parameter of shape {shape} has {main.numel()} elements but "
                        f"its range [{segment.lo}, {segment.hi}) has {segment.length}"
                    )
            entries.append(ShardEntry(param, group_index, segment, main, piece is not None))
    return entries


def check_cover(entries: Sequence[ShardEntry], comm: Collectives) -> ShardLayout:
    """The global layout of ``entries`` (position ``i`` of the layout: ``entries[i]``) over the ranks of
    ``comm``, the group sharding them; `ValueError` on every rank unless every tensor is covered exactly
    once. Collective over ``comm``."""
    mine = torch.tensor(
        [[e.segment.lo, e.segment.hi, *(e.segment.block or (0, 0))] for e in entries], dtype=torch.int64
    ).reshape(-1)
    table = comm.all_gather_scalars(mine).view(comm.world_size, len(entries), 4).tolist()
    bounds = [[(lo, hi) for lo, hi, _, _ in ranks] for ranks in table]
    blocks = [[(c0, c1) if c1 else None for _, _, c0, c1 in ranks] for ranks in table]
    try:
        return ShardLayout([e.segment.shape for e in entries], bounds, blocks)
    except ValueError as error:
        raise ValueError(f"Megatron's distributed-optimizer ranges miss or overlap elements: {error}") from None


class MegatronShardDistributor:
    """Distributor (`mgup_dist.optim.distributor.Distributor`) over Megatron's main shards.

    ``entries``: every logical tensor in step order (`shard_entries`); ``ops`` resolves the rules' requests over
    the groups sharding them (`ShardedOps`, or `RoutedOps` under tensor parallelism); ``layouts``: every
    group's layout of its tensors (`check_cover`); ``flag_comm``: the group the non-finite flag is ORed over
    (all ranks of the distributed-optimizer instance, pipeline stages included; ``None``: this process only).
    """

    sharded = True

    def __init__(
        self,
        ops: TensorOps,
        entries: Sequence[ShardEntry],
        layouts: Sequence[ShardLayout],
        flag_comm: Collectives | None = None,
        checkpoint_refusal: str | None = None,
    ) -> None:
        self.ops = ops
        self.checkpoint_refusal = checkpoint_refusal
        self.entries = list(entries)
        self.layouts = list(layouts)
        self.flag_comm = flag_comm
        self._empty_states: dict[int, dict[str, Any]] = {e.segment.index: {} for e in entries if e.main is None}

    def state_entries(self, optimizer: torch.optim.Optimizer) -> list[StateEntry]:
        """Every logical tensor, named by its model parameter: the state of the main shard this rank holds
        (``optimizer.state[main]``) or the per-tensor scalars of one it holds nothing of, with its `Segment`.
        Data parallelism only: `NotImplementedError` under tensor or pipeline parallelism (``checkpoint_refusal``),
        where model FQNs name per-rank pieces or repeat across stages."""
        if self.checkpoint_refusal is not None:
            raise NotImplementedError(self.checkpoint_refusal)
        return [
            StateEntry(e.model_param, e.group_index, self._state(optimizer, e), e.segment) for e in self.entries
        ]

    def _state(self, optimizer: torch.optim.Optimizer, entry: ShardEntry) -> dict[str, Any]:
        return self._empty_states[entry.segment.index] if entry.main is None else optimizer.state[entry.main]

    def any_rank(self, flag: torch.Tensor) -> bool:
        """``flag`` ORed over ``flag_comm`` (one all-reduce)."""
        return any_rank(self.flag_comm, flag)

    def _local(self, optimizer: torch.optim.Optimizer, entry: ShardEntry) -> tuple[Any, torch.Tensor, torch.Tensor]:
        main = entry.main
        if main is None:
            empty = torch.empty(0, dtype=torch.float32, device=entry.model_param.device)
            return self._state(optimizer, entry), empty, empty
        if main.grad is None:
            raise RuntimeError(
                f"Megatron gave no gradient to the main shard of tensor {entry.segment.index} (shape "
                f"{entry.segment.shape}); every rank must step every tensor"
            )
        return self._state(optimizer, entry), main.detach(), main.grad

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        for entry in self.entries:
            state, param, grad = self._local(optimizer, entry)
            yield optimizer.param_groups[entry.group_index], Slot(
                param=param,
                grad=grad,
                state=state,
                segment=entry.segment,
                allocate=lambda dtype, n=entry.segment.length, d=param.device: torch.zeros(n, dtype=dtype, device=d),
            )
