"""MARS exact-mode hooks (spec §0.6, §4.5), shared by MARSAdamW and MARSM."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from mgup_dist.rules.muon import wide_dtype
from mgup_dist.rules.slot import Slot


class MarsExactHooks:
    """``update_previous_grad`` / ``update_last_grad`` for ``is_approx=False`` loops; no-ops in approx mode."""

    def takes_exact_hooks(self, group: Mapping[str, Any], slot: Slot) -> bool:
        """Whether ``slot``'s tensor keeps ``previous_grad`` (all tensors unless a subclass narrows it)."""
        return True

    def _exact_slots(self) -> Iterator[Slot]:
        for group, slot in self.segments():  # type: ignore[attr-defined]
            if not group["is_approx"] and self.takes_exact_hooks(group, slot):
                yield slot

    def update_previous_grad(self) -> None:
        """Copies each gradient into state ``previous_grad`` (allocated on first use)."""
        for slot in self._exact_slots():
            slot.buffer("previous_grad", wide_dtype(slot.grad.dtype)).copy_(slot.grad)

    def update_last_grad(self) -> None:
        """Copies state ``previous_grad`` into ``last_grad`` (works after ``zero_grad(set_to_none=True)``)."""
        for group in self.param_groups:  # type: ignore[attr-defined]
            if group["is_approx"]:
                continue
            for param in group["params"]:
                state = self.state[param]  # type: ignore[attr-defined]
                if "previous_grad" in state:
                    if "last_grad" in state:
                        state["last_grad"].copy_(state["previous_grad"])
                    else:
                        state["last_grad"] = state["previous_grad"].clone()
