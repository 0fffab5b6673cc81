"""Reshardable checkpoints of a DeepSpeed ZeRO-1/2 run in `mgup_dist.checkpoint`'s format (save at N, load at M).

`state_dict` turns a DeepSpeed engine whose client optimizer is ours (attached by `mgup_dist.deepspeed.initialize`)
into the DCP entries every launcher backend writes:

- ``model.<key>``: the module's state dict (every ZeRO-1/2 rank holds the whole model; DCP writes it once);
- ``optim.state.<fqn>.<key>``: each per-element state tensor as the 1-D flattening of its parameter, this
  rank contributing the range of its flat partition (`FlatPartition` pieces; ranks holding nothing of a tensor
  contribute nothing), and per-tensor scalars (``step``, ...) as replicated values;
- ``optim.param_groups``: the groups' hyperparameters, parameters named by FQN;
- ``zero.master.<fqn>``: DeepSpeed's fp32 master weights, sharded the same way (as `mgup_dist.zero` writes them).

`load_state_dict` reads such a checkpoint, written by this module at any world size or by the ``single``, ``ddp``
and ``zero`` backends, into this run's partitions: every rank allocates its own ranges and DCP reads the
overlapping pieces. Without ``zero.master.*`` entries the master weights are taken from the loaded model.
Every rank calls both (collective). ZeRO-3 is not supported (its parameters are partitioned; a `TypeError`).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from mgup_dist.checkpoint import (
    GROUPS_KEY, SCALAR_STATE, STATE_PREFIX, CheckpointMismatchError, flat_entry, load_model_state_dict, local_part,
    model_state_dict,
)
from mgup_dist.integrations.deepspeed_layout import FlatPartition, TensorPiece
from mgup_dist.integrations.deepspeed_state import FlatPartitionDistributor, PieceState
from mgup_dist.zero import MASTER_PREFIX


@dataclass(frozen=True)
class _Tensor:
    """One logical tensor: its FQN, its partition and its piece there."""

    name: str
    partition: FlatPartition
    piece: TensorPiece

    def master(self) -> torch.Tensor:
        return self.partition.flat.detach().narrow(0, self.piece.offset, self.piece.segment.length)

    def state(self, optimizer: torch.optim.Optimizer) -> PieceState:
        return PieceState(optimizer.state[self.partition.flat], self.piece, self.partition.flat.numel())


def _distributor(optimizer: torch.optim.Optimizer) -> FlatPartitionDistributor:
    distributor = getattr(optimizer, "distributor", None)
    if not isinstance(distributor, FlatPartitionDistributor):
        raise TypeError(
            f"{type(optimizer).__name__} is not attached to a sharded DeepSpeed wrapper (ZeRO-1/2); initialize the "
            "engine with mgup_dist.deepspeed.initialize at ZeRO stage 1 or 2"
        )
    if any(hasattr(p, "ds_tensor") for part in distributor.partitions for p in part.params):
        raise TypeError("ZeRO-3 partitions the model's parameters: its checkpoints are not supported here")
    return distributor


def _tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> Iterator[_Tensor]:
    """Every logical tensor of ``optimizer``'s partitions, in the same order on every rank."""
    names = {id(p): name for name, p in model.named_parameters()}
    for partition in _distributor(optimizer).partitions:
        if len(partition.params) != len(partition.pieces):
            raise TypeError("the flat partitions do not name their parameters (built without params)")
        for param, piece in zip(partition.params, partition.pieces):
            if id(param) not in names:
                raise ValueError(f"a DeepSpeed parameter of shape {piece.segment.shape} is not one of the model's")
            yield _Tensor(names[id(param)], partition, piece)


