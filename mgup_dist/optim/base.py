"""`RuleOptimizer`: the thin `torch.optim.Optimizer` shell around per-tensor rules.

A subclass declares its ``DEFAULTS`` and picks a rule for each tensor (`rule_for`); the shell handles param
groups, validation, closures and state dicts, and runs the rules through its distributor, so the same class
steps a single process (`LocalDistributor`) or a sharded engine's segments. Before any rule runs, a step with a
non-finite gradient on any rank is skipped or raises on every rank (`mgup_dist.optim.nonfinite`).
"""
from __future__ import annotations

from itertools import chain
from typing import Any, Callable, ClassVar, Iterator

import torch

from mgup_dist import native
from mgup_dist.optim.distributor import Distributor, LocalDistributor, distributor_for
from mgup_dist.optim.nonfinite import NonFiniteGuard, check_policy
from mgup_dist.optim.validation import check_state_shapes, check_unknown, validate_group
from mgup_dist.rules.driver import Rule, run_rules
from mgup_dist.rules.slot import Slot


class RuleOptimizer(torch.optim.Optimizer):
    """Base of every mgup_dist optimizer. Subclasses set ``DEFAULTS`` and implement `rule_for`."""

    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any, **hparams: Any) -> None:
        check_unknown(hparams, self.DEFAULTS, type(self).__name__)
        defaults = {**self.DEFAULTS, **hparams}
        validate_group(defaults)
        self.registered_params: set[int] = set()
        self.distributor: Distributor = LocalDistributor()
        self.guard = NonFiniteGuard()
        super().__init__(params, defaults)

    @property
    def nonfinite(self) -> str:
        """What a step with a NaN/inf gradient on any rank does: ``"skip"`` (default) or ``"raise"``."""
        return self.guard.policy

    @nonfinite.setter
    def nonfinite(self, policy: str) -> None:
        self.guard.policy = check_policy(policy)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients in this process (not saved by ``state_dict``; assignable, e.g.
        when resuming)."""
        return self.guard.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, count: int) -> None:
        self.guard.skipped_steps = int(count)

    def name_parameters(self, model: torch.nn.Module) -> None:
        """Lets non-finite gradient messages name parameters by their FQN in ``model``."""
        self.guard.name_parameters(self, model)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self.registered_params.update(id(p) for p in group["params"])
        validate_group(group)
        self.prepare_group(group)
        self.distributor = distributor_for(self.distributor, group["params"])

    def prepare_group(self, group: dict[str, Any]) -> None:
        """Hook for subclass-specific checks or derived keys on a newly added group."""

    def rule_for(self, group: dict[str, Any], slot: Slot) -> Rule:
        """The rule generator stepping ``slot`` with ``group``'s hyperparameters."""
        raise NotImplementedError

    def segments(self) -> Iterator[tuple[dict[str, Any], Slot]]:
        """``(group, slot)`` for every tensor with a gradient, from the distributor."""
        return self.distributor.slots(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter with a gradient; returns the closure's value, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        known = {id(key) for key in self.state}
        slots = list(self.segments())
        skip = True
        try:
            skip = self.guard.check(self, slots, self.distributor)
        finally:
            if skip:  # looking up the slots' state created empty entries; a skipped step leaves none behind
                for key in [k for k, v in self.state.items() if not v and id(k) not in known]:
                    del self.state[key]
        if skip:
            return loss
        rules = [self.rule_for(group, slot) for group, slot in slots]
        with native.pinned():  # MGUP_DIST_NATIVE is read once per step
            run_rules(rules, self.distributor.ops, lockstep=getattr(self.distributor, "lockstep", True))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer.load_state_dict`, but state tensors keep the dtype and the exact values they
        were saved with (e.g. MARS's float32 ``last_grad`` beside bf16 parameters): torch casts every floating
        state tensor to the parameter's dtype, so such tensors are taken from ``state_dict`` again. Whole-tensor
        state whose shape differs from the parameter it would land on is a `ValueError` (`check_state_shapes`)."""
        if not self.distributor.sharded:
            check_state_shapes(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                current = self.state[param].get(key)
                if torch.is_tensor(value) and torch.is_tensor(current) and current.dtype != value.dtype:
                    self.state[param][key] = value.to(device=current.device, copy=True)
