"""Reshardable checkpoints of a DeepSpeed ZeRO-1/2/3 run in `mgup_dist.checkpoint`'s format (save at N, load at M).

`state_dict` turns a DeepSpeed engine whose client optimizer is ours (attached by `mgup_dist.deepspeed.initialize`)
into the DCP entries every launcher backend writes:

- ``model.<key>``: the module's state dict with whole tensors. At ZeRO-1/2 every rank holds the whole model;
  at ZeRO-3 each partitioned parameter is gathered in turn (``deepspeed.zero.GatheredParameters``) and copied to
  the CPU, so every rank holds the whole model in host memory while saving (DCP writes each entry once);
- ``optim.state.<fqn>.<key>``: each per-element state tensor as the 1-D flattening of its parameter, this
  rank contributing the range of its flat partition (`FlatPartition` pieces: at ZeRO-1/2 a range of the
  group's concatenation, at ZeRO-3 the rank's even part of the parameter; ranks holding nothing of a tensor
  contribute nothing), and per-tensor scalars (``step``, ...) as replicated values;
- ``optim.param_groups``: the groups' hyperparameters, parameters named by FQN;
- ``zero.master.<fqn>``: DeepSpeed's fp32 master weights, sharded the same way (as `mgup_dist.zero` writes them).

`load_state_dict` reads such a checkpoint, written by this module at any world size and ZeRO stage or by the
``single``, ``ddp`` and ``zero`` backends, into this run's partitions: every rank allocates its own ranges and
DCP reads the overlapping pieces. At ZeRO-3 every rank reads each whole parameter (on the CPU) and writes it
into the partitioned parameter with ``GatheredParameters(..., modifier_rank=0)``, which re-partitions it.
Without ``zero.master.*`` entries the master weights are taken from the loaded model (at ZeRO-3 from the
checkpoint's values, before any rounding to the model's dtype). Every rank calls both (collective).
The optimizer entries are `mgup_dist.checkpoint`'s own functions over the distributor's state entries
(`FlatPartitionDistributor.state_entries`); this module adds the model and the master weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mgup_dist.checkpoint import (
    MODEL_PREFIX, CheckpointMismatchError, check_model_entries, flat_entry, load_model_state_dict, load_optimizer_state_dict, local_part,
    model_state_dict, optimizer_state_dict,
)
from mgup_dist.integrations.deepspeed_layout import FlatPartition, TensorPiece
from mgup_dist.integrations.deepspeed_state import FlatPartitionDistributor
from mgup_dist.zero import MASTER_PREFIX


@dataclass(frozen=True)
class _Master:
    """One logical tensor's master weights: its FQN, its partition and its piece there."""

    name: str
    partition: FlatPartition
    piece: TensorPiece

    def local(self) -> torch.Tensor:
        return self.partition.flat.detach().narrow(0, self.piece.offset, self.piece.segment.length)


