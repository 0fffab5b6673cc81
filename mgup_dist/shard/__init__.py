"""Distribution: layouts (which rank holds which range of each tensor) and the tensor-wide collectives.

`Segment` is imported by `mgup_dist.rules`, so this package must not import the rules eagerly: names from
modules that depend on them (ops, select, distributor, orthogonalize) are loaded on first access.
"""
from importlib import import_module
from typing import Any

from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import (
    ShardLayout,
    balanced_whole_tensor_layout,
    even_split_layout,
    flat_layout,
    row_split_layout,
    tensor_cost,
    whole_tensor_layout,
)
from mgup_dist.shard.planner import balanced_owners, ns_cost
from mgup_dist.shard.segment import Segment

_LAZY = {
    "DistributedOrthogonalizer": "orthogonalize",
    "LocalShard": "distributor",
    "ShardedDistributor": "distributor",
    "ShardedTensors": "distributor",
    "gather_full": "distributor",
    "local_piece": "distributor",
    "ShardedOps": "ops",
    "topk_masks": "select",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"mgup_dist.shard.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mgup_dist.shard' has no attribute {name!r}")


__all__ = [
    "Collectives", "Segment", "ShardLayout", "balanced_owners", "balanced_whole_tensor_layout", "even_split_layout",
    "flat_layout", "ns_cost", "row_split_layout", "tensor_cost", "whole_tensor_layout", *_LAZY,
]
