"""Counting wrappers for benchmarks: bytes per ``torch.distributed`` collective, and calls of any function.

`CollectiveCounter.install` replaces the collectives of ``torch.distributed`` (and the same names in
``torch.distributed.distributed_c10d``) with wrappers that add what this rank sends to ``bytes_by_kind`` and then
call the original. Install it before anything caches a handle to a collective (DeepSpeed's comm layer caches
``all_gather_into_tensor`` / ``reduce_scatter_tensor`` when it initialises), or re-point such handles at the
wrapped functions (`mgup_dist.shard.collectives` binds its single-tensor gather/scatter at import). Bytes follow
the convention of `mgup_dist.shard.collectives.Collectives`, so our own counters and these agree:

- all-reduce: the tensor's bytes; reduce: the tensor's bytes on ranks other than ``dst``; broadcast: the tensor's
  bytes on ``src``;
- reduce-scatter: the input minus the chunk this rank keeps; all-gather: this rank's input;
- all-to-all: the bytes sent to the other ranks; point-to-point sends: the tensor's bytes.

Collectives called from inside another counted collective count once (the outermost call). Object
collectives (``all_gather_object``, ``broadcast_object_list``) are counted as calls with 0 bytes.
"""
from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _list_bytes(tensors: Any) -> int:
    return sum(_nbytes(t) for t in tensors)


def _world(args: dict[str, Any]) -> tuple[int, int]:
    group = args.get("group")
    return dist.get_rank(group), dist.get_world_size(group)


def _reduce_scatter_single(a: dict[str, Any]) -> int:
    _, world = _world(a)
    return _nbytes(a["input"]) * (world - 1) // world


def _reduce_scatter_list(a: dict[str, Any]) -> int:
    rank, _ = _world(a)
    return sum(_nbytes(t) for r, t in enumerate(a["input_list"]) if r != rank)


def _all_to_all_single(a: dict[str, Any]) -> int:
    rank, world = _world(a)
    data = a["input"]
    splits = a.get("input_split_sizes") or [data.shape[0] // world] * world
    row = _nbytes(data) // max(data.shape[0], 1)
    return sum(n for r, n in enumerate(splits) if r != rank) * row


def _all_to_all(a: dict[str, Any]) -> int:
    rank, _ = _world(a)
    return sum(_nbytes(t) for r, t in enumerate(a["input_tensor_list"]) if r != rank)


def _on_rank(key: str, sending: Callable[[int, int], bool]) -> Callable[[dict[str, Any]], int]:
    def count(a: dict[str, Any]) -> int:
        return _nbytes(a["tensor"]) if sending(dist.get_rank(), a.get(key, 0)) else 0
    return count


# name -> (kind, bytes sent by this rank from the bound arguments)
SIZES: dict[str, tuple[str, Callable[[dict[str, Any]], int]]] = {
    "all_reduce": ("all_reduce", lambda a: _nbytes(a["tensor"])),
    "all_reduce_coalesced": ("all_reduce", lambda a: _list_bytes(a["tensors"])),
    "reduce": ("reduce", _on_rank("dst", lambda rank, dst: rank != dst)),
    "broadcast": ("broadcast", _on_rank("src", lambda rank, src: rank == src)),
    "reduce_scatter_single": ("reduce_scatter", _reduce_scatter_single),
    "reduce_scatter_tensor": ("reduce_scatter", _reduce_scatter_single),
    "_reduce_scatter_base": ("reduce_scatter", _reduce_scatter_single),
    "reduce_scatter": ("reduce_scatter", _reduce_scatter_list),
    "all_gather_single": ("all_gather", lambda a: _nbytes(a["input_tensor"])),
    "all_gather_into_tensor": ("all_gather", lambda a: _nbytes(a["input_tensor"])),
    "_all_gather_base": ("all_gather", lambda a: _nbytes(a["input_tensor"])),
    "all_gather": ("all_gather", lambda a: _nbytes(a["tensor"])),
    "all_gather_coalesced": ("all_gather", lambda a: _list_bytes(a["input_tensor_list"])),
    "all_to_all_single": ("all_to_all", _all_to_all_single),
    "all_to_all": ("all_to_all", _all_to_all),
    "send": ("send", lambda a: _nbytes(a["tensor"])),
    "isend": ("send", lambda a: _nbytes(a["tensor"])),
    "gather": ("gather", lambda a: _nbytes(a["tensor"])),
    "scatter": ("scatter", lambda a: _list_bytes(a.get("scatter_list") or []) if a.get("scatter_list") else 0),
    "all_gather_object": ("object", lambda a: 0),
    "broadcast_object_list": ("object", lambda a: 0),
}


class CollectiveCounter:
    """Calls and bytes sent by this rank, per collective kind, since the last `reset`."""

    def __init__(self) -> None:
        self.bytes_by_kind: Counter[str] = Counter()
        self.calls_by_kind: Counter[str] = Counter()
        self._depth = 0
        self._originals: dict[str, Callable[..., Any]] = {}
        self._patched: list[tuple[Any, str]] = []

    def reset(self) -> None:
        self.bytes_by_kind.clear()
        self.calls_by_kind.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        kind, size = SIZES[name]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                bound = signature.bind(*args, **kwargs)
                self.calls_by_kind[kind] += 1
                self.bytes_by_kind[kind] += size(bound.arguments)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def install(self) -> None:
        """Wraps the collectives in ``torch.distributed`` and ``distributed_c10d`` (idempotent per counter)."""
        for name in SIZES:
            original = getattr(c10d, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            wrapped = self._wrap(name, original)
            for module in (c10d, dist):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapped)
                    self._patched.append((module, name))

    def uninstall(self) -> None:
        """Puts the original functions back."""
        for module, name in self._patched:
            setattr(module, name, self._originals[name])
        self._patched.clear()
        self._originals.clear()


class CallCounter:
    """Calls of wrapped module-level functions since the last `reset`, with the shape of one argument."""

    def __init__(self) -> None:
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def reset(self) -> None:
        self.calls = 0
        self.shapes = []

    def wrap(self, module: Any, name: str, shape_arg: int | None = None) -> None:
        """Replaces ``module.<name>`` by a counting wrapper (callers must look the name up at call time)."""
        original = getattr(module, name)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if shape_arg is not None and len(args) > shape_arg and torch.is_tensor(args[shape_arg]):
                self.shapes.append(tuple(args[shape_arg].shape))
            return original(*args, **kwargs)

        setattr(module, name, counted)
