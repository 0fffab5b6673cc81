"""FSDP2 integration: mgup_dist optimizers over DTensor parameters (``torch.distributed.fsdp.fully_shard``).

Users write ``fully_shard(...)`` and then ``mgup_dist.MGUPAdamW(model.parameters())`` (or
``MGUPMuon(muon_param_groups(model))``); nothing else. An optimizer that receives DTensor parameters switches
from the single-process distributor to `FSDPDistributor` at construction (`adopt_dtensors`, called by
`RuleOptimizer.add_param_group` through `mgup_dist.optim.distributor.distributor_for`).

Layout. A parameter placed ``Shard(0)`` on one mesh dimension (``(Shard(0),)`` on a 1-D mesh; HSDP's
``(Replicate(), Shard(0))`` on a 2-D mesh) is cut into whole rows with ``torch.chunk`` semantics: with ``R``
rows over ``W`` shard ranks, coordinate ``c`` holds rows ``[c·⌈R/W⌉, (c+1)·⌈R/W⌉)`` clipped to ``R`` (empty for
trailing ranks). FSDP2 pads its internal buffers, but ``to_local()`` returns exactly these unpadded rows, which
in row-major order are the flat range ``[lo, hi)`` of a `Segment` of the logical (global) shape. Rules step
``p.to_local().view(-1)`` with ``p.grad.to_local().view(-1)``; tensor-wide operations run over the shard
dimension's process group (``mesh.get_group(dim)``) through `ShardedOps`. The replicate dimension needs no
collective: FSDP2 already all-reduced (averaged) the gradients over it, so every replica steps the same rows
with the same gradient and stays identical.

Parameters that every rank holds whole (plain tensors, or DTensors placed only ``Replicate()``) are stepped
locally, as in a single process, and their requests resolve without communication. FSDP2 does not reduce the
gradients of plain tensors: keeping those in sync is the caller's business.

Anything else (``Shard(d)`` with ``d > 0``, ``Partial``, strided shards, two sharded mesh dimensions, meshes of
more than two dimensions, sharded parameters on different process groups, a gradient placed differently from
its parameter) raises a ValueError; there is no silent fallback.

State. Per-element state tensors are DTensors with the parameter's mesh, placements, shape and stride
(`DTensorState`), so ``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict`` and
``dcp.save`` / ``dcp.load`` reshard them to any world size or mesh; ``step`` and ``alpha_bar`` stay scalars.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from mgup_dist.integrations.dtensor_state import DTensorState
from mgup_dist.ops.local import LocalOps
from mgup_dist.optim.distributor import LocalDistributor
from mgup_dist.optim.nonfinite import any_rank
from mgup_dist.rules.requests import Orthogonalize, PackedMask, TensorSum, TopKMask
from mgup_dist.optim.state_entries import StateEntry, param_state_entries
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.ops import ShardedOps
from mgup_dist.shard.orthogonalize import DistributedOrthogonalizer
from mgup_dist.shard.segment import Segment

MAX_MESH_DIMS = 2
SUPPORTED = (
    "(Shard(0),) on a 1-D mesh, Shard(0) on one dimension of a 2-D mesh with Replicate() on the other "
    "(HSDP), or Replicate() only"
)

AnyRequest = TypeVar("AnyRequest", TensorSum, TopKMask, Orthogonalize)


def _describe(param: torch.Tensor) -> str:
    return f"parameter of shape {tuple(param.shape)}"


def shard_mesh_dim(param: DTensor) -> int | None:
    """The mesh dimension along which ``param`` is ``Shard(0)``, or None when it is only replicated.

    Raises ValueError for any placement layout outside `SUPPORTED`.
    """
    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim > MAX_MESH_DIMS:
        raise ValueError(
            f"{_describe(param)} lives on a {mesh.ndim}-D device mesh {tuple(mesh.shape)}; mgup_dist supports "
            f"{SUPPORTED}"
        )
    sharded = []
    for dim, placement in enumerate(placements):
        if type(placement) is Shard and placement.dim == 0:
            sharded.append(dim)
        elif type(placement) is not Replicate:
            raise ValueError(
                f"{_describe(param)} has placements {placements}: {placement} is not supported; mgup_dist "
                f"supports {SUPPORTED}"
            )
    if len(sharded) > 1:
        raise ValueError(
            f"{_describe(param)} is Shard(0) on {len(sharded)} mesh dimensions {placements}; mgup_dist supports "
            f"{SUPPORTED}"
        )
    if sharded and param.dim() == 0:
        raise ValueError(f"a 0-d parameter cannot be Shard(0) {placements}")
    return sharded[0] if sharded else None


def chunk_rows(rows: int, shards: int, coordinate: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` that shard ``coordinate`` of ``shards`` holds under ``torch.chunk`` on dim 0."""
    size = math.ceil(rows / shards) if rows else 0
    lo = min(coordinate * size, rows)
    return lo, min(lo + size, rows)


