"""Reshardable optimizer state with `torch.distributed.checkpoint` (DCP): save at N ranks, load at M.

Every per-element state tensor (moments, momentum, MARS's ``last_grad``) is stored as the 1-D row-major
flattening of its parameter, ``numel`` elements, under ``optim.state.<param fqn>.<key>``. A sharded rank
contributes its segment ``[lo, hi)`` as a shard at offset ``lo`` (empty segments contribute nothing); a
replicated (single-process or DDP) optimizer contributes the whole tensor, which DCP de-duplicates. On load,
each rank allocates exactly its own segment under the *current* distributor and DCP reads the overlapping
pieces, so the world size and the layout may change between save and load. Scalars (``step``, AlphaAdam's
``alpha_bar``) and the param groups' hyperparameters are stored as replicated values.

`save_atomic` writes a checkpoint into a temporary directory, adds its manifest (`mgup_dist.manifest`: file
sizes and sha256, world size, step, model/optimizer identity) last, and renames it into place only once every
rank has finished, so an interrupted save never leaves a half-written checkpoint under the final name. The
loaders verify the manifest before touching any state (``verify=False`` skips that, e.g. for a folder written
by plain ``dcp.save`` or one the caller verified already): a damaged checkpoint or one of another
model/optimizer raises a `CheckpointError` and leaves model and optimizer as they were.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from mgup_dist.manifest import (
    CheckpointError, CheckpointIntegrityError, CheckpointMismatchError, checkpoint_identity, verify_checkpoint,
    write_manifest,
)
from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.state_entries import StateEntry
from mgup_dist.shard.segment import Segment

__all__ = [
    "CheckpointError", "CheckpointIntegrityError", "CheckpointMismatchError", "check_model_entries", "checkpoint_identity",
    "flat_entry", "load_model_state_dict", "load_optimizer_state_dict", "local_part", "model_state_dict",
    "optimizer_state_dict", "save_atomic",
]

STATE_PREFIX = "optim.state."
GROUPS_KEY = "optim.param_groups"
SCALAR_STATE = ("step",)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def flat_entry(local: torch.Tensor, segment: Segment, sharded: bool) -> torch.Tensor:
    """The DCP value for a per-element tensor whose local storage covers ``segment`` of a ``numel`` flattening:
    a `ShardedTensor` when ``sharded`` (collective: every rank must call it for the same tensors in the same
    order), else the whole tensor, flattened."""
    flat = local.reshape(-1)
    if not (sharded and _distributed()):
        if not segment.is_whole:
            raise ValueError(f"tensor {segment.index} is only partly held here, so it must be saved sharded")
        return flat
    shards = []
    if segment.length:
        placement = f"rank:{dist.get_rank()}/{flat.device.type}"
        shards.append(Shard(flat, ShardMetadata([segment.lo], [segment.length], placement)))
    return ShardedTensor._init_from_local_shards(shards, segment.numel)


def local_part(value: torch.Tensor) -> torch.Tensor:
    """This rank's 1-D piece of a `flat_entry` value (empty when it holds none)."""
    if isinstance(value, ShardedTensor):
        shards = value.local_shards()
        return shards[0].tensor if shards else torch.empty(0, dtype=value.dtype)
    return value


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def _named_entries(optimizer: RuleOptimizer, model: nn.Module) -> list[tuple[StateEntry, str]]:
    """Every logical tensor's `StateEntry` (from the optimizer's distributor) with its FQN in ``model``."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and any(
        isinstance(p, dtensor.DTensor) for group in optimizer.param_groups for p in group["params"]
    ):
        raise TypeError(
            f"{type(optimizer).__name__} steps FSDP2 (DTensor) parameters and keeps DTensor state: save and load it "
            "with torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict (also reshardable)"
        )
    names = _names(model)
    out = []
    for entry in optimizer.distributor.state_entries(optimizer):
        if id(entry.param) not in names:
            raise ValueError(
                f"an optimizer parameter of shape {tuple(entry.param.shape)} is not a parameter of the model"
            )
        out.append((entry, names[id(entry.param)]))
    return out


def _group_names(entries: list[tuple[StateEntry, str]], optimizer: torch.optim.Optimizer) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in optimizer.param_groups]
    for entry, name in entries:
        groups[entry.group_index].append(name)
    return groups


def optimizer_state_dict(optimizer: RuleOptimizer, model: nn.Module) -> dict[str, Any]:
    """The DCP-ready, reshardable state of ``optimizer`` (built over ``model``'s parameters). Collective when
    the optimizer's distributor is sharded."""
    sharded = optimizer.distributor.sharded
    entries = _named_entries(optimizer, model)
    out: dict[str, Any] = {}
    for entry, name in entries:
        for key, value in entry.state.items():
            full_key = f"{STATE_PREFIX}{name}.{key}"
            if key in SCALAR_STATE or not torch.is_tensor(value):
                out[full_key] = value
            else:
                out[full_key] = flat_entry(value, entry.segment, sharded)
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": names}
        for group, names in zip(optimizer.param_groups, _group_names(entries, optimizer))
    ]
    out[GROUPS_KEY] = pickle.dumps(groups)  # one opaque value: DCP would otherwise flatten the list of dicts
    return out


def _target(key: str, meta: Any, segment: Segment, sharded: bool, device: torch.device) -> Any:
    if isinstance(meta, BytesStorageMetadata):
        return None
    assert isinstance(meta, TensorStorageMetadata)
    if key.rsplit(".", 1)[-1] in SCALAR_STATE:
        return torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
    if tuple(meta.size) != (segment.numel,):
        raise CheckpointMismatchError(
            f"checkpoint entry {key} has {tuple(meta.size)} elements, but the parameter has {segment.numel}"
        )
    local = torch.zeros(segment.length if sharded else segment.numel, dtype=meta.properties.dtype, device=device)
    return flat_entry(local, segment, sharded)


