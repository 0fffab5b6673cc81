"""Non-finite gradient guard: one collective flag per step decides, on every rank alike, to skip or raise.

`RuleOptimizer.step` hands `NonFiniteGuard.check` the ``(group, Slot)`` pairs it is about to step. The guard
tests every local gradient segment for NaN/inf (one ``aminmax`` reduction per tensor, one host sync), ORs
the result over the ranks sharing the tensors through the distributor's ``any_rank`` (one 4-byte all-reduce
MAX for sharded distributors; identity for `LocalDistributor`, whose ranks hold identical, already reduced
gradients), and then, with policy

- ``"skip"`` (default): the caller runs no rule, so parameters and optimizer state stay bitwise unchanged
  and no state is created; ``skipped_steps`` is incremented on every rank and a warning is logged (on rank 0
  only when a process group exists);
- ``"raise"``: every rank raises `NonFiniteGradientError`; the ranks that hold an offending segment name the
  first one (its FQN when `name_parameters` was given the model, else its group, index and shape).

``skipped_steps`` is a per-process counter of this session; it is not part of the optimizer's ``state_dict``
(the launcher persists it in its trainer state).

A distributor may offer ``known_finite()``: True when its engine has already established, for this step,
identically on every rank and for every gradient the optimizer is handed, that none holds NaN/inf. The guard
then neither scans nor communicates (the check could only have returned False); when it returns False the
guard runs as above.

Scope: the guard covers one ``step()`` call. DeepSpeed ZeRO-1/2 calls ``step()`` once per param group (ZeRO-3
once per sub-group), so there each group is guarded and counted on its own. DeepSpeed itself skips the whole
step on a non-finite gradient norm, except in bf16 without ``check_grad_overflow``; at ZeRO-1/2 our adapter
passes DeepSpeed's finite, all-reduced norm on as ``known_finite`` (`mgup_dist.integrations.deepspeed`), so
there the guard acts only when DeepSpeed's norm did not vouch for the step. MARS exact mode's
``update_previous_grad`` runs outside ``step()`` and is not guarded.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mgup_dist.rules.slot import Slot
from mgup_dist.shard.collectives import Collectives

POLICIES = ("skip", "raise")
logger = logging.getLogger("mgup_dist.nonfinite")


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or inf and the optimizer's policy is ``"raise"`` (raised on every rank)."""


def check_policy(policy: Any) -> str:
    """``policy`` if it is one of `POLICIES`, else ValueError."""
    if policy not in POLICIES:
        raise ValueError(f"non-finite gradient policy must be one of {POLICIES}, got {policy!r}")
    return policy


def nonfinite_flags(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """1-D bool tensor, True where ``grads[i]`` holds a NaN or inf (empty tensors are finite), on the device
    of ``grads[0]`` (CPU when there are none). No host synchronisation."""
    if not grads:
        return torch.zeros(0, dtype=torch.bool)
    device = grads[0].device
    return torch.stack([_nonfinite(g).to(device, non_blocking=True) for g in grads])


def _nonfinite(grad: torch.Tensor) -> torch.Tensor:
    """0-d bool: ``grad`` holds a NaN or inf. For floating tensors from one ``aminmax`` reduction (min and max
    propagate NaN and an infinity is an extreme), which reads ``grad`` once and allocates nothing of its size:
    several times cheaper on CPU than ``isfinite(grad).all()``."""
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=grad.device)
    if not grad.is_floating_point():
        return ~torch.isfinite(grad).all()
    low, high = torch.aminmax(grad)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def any_rank(comm: Collectives | None, flag: torch.Tensor) -> bool:
    """True when 0-d ``flag`` is set on any rank of ``comm``'s group (one all-reduce MAX of one int32; every
    rank of the group must call); ``comm`` None: this process's own flag."""
    if comm is None:
        return bool(flag)
    nccl = dist.get_backend(comm.group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    value = flag.to(device=device, dtype=torch.int32).reshape(1)
    comm.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class NonFiniteGuard:
    """Policy, counter and parameter names of one optimizer's non-finite check (see the module docstring)."""

    def __init__(self) -> None:
        self.policy = "skip"
        self.skipped_steps = 0
        self.names: list[str | None] = []

    def name_parameters(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Remembers ``model``'s FQN of each of ``optimizer``'s parameters, by position in ``param_groups``
        (the tensor index of a segment), for error messages."""
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]

    def _describe(self, optimizer: torch.optim.Optimizer, group: dict[str, Any], slot: Slot) -> str:
        index, shape = slot.segment.index, slot.segment.shape
        name = self.names[index] if index < len(self.names) else None
        if name is not None:
            return f"parameter {name!r} (shape {shape})"
        group_index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
        return f"param group {group_index}, tensor {index}, shape {shape}"

    def check(
        self, optimizer: torch.optim.Optimizer, slots: Sequence[tuple[dict[str, Any], Slot]], distributor: Any
    ) -> bool:
        """True when the step must be skipped (some rank holds a non-finite gradient and the policy is
        ``"skip"``); raises `NonFiniteGradientError` under ``"raise"``. Collective over ``distributor``'s ranks,
        unless its ``known_finite()`` vouches for the step (see the module docstring)."""
        known_finite = getattr(distributor, "known_finite", None)
        if known_finite is not None and known_finite():
            return False
        flags = nonfinite_flags([slot.grad for _, slot in slots])
        if not distributor.any_rank(flags.any()):
            return False
        local = flags.nonzero()
        where = "on another rank" if local.numel() == 0 else "in " + self._describe(optimizer, *slots[int(local[0])])
        if self.policy == "raise":
            raise NonFiniteGradientError(f"{type(optimizer).__name__}: non-finite (NaN/inf) gradient {where}")
        self.skipped_steps += 1
        if _is_main():
            logger.warning(
                "%s: non-finite (NaN/inf) gradient %s; step skipped on every rank (%d skipped so far)",
                type(optimizer).__name__, where, self.skipped_steps,
            )
        return True