def _groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict[str, Any]]:
    """The client optimizer's groups with their flat partition replaced by the FQNs of its parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    by_flat = {id(p.flat): p for p in _distributor(optimizer).partitions}
    groups = []
    for group in optimizer.param_groups:
        params = [names[id(p)] for flat in group["params"] for p in by_flat[id(flat)].params]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    return groups


def state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The DCP entries (see the module docstring) of a ZeRO-1/2 run: ``module`` is ``engine.module``,
    ``optimizer`` our client optimizer. Collective over DeepSpeed's data-parallel group."""
    out: dict[str, Any] = dict(model_state_dict(module))
    for tensor in _tensors(optimizer, module):
        segment = tensor.piece.segment
        for key, value in tensor.state(optimizer).items():
            full_key = f"{STATE_PREFIX}{tensor.name}.{key}"
            scalar = key in SCALAR_STATE or not torch.is_tensor(value)
            out[full_key] = value if scalar else flat_entry(value, segment, sharded=True)
        out[f"{MASTER_PREFIX}{tensor.name}"] = flat_entry(tensor.master(), segment, sharded=True)
    out[GROUPS_KEY] = pickle.dumps(_groups(optimizer, module))
    return out


def _target(key: str, meta: Any, tensor: _Tensor) -> Any:
    """An empty DCP load target for entry ``key`` of ``tensor`` (this rank's range of a per-element entry)."""
    if isinstance(meta, BytesStorageMetadata):
        return None
    assert isinstance(meta, TensorStorageMetadata)
    segment = tensor.piece.segment
    if key.rsplit(".", 1)[-1] in SCALAR_STATE and not key.startswith(MASTER_PREFIX):
        return torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
    if tuple(meta.size) != (segment.numel,):
        raise CheckpointMismatchError(
            f"checkpoint entry {key} has {tuple(meta.size)} elements, but the parameter has {segment.numel}"
        )
    return flat_entry(torch.zeros(segment.length, dtype=meta.properties.dtype), segment, sharded=True)


def _check_groups(saved: list[dict[str, Any]], ours: list[dict[str, Any]]) -> None:
    if [g["params"] for g in saved] != [g["params"] for g in ours]:
        raise CheckpointMismatchError(
            f"the checkpoint's param groups hold {[g['params'] for g in saved]}, this optimizer's hold "
            f"{[g['params'] for g in ours]}: a different model or grouping"
        )


def load_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str | os.PathLike) -> None:
    """Loads a checkpoint in `mgup_dist.checkpoint`'s format (any world size) into ``module`` (``engine.module``),
    DeepSpeed's master partitions and our client ``optimizer``'s state and groups' hyperparameters. Collective. Raises
    `CheckpointMismatchError` if the checkpoint belongs to another model or grouping (before any state changes
    other than the model's)."""
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    tensors = list(_tensors(optimizer, module))
    prefixes = tuple(f"{STATE_PREFIX}{t.name}." for t in tensors)
    stray = [k for k in metadata if k.startswith(STATE_PREFIX) and not k.startswith(prefixes)]
    if stray:
        raise CheckpointMismatchError(f"checkpoint has optimizer state for unknown parameters, e.g. {stray[0]}")
    target: dict[str, Any] = {GROUPS_KEY: None}
    owners: dict[str, tuple[_Tensor, str]] = {}
    for tensor, prefix in zip(tensors, prefixes):
        for key in sorted(k for k in metadata if k.startswith(prefix)):
            target[key] = _target(key, metadata[key], tensor)
            owners[key] = (tensor, key[len(prefix):])
        master = f"{MASTER_PREFIX}{tensor.name}"
        if master in metadata:
            target[master] = _target(master, metadata[master], tensor)
    load_model_state_dict(module, checkpoint_id, verify=False)
    dcp.load(target, checkpoint_id=checkpoint_id)
    saved_groups = pickle.loads(target.pop(GROUPS_KEY))
    _check_groups(saved_groups, _groups(optimizer, module))
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    params = dict(module.named_parameters())
    for tensor in tensors:
        master = target.get(f"{MASTER_PREFIX}{tensor.name}")
        tensor.master().copy_(local_part(master) if master is not None else _segment_of(params[tensor.name], tensor))
    for flat in {id(t.partition.flat): t.partition.flat for t in tensors}.values():
        optimizer.state[flat] = {}
    for key, (tensor, state_key) in owners.items():
        value = target[key]
        per_element = torch.is_tensor(value) and state_key not in SCALAR_STATE
        tensor.state(optimizer)[state_key] = local_part(value) if per_element else value


def _segment_of(param: torch.Tensor, tensor: _Tensor) -> torch.Tensor:
    segment = tensor.piece.segment
    return param.detach().reshape(-1)[segment.lo:segment.hi]
