"""`Slot`: what an update rule sees of one tensor: local segments of parameter, gradient and state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, MutableMapping, Optional

import torch

from mgup_dist.shard.segment import Segment

StateAllocator = Callable[[torch.dtype], torch.Tensor]
Workspace = Callable[[str, int, torch.dtype, torch.device], torch.Tensor]  # (name, numel, dtype, device) -> 1-D


@dataclass
class Slot:
    """One tensor's local working set for one step.

    ``param`` and ``grad`` are 1-D views of the locally held range (``segment.length`` elements); the rule
    updates ``param`` in place. ``state`` is the tensor's persistent optimizer state on this rank; tensors in
    it are created through `buffer`, so their storage shape is the engine's choice (the parameter's shape in
    a single process, the segment's length when sharded) while rules always see 1-D views. Temporaries of the
    segment's length come from `scratch`: fresh tensors, or, when the engine passes a ``workspace``, storage
    it reuses across tensors and steps.
    """

    param: torch.Tensor
    grad: torch.Tensor
    state: MutableMapping[str, Any]
    segment: Segment
    allocate: StateAllocator = field(repr=False)
    workspace: Optional[Workspace] = field(default=None, repr=False)

    def buffer(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 1-D view of state tensor ``name``, created as zeros (default dtype: the gradient's) on first use."""
        if name not in self.state:
            self.state[name] = self.allocate(dtype or self.grad.dtype)
        return self.state[name].view(-1)

    def scratch(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A 1-D temporary of ``param``'s length (default dtype: the gradient's), contents undefined.

        The rule may use it until it finishes and must not keep it beyond that: with a ``workspace`` the same
        storage serves the same ``name`` in the next tensor's rule (engines that share it run rules one at a
        time, see `mgup_dist.rules.driver.run_rules`). Different names never share storage.
        """
        dtype = dtype or self.grad.dtype
        if self.workspace is None:
            return torch.empty(self.param.numel(), dtype=dtype, device=self.param.device)
        return self.workspace(name, self.param.numel(), dtype, self.param.device)

    def has(self, name: str) -> bool:
        return name in self.state

    def next_step(self) -> int:
        """Increments and returns this tensor's step counter ``state['step']`` (a 0-d int64 tensor)."""
        if "step" not in self.state:
            self.state["step"] = torch.zeros((), dtype=torch.int64)
        self.state["step"] += 1
        return int(self.state["step"])
