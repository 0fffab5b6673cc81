"""`FlatPartitionDistributor`: steps our rules on the logical tensors inside DeepSpeed's flat master partitions.

During a DeepSpeed step our optimizer's ``param_groups`` hold flat fp32 partitions (ZeRO-1/2: one group per
``step()`` call; ZeRO-3: one sub-group at a time; `BF16_Optimizer`: all groups at once). For every flat tensor
in ``param_groups`` the distributor yields one `Slot` per logical tensor of its group (`FlatPartition`),
*including tensors of which this rank holds nothing*, in the same order on every rank, so all ranks make the
same collective calls.

State layout (`PieceState`). ``optimizer.state[flat]`` is DeepSpeed's layout: every per-element state tensor
(``exp_avg``, ``momentum_buffer``, MARS's ``last_grad``, ...) is one flat tensor of the partition's length, of
which each logical tensor uses its own range (a key only some tensors of a group use, as in a group mixing the
Muon and AdamW paths, still spans the whole partition). DeepSpeed's checkpointing (``engine.save_checkpoint``
/ ``load_checkpoint``) and ``safe_get_full_optimizer_state`` therefore work on it unchanged; our reshardable
checkpoints (`deepspeed_checkpoint`) read it through `FlatPartitionDistributor.state_entries`. Per-tensor
scalars (the ``step`` counter, AlphaAdam's ``alpha_bar``) are kept under
``optimizer.state[flat]["mgup_dist.tensors"][position]``; every rank steps every tensor of a group, so these
are identical on all ranks. A key shared by several tensors of one partition must have one dtype (all
master gradients are fp32, so rules ask for fp32 or float64 consistently).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, MutableMapping, Sequence

import torch

from mgup_dist.integrations.deepspeed_layout import FlatPartition, TensorPiece
from mgup_dist.ops.base import TensorOps
from mgup_dist.optim.nonfinite import any_rank
from mgup_dist.optim.state_entries import StateEntry
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.ops import ShardedOps

TENSORS_KEY = "mgup_dist.tensors"


class PieceState(MutableMapping[str, Any]):
    """One logical tensor's view of its flat partition's state dict ``flat_state`` (see the module docstring).

    Reading a per-element key returns the tensor's range ``[offset, offset + length)`` of the flat state tensor
    (in-place updates persist); writing a 1-D tensor of ``length`` elements copies it into that range, creating
    the flat tensor (zeros, ``numel`` elements, the value's dtype) on first use. Anything else is a per-tensor
    scalar.
    """

    def __init__(self, flat_state: MutableMapping[str, Any], piece: TensorPiece, numel: int) -> None:
        self._flat = flat_state
        self._position = piece.position
        self._offset = piece.offset
        self._length = piece.segment.length
        self._numel = numel

    def _scalars(self, create: bool = False) -> dict[str, Any]:
        if not create:
            return self._flat.get(TENSORS_KEY, {}).get(self._position, {})
        return self._flat.setdefault(TENSORS_KEY, {}).setdefault(self._position, {})

    def _is_elementwise(self, value: Any) -> bool:
        return torch.is_tensor(value) and value.dim() == 1 and value.numel() == self._numel

    def __getitem__(self, key: str) -> Any:
        scalars = self._scalars()
        if key in scalars:
            return scalars[key]
        value = self._flat.get(key)
        if self._is_elementwise(value):
            return value.narrow(0, self._offset, self._length)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if not (torch.is_tensor(value) and value.dim() == 1):
            self._scalars(create=True)[key] = value
            return
        if value.numel() != self._length:
            raise ValueError(f"state {key!r} has {value.numel()} elements, the tensor's range has {self._length}")
        flat = self._flat.get(key)
        if flat is None:
            flat = self._flat[key] = torch.zeros(self._numel, dtype=value.dtype, device=value.device)
        if not self._is_elementwise(flat) or flat.dtype != value.dtype:
            raise TypeError(
                f"state {key!r} of this flat partition is {getattr(flat, 'dtype', type(flat))} with "
                f"{getattr(flat, 'shape', '?')}; a {value.dtype} range of {self._numel} elements was expected"
            )
        flat.narrow(0, self._offset, self._length).copy_(value)

    def __delitem__(self, key: str) -> None:
        """Deletes a scalar, or a per-element key's whole flat tensor (every tensor of the partition loses it)."""
        scalars = self._scalars(create=True)
        if key in scalars:
            del scalars[key]
        elif self._is_elementwise(self._flat.get(key)):
            del self._flat[key]
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        scalars = self._scalars()
        yield from scalars
        yield from (k for k, v in self._flat.items() if k not in scalars and self._is_elementwise(v))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class FlatPartitionDistributor:
    """Distributor (`mgup_dist.optim.distributor.Distributor`) over DeepSpeed's flat master partitions.

    ``partitions``: every flat tensor DeepSpeed may put in ``param_groups``, with its pieces; ``ops`` resolves
    the rules' requests over DeepSpeed's data-parallel group (`ShardedOps`); ``layout``: all ranks' segments
    (`ShardLayout`, tensors numbered as the segments' ``index``), for inspection; ``finite_check``: called by
    `known_finite` (None: never known).
    """

    sharded = True

    def __init__(
        self,
        ops: TensorOps,
        partitions: Sequence[FlatPartition],
        layout: ShardLayout,
        finite_check: Callable[[], bool] | None = None,
    ) -> None:
        self.ops = ops
        self.layout = layout
        self.partitions = tuple(partitions)
        self._partitions = {id(p.flat): p for p in partitions}
        self._finite_check = finite_check

    def known_finite(self) -> bool:
        """Whether DeepSpeed has already found every gradient of this step finite, on every rank alike (the
        non-finite guard then skips its own check; see `mgup_dist.optim.nonfinite`)."""
        return self._finite_check is not None and self._finite_check()

    def state_entries(self, optimizer: torch.optim.Optimizer) -> list[StateEntry]:
        """Every logical tensor of the flat partitions, named by its model parameter, with a `PieceState` view of
        its range of the partition's state. The group is the partition's ``group`` (ZeRO-3, whose groups are
        empty between steps), else the group holding the flat tensor. `TypeError` when the partitions do not
        name their parameters or are not the optimizer's."""
        groups = {id(flat): index for index, group in enumerate(optimizer.param_groups) for flat in group["params"]}
        entries = []
        for partition in self.partitions:
            group = partition.group if partition.group is not None else groups.get(id(partition.flat))
            if len(partition.params) != len(partition.pieces) or group is None:
                raise TypeError("the flat partitions do not name their parameters, or are not the optimizer's")
            state, numel = optimizer.state[partition.flat], partition.flat.numel()
            entries += [
                StateEntry(param, group, PieceState(state, piece, numel), piece.segment)
                for param, piece in zip(partition.params, partition.pieces)
            ]
        return entries

    def any_rank(self, flag: torch.Tensor) -> bool:
        """``flag`` ORed over DeepSpeed's data-parallel group (one all-reduce; local when ``ops`` is not a
        `ShardedOps`)."""
        return any_rank(self.ops.comm if isinstance(self.ops, ShardedOps) else None, flag)

    def _partition(self, flat: torch.Tensor) -> FlatPartition:
        partition = self._partitions.get(id(flat))
        if partition is None or partition.flat is not flat:
            raise RuntimeError(
                f"DeepSpeed handed the optimizer a tensor of shape {tuple(flat.shape)} that is not one of the flat "
                "partitions known at initialize; was the optimizer attached to another engine?"
            )
        if flat.grad is not None and flat.grad.shape != flat.shape:
            raise RuntimeError(
                f"flat partition of shape {tuple(flat.shape)} has a gradient of shape {tuple(flat.grad.shape)}"
            )
        return partition

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        for group in optimizer.param_groups:
            for flat in group["params"]:
                partition = self._partition(flat)
                if flat.grad is None:
                    continue
                master, grad, state = flat.detach(), flat.grad, optimizer.state[flat]
                for piece in partition.pieces:
                    start, length = piece.offset, piece.segment.length
                    yield group, Slot(
                        param=master.narrow(0, start, length),
                        grad=grad.narrow(0, start, length),
                        state=PieceState(state, piece, flat.numel()),
                        segment=piece.segment,
                        allocate=lambda dtype, n=length, d=flat.device: torch.zeros(n, dtype=dtype, device=d),
                    )