def dtensor_segment(index: int, param: DTensor) -> Segment:
    """The `Segment` (logical shape ``param.shape``) of ``param``'s local rows on this rank; whole when
    ``param`` is only replicated. Checks that ``to_local()`` holds exactly those rows."""
    shape = tuple(param.shape)
    mesh_dim = shard_mesh_dim(param)
    if mesh_dim is None:
        segment = Segment.whole(index, shape)
        lo_row, hi_row = 0, shape[0] if shape else 1
    else:
        mesh = param.device_mesh
        lo_row, hi_row = chunk_rows(shape[0], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
        row = math.prod(shape[1:])
        segment = Segment(index, shape, lo_row * row, hi_row * row)
    expected = (hi_row - lo_row, *shape[1:]) if shape else ()
    local = param.to_local()
    if tuple(local.shape) != expected:
        raise ValueError(
            f"{_describe(param)} with placements {tuple(param.placements)}: the local tensor has shape "
            f"{tuple(local.shape)}, but torch.chunk semantics give rows [{lo_row}, {hi_row}), i.e. {expected}"
        )
    return segment


def _shard_group(param: DTensor) -> dist.ProcessGroup | None:
    mesh_dim = shard_mesh_dim(param)
    return None if mesh_dim is None else param.device_mesh.get_group(mesh_dim)


def _local_flat(tensor: torch.Tensor, what: str, param: torch.Tensor) -> torch.Tensor:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if not local.is_contiguous():
        raise ValueError(f"the local {what} of the {_describe(param)} is not contiguous")
    return local.view(-1)


class RoutedOps:
    """`TensorOps` of an `FSDPDistributor`: requests of tensors in ``replicated`` (held whole by every rank)
    resolve locally; the others collectively over the shard group (``sharded``). The split depends only on
    the tensor indices, which are identical on every rank, so every rank makes the same collective calls."""

    def __init__(self, replicated: set[int]) -> None:
        self.local = LocalOps()
        self.sharded: ShardedOps | None = None
        self.replicated = replicated

    def _route(self, method: str, requests: Sequence[AnyRequest]) -> list[torch.Tensor]:
        answers: list[torch.Tensor | None] = [None] * len(requests)
        local = [i for i, r in enumerate(requests) if r.segment.index in self.replicated]
        spread = [i for i, r in enumerate(requests) if r.segment.index not in self.replicated]
        for ops, picked in ((self.local, local), (self.sharded, spread)):
            if not picked:
                continue
            if ops is None:
                raise RuntimeError("a sharded DTensor parameter reached RoutedOps before its shard group was set")
            resolved = getattr(ops, method)([requests[i] for i in picked])
            for i, answer in zip(picked, resolved):
                answers[i] = answer
        return answers  # type: ignore[return-value]

    def tensor_sums(self, requests: Sequence[TensorSum]) -> list[torch.Tensor]:
        return self._route("tensor_sums", requests)

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor | PackedMask]:
        return self._route("topk_masks", requests)

    def orthogonalize(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        return self._route("orthogonalize", requests)

    def settle(self) -> None:
        self.local.settle()
        if self.sharded is not None:
            self.sharded.settle()


class FSDPDistributor:
    """Distributor for optimizers over FSDP2 DTensor parameters (and plain tensors mixed in).

    `admit` validates parameters as groups are added; every sharded parameter must use the same shard
    process group (the same ranks), which `ops` then runs on. ``gather_max_numel`` is passed to
    `DistributedOrthogonalizer` (matrices above it that no rank holds whole use the sharded Gram mode).
    """

    sharded = True

    def __init__(self, gather_max_numel: int | None = None) -> None:
        self.gather_max_numel = gather_max_numel
        self.group: dist.ProcessGroup | None = None
        self.group_ranks: list[int] | None = None
        self.replicated: set[int] = set()
        self.ops = RoutedOps(self.replicated)

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer, gather_max_numel: int | None = None) -> "FSDPDistributor":
        """A distributor admitting all of ``optimizer``'s parameters (e.g. to set ``gather_max_numel``)."""
        distributor = cls(gather_max_numel)
        distributor.admit(p for group in optimizer.param_groups for p in group["params"])
        return distributor

    def admit(self, params: Iterable[torch.Tensor]) -> None:
        """Validates ``params``' placements and records their shard group. Raises ValueError when a placement
        is unsupported or a sharded parameter uses another process group than those admitted before."""
        for param in params:
            if not isinstance(param, DTensor):
                continue
            dtensor_segment(0, param)
            group = _shard_group(param)
            if group is None:
                continue
            ranks = dist.get_process_group_ranks(group)
            if self.group_ranks is None:
                self._set_group(group, ranks)
            elif ranks != self.group_ranks:
                raise ValueError(
                    f"{_describe(param)} is sharded over ranks {ranks}, but other parameters of this optimizer "
                    f"over ranks {self.group_ranks}; one optimizer needs one shard group"
                )

    def _set_group(self, group: dist.ProcessGroup, ranks: list[int]) -> None:
        self.group, self.group_ranks = group, ranks
        comm = Collectives(group)
        self.ops.sharded = ShardedOps(comm, DistributedOrthogonalizer(comm, self.gather_max_numel))

    def _segments(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], torch.Tensor, Segment]]:
        """``(group, param, segment)`` for every parameter, in order; refreshes ``replicated``."""
        self.replicated.clear()
        index = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                if isinstance(param, DTensor):
                    segment = dtensor_segment(index, param)
                    if shard_mesh_dim(param) is None:
                        self.replicated.add(index)
                else:
                    segment = Segment.whole(index, tuple(param.shape))
                    self.replicated.add(index)
                yield group, param, segment
                index += 1

    def state_entries(self, optimizer: torch.optim.Optimizer) -> list[StateEntry]:
        """Each parameter with the `Segment` of the rows this rank holds (whole for replicated parameters)."""
        return param_state_entries(optimizer, {id(param): segment for _, param, segment in self._segments(optimizer)})

    def any_rank(self, flag: torch.Tensor) -> bool:
        """``flag`` ORed over the shard group (one all-reduce; local when no parameter is sharded). Replicas of
        the replicate dimension hold the same averaged gradients, so they need no vote of their own."""
        return any_rank(None if self.ops.sharded is None else self.ops.sharded.comm, flag)

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], Slot]]:
        for group, param, segment in self._segments(optimizer):
            grad = param.grad
            if grad is None:
                continue
            _check_grad(param, grad)
            local = param.to_local() if isinstance(param, DTensor) else param.data
            state = optimizer.state[param]
            yield group, Slot(
                param=_local_flat(local, "parameter", param),
                grad=_local_flat(grad, "gradient", param),
                state=DTensorState(state, param) if isinstance(param, DTensor) else state,
                segment=segment,
                allocate=_allocator(local),
            )


