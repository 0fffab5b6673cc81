"""`ZeroEngine`: our ZeRO for plain PyTorch models under DDP-style data parallelism.

Every rank holds the full model and computes gradients on its own micro-batch (as with DDP, but without
wrapping the model). `ZeroEngine.step` then

1. packs the gradients into one fp32 buffer made of ``world_size`` equal *rank regions* (rank ``r``'s region is
   the concatenation of its segments in tensor order, zero-padded to the largest region);
2. stage 1: all-reduces the buffer; stage 2: reduce-scatters it, so each rank receives only its region;
   either way the sum is divided by ``world_size`` (gradient averaging, as DDP does);
3. steps the optimizer on this rank's segments only (fp32 master copies; optimizer state is sharded
   with them, ``1/world_size`` of the total), through a `ShardedDistributor`;
4. all-gathers the updated segments, cast to the model's dtype, back into every rank's model.

Layouts: ``"flat"`` cuts the concatenation of all tensors into equal parts (a tensor may straddle ranks; MGUP
masks and Newton–Schulz then use the exact collective operations); ``"layerwise"`` gives each tensor wholly
to one rank, owners balanced by Newton–Schulz cost, so every tensor-wide operation is local and the Muon
family needs no communication beyond the gradient reduction and the parameter gather.

The engine contains no update math: the optimizer's rules do all of it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import torch.distributed.checkpoint as dcp

from mgup_dist.checkpoint import flat_entry, local_part
from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.distributor import LocalShard, ShardedDistributor, local_piece
from mgup_dist.shard.layout import ShardLayout, balanced_whole_tensor_layout, flat_layout
from mgup_dist.shard.ops import ShardedOps
from mgup_dist.shard.orthogonalize import DistributedOrthogonalizer

LAYOUTS = ("flat", "layerwise")
MASTER_PREFIX = "zero.master."
STAGES = (1, 2)


def build_layout(shapes: Sequence[tuple[int, ...]], world_size: int, layout: str) -> ShardLayout:
    """The `ShardLayout` named ``layout`` (``"flat"`` or ``"layerwise"``) for ``shapes``."""
    if layout == "flat":
        return flat_layout(shapes, world_size)
    if layout == "layerwise":
        return balanced_whole_tensor_layout(shapes, world_size)
    raise ValueError(f"unknown ZeRO layout {layout!r}; valid: {LAYOUTS}")


class RankRegions:
    """Packs full tensors into a buffer of ``world_size`` equal regions (rank ``r``'s segments, in tensor
    order, at ``r * region``), and unpacks such a buffer back. Pure bookkeeping over a `ShardLayout`."""

    def __init__(self, layout: ShardLayout) -> None:
        self.layout = layout
        self.region = max(layout.local_numel(rank) for rank in range(layout.world_size))

    @property
    def size(self) -> int:
        return self.region * self.layout.world_size

    def _pieces(self, rank: int) -> list[tuple[int, int, int, int]]:
        """``(tensor, lo, hi, buffer offset)`` for each non-empty segment of ``rank``."""
        out, offset = [], rank * self.region
        for index, (lo, hi) in enumerate(self.layout.bounds[rank]):
            if hi > lo:
                out.append((index, lo, hi, offset))
                offset += hi - lo
        return out

    def pack(self, tensors: Sequence[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        """A zero-initialised buffer holding every rank's segments of ``tensors`` (``None`` counts as zeros)."""
        device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
        buffer = torch.zeros(self.size, dtype=dtype, device=device)
        for rank in range(self.layout.world_size):
            for index, lo, hi, offset in self._pieces(rank):
                if tensors[index] is not None:
                    buffer[offset : offset + hi - lo].copy_(tensors[index].reshape(-1)[lo:hi])
        return buffer

    def unpack_into(self, buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copies every rank's segments from ``buffer`` into the full ``tensors`` (cast to their dtype)."""
        for rank in range(self.layout.world_size):
            for index, lo, hi, offset in self._pieces(rank):
                tensors[index].view(-1)[lo:hi].copy_(buffer[offset : offset + hi - lo])

    def split_local(self, region: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """Views of ``rank``'s own region (``self.region`` elements) as its per-tensor 1-D segments."""
        views, offset = [], 0
        for lo, hi in self.layout.bounds[rank]:
            views.append(region[offset : offset + hi - lo])
            offset += hi - lo
        return views


class ZeroEngine:
    """ZeRO stage 1 or 2 around ``model`` and an mgup_dist ``optimizer`` built over ``model``'s parameters.

    All ranks of ``group`` (default: the world) must build the same model and optimizer (same parameter
    order) and call `step` together after each backward. ``master_dtype`` is the dtype of the sharded master
    weights and of gradient reduction (float32 by default; the model itself may be bf16).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: RuleOptimizer,
        *,
        stage: int = 2,
        layout: str = "flat",
        group: torch.distributed.ProcessGroup | None = None,
        master_dtype: torch.dtype = torch.float32,
        gather_max_numel: int | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ZeRO layout {layout!r}; valid: {LAYOUTS}")
        if not isinstance(optimizer, RuleOptimizer):
            raise TypeError(f"ZeroEngine needs an mgup_dist optimizer, got {type(optimizer).__name__}")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._check_params(model)
        self.model, self.optimizer, self.stage = model, optimizer, stage
        self.comm = Collectives(group)
        self.layout = build_layout([tuple(p.shape) for p in self.params], self.comm.world_size, layout)
        self.regions = RankRegions(self.layout)
        self.segments = self.layout.segments(self.comm.rank)
        self.master = [local_piece(p, s).to(master_dtype) for p, s in zip(self.params, self.segments)]
        self.master_dtype = master_dtype
        self._grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._reduced = False
        ops = ShardedOps(
            self.comm, DistributedOrthogonalizer(self.comm, gather_max_numel, layout=self.layout), self.layout
        )
        optimizer.distributor = ShardedDistributor(ops, self._shards)

    def _check_params(self, model: nn.Module) -> None:
        model_params = {id(p) for p in model.parameters()}
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears twice in the optimizer's param groups")
        for p in self.params:
            if id(p) not in model_params:
                raise ValueError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model")
        if len({p.dtype for p in self.params}) > 1:
            raise ValueError(f"ZeroEngine needs one parameter dtype, got {sorted({str(p.dtype) for p in self.params})}")

    def _shards(self) -> list[LocalShard]:
        return [
            LocalShard(p, s, master, grad)
            for p, s, master, grad in zip(self.params, self.segments, self.master, self._grads)
        ]

    def reduce_gradients(self) -> None:
        """Averages the model's gradients over ranks into this rank's segments (once per step; `step` calls it
        if the caller did not). A tensor with no gradient on any rank is skipped by the optimizer on every
        rank. Collective."""
        if self._reduced:
            return
        grads = [p.grad for p in self.params]
        present = torch.tensor([g is not None for g in grads], dtype=torch.int32)
        self.comm.all_reduce(present, op=torch.distributed.ReduceOp.MAX)
        buffer = self.regions.pack(grads, self.master_dtype)
        if self.stage == 1:
            region = self.comm.all_reduce(buffer).narrow(0, self.comm.rank * self.regions.region, self.regions.region)
        else:
            region = self.comm.reduce_scatter(buffer)
        region.div_(self.comm.world_size)
        local = self.regions.split_local(region, self.comm.rank)
        self._grads = [view if flag else None for view, flag in zip(local, present.tolist())]
        self._reduced = True

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the averaged gradient (reducing it first if needed); when ``max_norm > 0`` and the
        norm exceeds it, scales every segment by ``max_norm / (norm + 1e-6)`` as `torch.nn.utils.clip_grad_norm_`
        does. Returns the norm before clipping, identical on every rank. Collective."""
        self.reduce_gradients()
        squares = torch.zeros((), dtype=torch.float64)
        for grad in self._grads:
            if grad is not None:
                squares += torch.sum(grad * grad, dtype=torch.float64)
        norm = float(self.comm.all_reduce(squares)) ** 0.5
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for grad in self._grads:
                if grad is not None:
                    grad.mul_(scale)
        return norm

    def _gather_parameters(self) -> None:
        """All-gathers every rank's updated master segments into the model parameters (in their dtype)."""
        dtype = self.params[0].dtype
        region = torch.zeros(self.regions.region, dtype=dtype, device=self.params[0].device)
        offset = 0
        for piece in self.master:
            region[offset : offset + piece.numel()].copy_(piece)
            offset += piece.numel()
        with torch.no_grad():
            self.regions.unpack_into(self.comm.all_gather_equal(region), [p.data for p in self.params])

    def step(self) -> None:
        """Reduce gradients (unless `reduce_gradients` already did), step this rank's segments, gather the
        parameters. Collective over the group."""
        self.reduce_gradients()
        self.optimizer.step()
        self._gather_parameters()
        self._grads = [None] * len(self.params)
        self._reduced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the model's gradients (as `torch.optim.Optimizer.zero_grad`)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def reload_master(self) -> None:
        """Re-reads the master segments from the model's parameters (after loading model weights)."""
        self.master = [local_piece(p, s).to(self.master_dtype) for p, s in zip(self.params, self.segments)]

    def master_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """DCP entries ``zero.master.<fqn>`` of the sharded master weights (needed to resume exactly when the
        model is lower precision than the master). Collective."""
        names = {id(p): name for name, p in model.named_parameters()}
        return {
            f"{MASTER_PREFIX}{names[id(p)]}": flat_entry(master, segment, sharded=True)
            for p, segment, master in zip(self.params, self.segments, self.master)
        }

    def load_master_state_dict(self, model: nn.Module, checkpoint_id: str) -> None:
        """Loads this rank's master segments from a checkpoint holding ``zero.master.*`` (any world size), or
        re-reads them from the (already loaded) model when the checkpoint has none. Collective."""
        metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
        target = self.master_state_dict(model)
        if not all(key in metadata for key in target):
            self.reload_master()
            return
        dcp.load(target, checkpoint_id=checkpoint_id)
        self.master = [local_part(value).clone() for value in target.values()]

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (sharded: about total / world_size)."""
        return sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
