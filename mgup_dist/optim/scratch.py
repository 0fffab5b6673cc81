"""`ScratchPool`: temporaries that rules run one at a time reuse across tensors and steps.

On CPU a freshly allocated tensor of more than a few MiB comes straight from the kernel and is page-faulted in,
zeroed, on first touch, every step: for GPT-2 small that costs more than the arithmetic of an Adam step. A pool
keeps one buffer per (name, dtype, device), grown to the largest request, so a single-process step allocates
once and then only reuses. The buffers are working memory, not optimizer state (never in ``state_dict``).
"""
from __future__ import annotations

import torch


class ScratchPool:
    """Named reusable 1-D buffers (the `mgup_dist.rules.slot.Workspace` of `LocalDistributor`).

    A buffer handed out for ``name`` is valid until the next request for the same name, dtype and device, so
    only callers that finish with one tensor before starting the next may share a pool. Holds, per name and
    dtype, as many elements as the largest request so far (``nbytes`` in all); `clear` releases them. The views
    handed out are kept per length, so the tensors of a model's few distinct sizes cost no slicing after the
    first step.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self.views: dict[tuple[tuple[str, torch.dtype, torch.device], int], torch.Tensor] = {}

    def __call__(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D ``dtype`` tensor of ``numel`` elements on ``device``, contents undefined."""
        key = (name, dtype, device if isinstance(device, torch.device) else torch.device(device))
        view = self.views.get((key, numel))
        if view is not None:
            return view
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)  # release the smaller buffer (and its views) before allocating a larger one
            self.views = {at: v for at, v in self.views.items() if at[0] != key}
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        view = self.views[(key, numel)] = buffer[:numel]
        return view

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers.values())

    def clear(self) -> None:
        """Releases every buffer (the next step allocates them again)."""
        self.buffers.clear()
        self.views.clear()