def _allocator(local: torch.Tensor) -> Callable[[torch.dtype], torch.Tensor]:
    return lambda dtype: torch.zeros(local.shape, dtype=dtype, device=local.device)


def _check_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if isinstance(param, DTensor) != isinstance(grad, DTensor):
        raise ValueError(
            f"the {_describe(param)} is {'a' if isinstance(param, DTensor) else 'not a'} DTensor but its gradient "
            f"is {'a' if isinstance(grad, DTensor) else 'not a'} DTensor"
        )
    if grad.is_sparse:
        raise RuntimeError("mgup_dist optimizers do not support sparse gradients")
    if isinstance(param, DTensor) and (
        grad.device_mesh != param.device_mesh or tuple(grad.placements) != tuple(param.placements)
    ):
        raise ValueError(
            f"the gradient of the {_describe(param)} has placements {tuple(grad.placements)}, the parameter "
            f"{tuple(param.placements)}; redistribute the gradient to the parameter's placements first"
        )


def adopt_dtensors(current: Any, params: Sequence[torch.Tensor]) -> Any:
    """The distributor an optimizer should use after adding ``params``, some of which are DTensors: an
    `FSDPDistributor` (created from a single-process distributor, or ``current`` when it already is one) that
    has admitted them. Raises ValueError when ``current`` is another engine's distributor."""
    if isinstance(current, LocalDistributor):
        current = FSDPDistributor()
    if not isinstance(current, FSDPDistributor):
        raise ValueError(
            f"DTensor (FSDP2) parameters cannot be added to an optimizer driven by {type(current).__name__}; "
            "FSDP2 and another sharding engine cannot both shard the same parameters"
        )
    current.admit(params)
    return current
