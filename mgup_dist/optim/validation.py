"""Hyperparameter validation: every bad value is a clear `ValueError` before any step (spec §0.2)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from mgup_dist.rules.newton_schulz import NS_DTYPES

_NS_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
SCORE_SOURCES = ("momentum", "update")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    _require(math.isfinite(value), f"{name} must be finite, got {value!r}")
    return float(value)


def _unit_interval(name: str, value: Any, *, closed_high: bool = False, open_low: bool = False) -> None:
    v = _finite_number(name, value)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v <= 1 if closed_high else v < 1
    _require(low_ok and high_ok, f"{name} must be in {'(' if open_low else '['}0, 1{']' if closed_high else ')'}, got {value!r}")


def _betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for i, beta in enumerate(value):
        _unit_interval(f"{name}[{i}]", beta)
    return float(value[0]), float(value[1])


def normalize_ns_dtype(value: Any) -> torch.dtype:
    """``torch.bfloat16``/``torch.float32`` or their names; anything else is a `ValueError`."""
    if isinstance(value, str) and value.lower() in _NS_DTYPE_NAMES:
        return _NS_DTYPE_NAMES[value.lower()]
    if value in NS_DTYPES:
        return value
    raise ValueError(f"ns_dtype must be torch.bfloat16 or torch.float32 (or 'bfloat16'/'float32'), got {value!r}")


_NON_NEGATIVE = ("lr", "eps", "adamw_eps", "weight_decay", "weight_decay_1d", "alpha", "gamma", "lr_1d")
_UNIT = ("momentum", "alpha_ema")
_BETAS = ("betas", "adamw_betas", "betas_1d")
_FLAGS = ("correct_bias", "nesterov", "is_approx", "amsgrad", "optimize_1d", "use_muon")


def validate_group(group: dict[str, Any]) -> None:
    """Checks (and normalises in place: betas to tuples, ns_dtype to a dtype) the hyperparameters of a group."""
    for name in _NON_NEGATIVE:
        if name in group:
            _require(_finite_number(name, group[name]) >= 0, f"{name} must be >= 0, got {group[name]!r}")
    for name in _UNIT:
        if name in group:
            _unit_interval(name, group[name])
    for name in _BETAS:
        if name in group:
            group[name] = _betas(name, group[name])
    for name in _FLAGS:
        if name in group and not isinstance(group[name], bool):
            raise ValueError(f"{name} must be True or False, got {group[name]!r}")
    if "mask_ratio" in group:
        _unit_interval("mask_ratio", group["mask_ratio"], closed_high=True)
    if "alpha_min" in group:
        _unit_interval("alpha_min", group["alpha_min"], closed_high=True, open_low=True)
    if "ns_steps" in group:
        steps = group["ns_steps"]
        _require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, f"ns_steps must be an integer >= 1, got {steps!r}")
    if "ns_dtype" in group:
        group["ns_dtype"] = normalize_ns_dtype(group["ns_dtype"])
    if "score_source" in group:
        _require(group["score_source"] in SCORE_SOURCES, f"score_source must be one of {SCORE_SOURCES}, got {group['score_source']!r}")


def check_unknown(hparams: Mapping[str, Any], known: Mapping[str, Any], owner: str) -> None:
    """`TypeError` naming the valid hyperparameters if ``hparams`` has a key ``known`` lacks."""
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise TypeError(f"{owner} got unexpected hyperparameter(s) {unknown}; valid: {sorted(known)}")


def check_state_shapes(saved: Mapping[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """`ValueError` if a state dict's per-element state (tensors with a dimension) would land on a parameter of
    another shape: torch pairs saved and current parameters by position only, so swapped or regrouped
    parameters of equal group sizes would otherwise load silently. For whole-tensor (unsharded) state."""
    saved_ids = [i for group in saved.get("param_groups", []) for i in group.get("params", [])]
    params = [p for group in param_groups for p in group["params"]]
    for position, (saved_id, param) in enumerate(zip(saved_ids, params)):
        for key, value in saved.get("state", {}).get(saved_id, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"state dict entry {key!r} of parameter {position} has shape {tuple(value.shape)}, but this "
                    f"optimizer's parameter {position} has shape {tuple(param.shape)}: param groups differ"
                )
