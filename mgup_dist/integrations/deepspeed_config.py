"""Reading a DeepSpeed config that selects an mgup_dist optimizer, and the config DeepSpeed itself gets.

The standard block selects the optimizer::

    "optimizer": {"type": "MGUPAdamW", "params": {"lr": 3e-4, "weight_decay": 0.1, "mask_ratio": 0.5}}

``type`` is resolved as follows (names match case-insensitively, ignoring ``_`` and ``-``, as in
`mgup_dist.optim.optimizer_class`):

- ``"mgup_dist.<name>"`` always means our optimizer ``<name>``;
- one of our names that DeepSpeed does not also define (``MGUPAdamW``, ``mgup_muon``, ``AlphaAdam``, ``MARSM``,
  ...) means ours;
- DeepSpeed's own names (``Adam``, ``AdamW``, ``Lion``, ``Muon``, ...) and ``torch.optim`` class names keep
  DeepSpeed's meaning, so a config written for plain DeepSpeed behaves as before; write ``"mgup_dist.AdamW"``,
  ``"mgup_dist.Lion"`` or ``"mgup_dist.Muon"`` for our baselines;
- anything else is a `ValueError` naming the valid choices.

``params`` are our constructor's hyperparameters; ``lr`` is required, an unknown key is a `TypeError` naming the
valid ones and a bad value a `ValueError`, all before any DeepSpeed work. JSON lists become tuples and
``"ns_dtype": "bfloat16"`` a dtype through the optimizers' own validation.

An optional top-level ``"mgup_dist"`` section holds our own settings (`Settings`). DeepSpeed does not validate
top-level keys, but `deepspeed_view` removes ours anyway, together with the optimizer block, and sets
``zero_allow_untested_optimizer`` (DeepSpeed refuses client optimizers at ZeRO stages >= 1 without it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.registry import OPTIMIZERS, optimizer_class
from mgup_dist.optim.validation import check_unknown, validate_group

SECTION = "mgup_dist"
PREFIX = "mgup_dist."
REQUIRED_HPARAMS = ("lr",)


def load_config(config: str | Mapping[str, Any]) -> dict[str, Any]:
    """A private deep copy of ``config``: a dict, or what DeepSpeed's own loader reads from a path (JSON/HJSON
    file) or base64 string."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, str):
        raise TypeError(f"a DeepSpeed config must be a dict or a path, got {type(config).__name__}")
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return load_ds_config(config)


def deepspeed_names() -> tuple[str, ...]:
    """DeepSpeed's own optimizer type names (lower case), from the installed DeepSpeed."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return tuple(DEEPSPEED_OPTIMIZERS)


def _is_deepspeed_name(name: str) -> bool:
    return name.lower() in deepspeed_names() or getattr(torch.optim, name, None) is not None


def _valid_choices() -> str:
    ours = ", ".join(f"{name} ({cls.__name__})" for name, cls in OPTIMIZERS.items())
    return (
        f"mgup_dist optimizers: {ours} (prefix 'mgup_dist.' for AdamW/Lion/Muon, which are also DeepSpeed names); "
        f"DeepSpeed's own: {', '.join(deepspeed_names())} or a torch.optim class name"
    )


def resolve_type(name: Any) -> type[RuleOptimizer] | None:
    """Our class for optimizer type ``name``, or None when ``name`` keeps DeepSpeed's meaning (see the module
    docstring). `ValueError` naming the valid choices for anything else."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"optimizer.type must be a non-empty string, got {name!r}; valid: {_valid_choices()}")
    if name.startswith(PREFIX):
        try:
            return optimizer_class(name[len(PREFIX):])
        except ValueError:
            raise ValueError(f"unknown optimizer type {name!r}; valid: {_valid_choices()}") from None
    if _is_deepspeed_name(name):
        return None
    try:
        return optimizer_class(name)
    except ValueError:
        raise ValueError(f"unknown optimizer type {name!r}; valid: {_valid_choices()}") from None


@dataclass(frozen=True)
class OptimizerSpec:
    """Our optimizer class and its hyperparameters, as the config gives them (validated)."""

    cls: type[RuleOptimizer]
    hparams: dict[str, Any]

    def build(self, params: Any) -> RuleOptimizer:
        """The optimizer over ``params`` (tensors or param groups)."""
        return self.cls(params, **self.hparams)