def _masters(optimizer: torch.optim.Optimizer, model: nn.Module) -> Iterator[_Master]:
    """Every logical tensor of ``optimizer``'s partitions, in the same order on every rank."""
    distributor = getattr(optimizer, "distributor", None)
    if not isinstance(distributor, FlatPartitionDistributor):
        raise TypeError(
            f"{type(optimizer).__name__} is not attached to a sharded DeepSpeed wrapper (ZeRO-1/2/3); initialize "
            "the engine with mgup_dist.deepspeed.initialize at ZeRO stage 1, 2 or 3"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    for partition in distributor.partitions:
        for param, piece in zip(partition.params, partition.pieces):
            yield _Master(names[id(param)], partition, piece)


def _partitioned(module: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict key -> parameter for every ZeRO-3-partitioned parameter of ``module`` (tied ones under each
    of their names); empty at ZeRO-1/2."""
    return {name: p for name, p in module.named_parameters(remove_duplicate=False) if hasattr(p, "ds_tensor")}


def _model_entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """The ``model.<key>`` entries, whole tensors (see the module docstring). Collective at ZeRO-3."""
    partitioned = _partitioned(module)
    if not partitioned:
        return model_state_dict(module)
    from deepspeed.runtime.zero import GatheredParameters

    state, whole = module.state_dict(), {}
    for name, param in partitioned.items():
        if id(param) not in whole:
            with GatheredParameters([param]):
                whole[id(param)] = param.detach().to("cpu", copy=True)
        state[name] = whole[id(param)]
    return {f"{MODEL_PREFIX}{key}": value for key, value in state.items()}


def state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The DCP entries (see the module docstring) of a ZeRO-1/2/3 run: ``module`` is ``engine.module``,
    ``optimizer`` our client optimizer. Collective over DeepSpeed's data-parallel group."""
    out: dict[str, Any] = {**_model_entries(module), **optimizer_state_dict(optimizer, module)}
    for master in _masters(optimizer, module):
        out[f"{MASTER_PREFIX}{master.name}"] = flat_entry(master.local(), master.piece.segment, sharded=True)
    return out


def _load_partitioned_model(
    module: nn.Module, checkpoint_id: str | os.PathLike, metadata: dict[str, Any], partitioned: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Loads the ``model.*`` entries into a ZeRO-3 ``module`` (strict, as `load_model_state_dict`); returns the
    loaded whole parameters by name, in the checkpoint's dtype. Collective."""
    from deepspeed.runtime.zero import GatheredParameters

    state = module.state_dict()
    shapes = {
        key: tuple(partitioned[key].ds_shape) if key in partitioned else tuple(v.shape) if torch.is_tensor(v) else None
        for key, v in state.items()
    }
    check_model_entries(metadata, {f"{MODEL_PREFIX}{key}": shape for key, shape in shapes.items()})
    target: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        meta = metadata[f"{MODEL_PREFIX}{key}"]
        whole = key in partitioned and isinstance(meta, TensorStorageMetadata)
        target[f"{MODEL_PREFIX}{key}"] = torch.zeros(partitioned[key].ds_shape, dtype=meta.properties.dtype) if whole else value
    dcp.load(target, checkpoint_id=checkpoint_id)
    written: set[int] = set()
    for key, param in partitioned.items():
        if id(param) not in written:
            written.add(id(param))
            with GatheredParameters([param], modifier_rank=0):
                param.data.copy_(target[f"{MODEL_PREFIX}{key}"])
    module.load_state_dict({k: v for k, v in state.items() if k not in partitioned}, strict=False)
    return {key: target[f"{MODEL_PREFIX}{key}"] for key in partitioned}


def _load_model(
    module: nn.Module, checkpoint_id: str | os.PathLike, metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Loads the ``model.*`` entries into ``module``; returns each parameter's whole loaded value by FQN."""
    partitioned = _partitioned(module)
    if partitioned:
        return _load_partitioned_model(module, checkpoint_id, metadata, partitioned)
    load_model_state_dict(module, checkpoint_id, verify=False)
    return {name: param.detach() for name, param in module.named_parameters()}


def _master_target(key: str, meta: Any, master: _Master) -> torch.Tensor:
    segment = master.piece.segment
    if not isinstance(meta, TensorStorageMetadata) or tuple(meta.size) != (segment.numel,):
        raise CheckpointMismatchError(
            f"checkpoint entry {key} is not a tensor of the parameter's {segment.numel} elements"
        )
    return flat_entry(torch.zeros(segment.length, dtype=meta.properties.dtype), segment, sharded=True)


def load_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str | os.PathLike) -> None:
    """Loads a checkpoint in `mgup_dist.checkpoint`'s format (any world size) into ``module`` (``engine.module``),
    DeepSpeed's master partitions and our client ``optimizer``'s state and groups' hyperparameters. Collective.
    Raises `CheckpointMismatchError` if the checkpoint belongs to another model or grouping (the manifest is the
    caller's to verify)."""
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    masters = list(_masters(optimizer, module))
    target = {
        f"{MASTER_PREFIX}{m.name}": _master_target(f"{MASTER_PREFIX}{m.name}", metadata[f"{MASTER_PREFIX}{m.name}"], m)
        for m in masters if f"{MASTER_PREFIX}{m.name}" in metadata
    }
    params = _load_model(module, checkpoint_id, metadata)
    load_optimizer_state_dict(optimizer, module, checkpoint_id, verify=False)
    if target:
        dcp.load(target, checkpoint_id=checkpoint_id)
    for master in masters:
        saved = target.get(f"{MASTER_PREFIX}{master.name}")
        segment = master.piece.segment
        value = local_part(saved) if saved is not None else params[master.name].reshape(-1)[segment.lo:segment.hi]
        master.local().copy_(value)
