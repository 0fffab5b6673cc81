"""`StateEntry`: where the optimizer state of one logical tensor lives on this rank (what checkpoints read).

A distributor's ``state_entries(optimizer)`` lists one entry per logical tensor, in the optimizer's group order
and identically numbered on every rank (ranks holding nothing of a tensor still list it, with an empty
segment), so that checkpoint writers can make the same collective calls on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping

import torch

from mgup_dist.shard.segment import Segment


@dataclass(frozen=True)
class StateEntry:
    """``param``: the model parameter that names the tensor (its FQN keys the checkpoint); ``group_index``: its
    group in ``optimizer.param_groups``; ``state``: the live state mapping (loading writes into it);
    ``segment``: the range of the tensor's row-major flattening that the state's per-element tensors cover."""

    param: torch.Tensor
    group_index: int
    state: MutableMapping[str, Any]
    segment: Segment


def param_state_entries(optimizer: torch.optim.Optimizer, segments: Mapping[int, Segment]) -> list[StateEntry]:
    """The entries of an optimizer whose groups hold the model parameters themselves and whose state is
    ``optimizer.state[param]``; ``segments`` maps ``id(param)`` to the `Segment` this rank holds."""
    return [
        StateEntry(param, index, optimizer.state[param], segments[id(param)])
        for index, group in enumerate(optimizer.param_groups)
        for param in group["params"]
    ]