def _check_groups(saved: list[dict[str, Any]], ours: list[list[str]]) -> None:
    theirs = [group["params"] for group in saved]
    if ours != theirs:
        raise CheckpointMismatchError(
            f"the checkpoint's param groups hold {theirs}, this optimizer's hold {ours}: a different model or grouping"
        )


def load_optimizer_state_dict(
    optimizer: RuleOptimizer, model: nn.Module, checkpoint_id: str | os.PathLike, *, verify: bool = True
) -> None:
    """Loads optimizer state saved by `optimizer_state_dict` (at any world size and layout) into this rank's
    segments under ``optimizer``'s current distributor, and restores the groups' hyperparameters. Collective
    when sharded. Raises `CheckpointMismatchError` if the checkpoint belongs to another model or grouping and,
    with ``verify``, `CheckpointIntegrityError` unless its manifest checks out (before any state changes)."""
    if verify:
        verify_checkpoint(checkpoint_id, checkpoint_identity(model, optimizer))
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    sharded = optimizer.distributor.sharded
    entries = _named_entries(optimizer, model)
    known = {f"{STATE_PREFIX}{name}." for _, name in entries}
    stray = [k for k in metadata if k.startswith(STATE_PREFIX) and not any(k.startswith(p) for p in known)]
    if stray:
        raise CheckpointMismatchError(f"checkpoint has optimizer state for unknown parameters, e.g. {stray[0]}")
    target: dict[str, Any] = {GROUPS_KEY: None}
    owners: dict[str, tuple[StateEntry, str, torch.Size]] = {}
    for entry, name in entries:
        prefix = f"{STATE_PREFIX}{name}."
        shape = torch.Size([entry.segment.length]) if sharded else entry.param.shape
        for key in sorted(k for k in metadata if k.startswith(prefix)):
            target[key] = _target(key, metadata[key], entry.segment, sharded, entry.param.device)
            owners[key] = (entry, key[len(prefix):], shape)
    dcp.load(target, checkpoint_id=checkpoint_id)
    saved_groups = pickle.loads(target[GROUPS_KEY])
    _check_groups(saved_groups, _group_names(entries, optimizer))
    for entry, _ in entries:
        entry.state.clear()
    for key, (entry, state_key, shape) in owners.items():
        value = target[key]
        if state_key not in SCALAR_STATE and torch.is_tensor(value):
            value = local_part(value).view(shape)
        entry.state[state_key] = value
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})


MODEL_PREFIX = "model."


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.<key>`` entries of a replicated model's state dict (every rank holds the same values; DCP writes
    them once)."""
    return {f"{MODEL_PREFIX}{key}": value for key, value in model.state_dict().items()}


def check_model_entries(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...] | None]) -> None:
    """`CheckpointMismatchError` unless the checkpoint's ``model.*`` entries (DCP ``metadata``) are exactly the
    keys of ``shapes`` (``model.<key>`` -> the model's shape of that entry, None for non-tensor state such as
    Megatron's ``_extra_state``), with those shapes where both sides are tensors."""
    saved = {key for key in metadata if key.startswith(MODEL_PREFIX)}
    if saved != set(shapes):
        missing, extra = sorted(set(shapes) - saved), sorted(saved - set(shapes))
        raise CheckpointMismatchError(f"checkpoint model keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in shapes.items():
        meta = metadata[key]
        if isinstance(meta, TensorStorageMetadata) and shape is not None and tuple(meta.size) != shape:
            raise CheckpointMismatchError(f"checkpoint entry {key} has shape {tuple(meta.size)}, the model {shape}")


def load_model_state_dict(model: nn.Module, checkpoint_id: str | os.PathLike, *, verify: bool = True) -> None:
    """Loads the ``model.*`` entries of a checkpoint into a replicated ``model`` (strict: missing or extra keys
    and shape changes raise `CheckpointMismatchError`). With ``verify``, the manifest is checked first
    (`CheckpointIntegrityError`/`CheckpointMismatchError` before any parameter changes). Collective."""
    if verify:
        verify_checkpoint(checkpoint_id, checkpoint_identity(model))
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    state = model_state_dict(model)
    check_model_entries(metadata, {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in state.items()})
    dcp.load(state, checkpoint_id=checkpoint_id)
    model.load_state_dict({key[len(MODEL_PREFIX):]: value for key, value in state.items()})


def save_atomic(
    state: dict[str, Any], path: str | os.PathLike, *, identity: Mapping[str, Any] | None = None,
    step: int | None = None,
) -> None:
    """Writes ``state`` with DCP to ``path`` atomically: into ``<path>.partial`` first, then its manifest
    (recording ``identity``, e.g. `checkpoint_identity(model, optimizer)`, and ``step``), renamed into place by
    rank 0 after every rank has written (an earlier checkpoint at ``path`` is replaced). Collective."""
    path = os.fspath(path)
    partial = path + ".partial"
    rank = dist.get_rank() if _distributed() else 0
    if rank == 0 and os.path.exists(partial):
        shutil.rmtree(partial)
    _barrier()
    dcp.save(state, checkpoint_id=partial)
    _barrier()
    write_manifest(partial, world_size=dist.get_world_size() if _distributed() else 1, step=step, identity=identity)
    if rank == 0:
        previous = path + ".previous"
        if os.path.exists(path):
            os.replace(path, previous)
        os.replace(partial, path)
        if os.path.exists(previous):
            shutil.rmtree(previous)
    _barrier()


def _barrier() -> None:
    if _distributed():
        dist.barrier()