def optimizer_spec(config: Mapping[str, Any]) -> OptimizerSpec | None:
    """The `OptimizerSpec` of ``config``'s optimizer block, or None when it has none or names one of DeepSpeed's
    own optimizers. Raises before any model or DeepSpeed work when the block is malformed."""
    block = config.get("optimizer")
    if block is None:
        return None
    if not isinstance(block, Mapping) or "type" not in block:
        raise ValueError(
            f"the optimizer block must be an object with a 'type', got {block!r}; valid: {_valid_choices()}"
        )
    unknown = sorted(set(block) - {"type", "params"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the optimizer block; valid: ['params', 'type']")
    cls = resolve_type(block["type"])
    if cls is None:
        return None
    hparams = block.get("params", {})
    if not isinstance(hparams, Mapping):
        raise ValueError(f"optimizer.params of {cls.__name__} must be an object, got {hparams!r}")
    hparams = dict(hparams)
    check_unknown(hparams, cls.DEFAULTS, cls.__name__)
    missing = [key for key in REQUIRED_HPARAMS if key not in hparams]
    if missing:
        raise ValueError(f"optimizer.params of {cls.__name__} must set {missing} (no silent default learning rate)")
    validate_group({**cls.DEFAULTS, **hparams})
    return OptimizerSpec(cls, hparams)


@dataclass(frozen=True)
class Settings:
    """Our top-level ``"mgup_dist"`` section.

    ``gather_max_numel``: matrices larger than this that no rank holds whole are orthogonalised in the sharded
    Gram mode of `DistributedOrthogonalizer` (``None``: always gathered to one owner).
    ``build_shm_comm_op``: let DeepSpeed JIT-build its shared-memory comm op at initialize (35-43 s on a fresh
    CPU machine; it only serves ``inference_all_reduce``), instead of skipping it.
    """

    gather_max_numel: int | None = None
    build_shm_comm_op: bool = False

    def __post_init__(self) -> None:
        value = self.gather_max_numel
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{SECTION}.gather_max_numel must be null or a non-negative integer, got {value!r}")
        if not isinstance(self.build_shm_comm_op, bool):
            raise ValueError(f"{SECTION}.build_shm_comm_op must be true or false, got {self.build_shm_comm_op!r}")


def settings(config: Mapping[str, Any]) -> Settings:
    """`Settings` from ``config``'s ``"mgup_dist"`` section (defaults without one); unknown keys are an error."""
    section = config.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise ValueError(f"the {SECTION!r} section must be an object, got {section!r}")
    valid = sorted(f.name for f in fields(Settings))
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the {SECTION!r} section; valid: {valid}")
    return Settings(**section)


_OFFLOADS = ("offload_optimizer", "offload_param")


def check_supported(config: Mapping[str, Any]) -> None:
    """`ValueError` for DeepSpeed features the integration does not support with our optimizers: fp16 (untested
    here: CPUs lack fp16 kernels; use bf16), ZeRO offload (including SuperOffload) and ZenFlow, which step a
    copy of the state or run their own optimizer step."""
    if config.get("fp16", {}).get("enabled", False):
        raise ValueError("fp16 is not supported with mgup_dist optimizers (tested: fp32 and bf16); use \"bf16\"")
    zero = config.get("zero_optimization", {})
    for key in _OFFLOADS:
        offload = zero.get(key)
        if isinstance(offload, Mapping) and offload.get("device", "none") not in (None, "none"):
            raise ValueError(f"zero_optimization.{key} is not supported with mgup_dist optimizers")
    if zero.get("zenflow") is not None:
        raise ValueError("zero_optimization.zenflow is not supported with mgup_dist optimizers (it runs its own step)")


def deepspeed_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config to hand DeepSpeed along with our optimizer instance: a copy without the optimizer block and
    our section, with ``zero_allow_untested_optimizer`` set."""
    view = {key: copy.deepcopy(value) for key, value in config.items() if key not in ("optimizer", SECTION)}
    view["zero_allow_untested_optimizer"] = True
    return view
