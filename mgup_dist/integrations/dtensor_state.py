"""`DTensorState`: the optimizer state of one DTensor parameter, stored as DTensors, seen by rules as 1-D views.

`torch.distributed.checkpoint` (``get_state_dict`` / ``set_state_dict``) reshards optimizer state only when the
per-element state tensors are DTensors laid out like their parameter. Rules, on the other hand, work on 1-D
local views (`mgup_dist.rules.slot.Slot`). `DTensorState` wraps ``optimizer.state[param]`` so that both hold:

- reading a DTensor entry returns ``entry.to_local().view(-1)`` (shares storage: in-place updates persist);
- writing a non-scalar plain tensor (a newly allocated local buffer) stores
  ``DTensor.from_local(value.view(local_shape), mesh, placements, shape=param.shape, stride=param.stride())``;
- scalars (``step``, a 0-d int64 tensor; AlphaAdam's float ``alpha_bar``) are stored as given.
"""
from __future__ import annotations

from typing import Any, Iterator, MutableMapping

import torch
from torch.distributed.tensor import DTensor


class DTensorState(MutableMapping[str, Any]):
    """``optimizer.state[param]`` of DTensor ``param``, with per-element entries held as DTensors shaped and
    placed like ``param`` (dtype may differ) and exposed as contiguous 1-D views of the local rows."""

    def __init__(self, store: MutableMapping[str, Any], param: DTensor) -> None:
        self.store = store
        self.param = param
        self.local_shape = param.to_local().shape

    def _describe(self, key: str) -> str:
        return f"optimizer state {key!r} of the parameter of shape {tuple(self.param.shape)}"

    def _local_view(self, key: str, value: DTensor) -> torch.Tensor:
        if value.device_mesh != self.param.device_mesh or tuple(value.placements) != tuple(self.param.placements):
            raise ValueError(
                f"{self._describe(key)} is a DTensor on {value.device_mesh} with placements {value.placements}, "
                f"but its parameter lives on {self.param.device_mesh} with {self.param.placements}"
            )
        local = value.to_local()
        if local.shape != self.local_shape or not local.is_contiguous():
            raise ValueError(
                f"{self._describe(key)} holds local rows of shape {tuple(local.shape)} (contiguous: "
                f"{local.is_contiguous()}), expected contiguous {tuple(self.local_shape)} like the parameter"
            )
        return local.view(-1)

    def _wrap(self, key: str, value: torch.Tensor) -> DTensor:
        if value.numel() != self.local_shape.numel():
            raise ValueError(
                f"{self._describe(key)}: a local tensor of {value.numel()} elements cannot be stored for local "
                f"rows of shape {tuple(self.local_shape)}; per-element state must match the local shard"
            )
        return DTensor.from_local(
            value.view(self.local_shape),
            self.param.device_mesh,
            self.param.placements,
            run_check=False,
            shape=self.param.shape,
            stride=self.param.stride(),
        )

    def __getitem__(self, key: str) -> Any:
        value = self.store[key]
        return self._local_view(key, value) if isinstance(value, DTensor) else value

    def __setitem__(self, key: str, value: Any) -> None:
        if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim() > 0:
            value = self._wrap(key, value)
        self.store[key] = value

    def __delitem__(self, key: str) -> None:
        del self.store[key]

    def __contains__(self, key: object) -> bool:
        return key in self.store

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)
