"""A float64 reference optimizer for each of the ten spec optimizers (§0.1), for comparison in tests.

`ReferenceOptimizer(name, params, **hparams)` copies `params` to float64 and `step(grads)` applies one step
given one gradient per tensor (None skips the tensor). Defaults are the spec §0.3 tables. Routing: the
Muon family sends ndim ≥ 2 tensors to the matrix path and the rest to AdamW (§0.4; no use_muon groups);
MARSAdamW sends original-2-D tensors (or all, with optimize_1d) to MARS and the rest to its torch-style
fallback (§4.4).
"""
from collections.abc import Sequence

import torch

from tests.reference import steps

_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "correct_bias": True}
_MUON = {"lr": 1e-3, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
         "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8}
_MGUP = {"mask_ratio": 0.5, "alpha": 2.0, "gamma": 0.1}

DEFAULTS: dict[str, dict] = {
    "adamw": dict(_ADAM),
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
    "muon": dict(_MUON),
    "mars_adamw": {"lr": 3e-3, "betas": (0.95, 0.99), "eps": 1e-8, "weight_decay": 0.0, "gamma": 0.025,
                   "is_approx": True, "amsgrad": False, "optimize_1d": False, "lr_1d": 3e-3,
                   "betas_1d": (0.9, 0.95), "weight_decay_1d": 0.1},
    "mgup_adamw": dict(_ADAM, **_MGUP),
    "cmgup_adamw": dict(_ADAM, alpha=2.0, gamma=0.1),
    "mgup_lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, **_MGUP},
    "mgup_muon": dict(_MUON, adamw_betas=(0.95, 0.95), **_MGUP),
    "alpha_adam": dict(_ADAM, alpha_min=0.01, alpha_ema=0.0, score_source="momentum"),
    "mars_m": dict(_MUON, gamma=0.025, is_approx=True),
}
MUON_FAMILY = ("muon", "mgup_muon", "mars_m")


class ReferenceOptimizer:
    """Float64 reference of optimizer `name` over whole tensors (no sharding, no batching)."""

    def __init__(self, name: str, params: Sequence[torch.Tensor], **hparams) -> None:
        unknown = set(hparams) - set(DEFAULTS[name])
        if unknown:
            raise TypeError(f"unknown hyperparameters for {name}: {sorted(unknown)}")
        self.name = name
        self.hp = dict(DEFAULTS[name], **hparams)
        self.lr_ratio = self.hp.get("lr_1d", 0.0) / self.hp["lr"] if name == "mars_adamw" else 1.0
        self.params = [p.detach().to(torch.float64).clone() for p in params]
        self.matrix = [p.ndim >= 2 for p in self.params]
        self.state: list[dict] = [{} for _ in self.params]

    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Apply one step; `grads[i]` is tensor i's gradient (any float dtype) or None to skip it."""
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = grad.detach().to(torch.float64)
            self._rule(i)(self.params[i], g, self.state[i], self.hp)

    def update_previous_grad(self, grads: Sequence[torch.Tensor | None]) -> None:
        """MARS exact-mode hook (§0.6): previous_grad ← g on the MARS-handled tensors; no-op in approx mode."""
        if self.hp.get("is_approx", True):
            return
        for i, grad in enumerate(grads):
            if grad is not None and self._has_mars_state(i):
                self.state[i]["previous_grad"] = grad.detach().to(torch.float64).clone()

    def update_last_grad(self) -> None:
        """MARS exact-mode hook (§0.6): last_grad ← previous_grad; no-op in approx mode."""
        if self.hp.get("is_approx", True):
            return
        for state in self.state:
            if "previous_grad" in state:
                state["last_grad"] = state["previous_grad"].clone()

    def _has_mars_state(self, i: int) -> bool:
        return self.name == "mars_adamw" or (self.name == "mars_m" and self.matrix[i])

    def _rule(self, i: int):
        name, matrix = self.name, self.matrix[i]
        if name in MUON_FAMILY and not matrix:
            return steps.muon_adamw_path
        if name == "mars_adamw" and self.params[i].ndim != 2 and not self.hp["optimize_1d"]:
            return lambda theta, g, state, hp: steps.mars_fallback(theta, g, state, hp, self.lr_ratio)
        table = {
            "adamw": lambda *a: steps.masked_adam(*a, mask="none"),
            "mgup_adamw": lambda *a: steps.masked_adam(*a, mask="mgup"),
            "cmgup_adamw": lambda *a: steps.masked_adam(*a, mask="cmgup"),
            "alpha_adam": steps.alpha_adam,
            "lion": lambda *a: steps.lion(*a, masked=False),
            "mgup_lion": lambda *a: steps.lion(*a, masked=True),
            "muon": lambda *a: steps.muon_matrix(*a, masked=False),
            "mgup_muon": lambda *a: steps.muon_matrix(*a, masked=True),
            "mars_m": steps.mars_m_matrix,
            "mars_adamw": steps.mars_adamw,
        }
        return table[name]
