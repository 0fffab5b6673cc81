"""``mgup_dist.deepspeed.initialize``: ``deepspeed.initialize`` with mgup_dist optimizers, selected by JSON.

Usage is DeepSpeed's, with our optimizer named in the config (`deepspeed_config` explains the names)::

    engine, optimizer, _, _ = mgup_dist.deepspeed.initialize(model=model, config="configs/deepspeed/....json")
    loss = engine(batch); engine.backward(loss); engine.step()

What `initialize` does around ``deepspeed.initialize``:

1. reads the config (a dict, a path, or ``args.deepspeed_config``) and, if its optimizer block names one of our
   optimizers, builds it over the model's real parameters: ``model_parameters`` when given, else
   ``muon_param_groups(model)`` for the Muon family and the trainable parameters otherwise. A `RuleOptimizer`
   passed as ``optimizer=`` (or returned by a callable passed there) is used as is; as with DeepSpeed, it
   overrides a DeepSpeed optimizer block in the config;
2. hands DeepSpeed the instance and a copy of the config without our blocks, with
   ``zero_allow_untested_optimizer`` set; by default it skips DeepSpeed's JIT build of the shared-memory comm
   op, which only ``inference_all_reduce`` uses (see `Settings.build_shm_comm_op`);
3. keeps our optimizer from stepping while DeepSpeed builds its wrapper (the bf16 ZeRO-0 wrapper initialises
   state with a zero-gradient step, which would otherwise count a step and apply weight decay);
4. `attach`-es the optimizer to the wrapper DeepSpeed chose, so each DeepSpeed step runs our rules on this
   rank's segments (`deepspeed_layout`, `deepspeed_state`), with the tensor-wide operations (top-k, sums,
   Newton-Schulz) over DeepSpeed's data-parallel group. At ZeRO-1/2 a step whose gradient norm DeepSpeed found
   finite skips our non-finite guard's scan and all-reduce (`finite_norm_check`).

DeepSpeed semantics stay DeepSpeed's: it averages (and, with ``gradient_clipping``, clips) the gradients before
our step, and at ZeRO stages 1-3 a parameter without a gradient is stepped with a zero gradient (DeepSpeed
fills it in), where a single process would skip it. Configs without one of our optimizers pass through to
``deepspeed.initialize`` unchanged. Supported: ZeRO
stages 0-3, fp32 and bf16 (also bf16 with fp32 gradient accumulation), under torchrun, the deepspeed launcher
and mpirun. Not supported (a clear error): fp16, ZeRO offload, ZenFlow, MoE expert groups, MARS exact mode.
"""
from __future__ import annotations

import copy
import importlib
import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mgup_dist.integrations.deepspeed_config import (
    SECTION, OptimizerSpec, Settings, check_supported, deepspeed_view, load_config, optimizer_spec, settings,
)
from mgup_dist.integrations.deepspeed_layout import (
    FlatPartition, bf16_partitions, check_cover, zero12_partitions, zero3_partitions,
)
from mgup_dist.integrations.deepspeed_state import FlatPartitionDistributor
from mgup_dist.ops.local import LocalOps
from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.distributor import LocalDistributor
from mgup_dist.optim.muon import MuonFamily
from mgup_dist.optim.param_groups import muon_param_groups
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.ops import ShardedOps
from mgup_dist.shard.orthogonalize import DistributedOrthogonalizer


def _resolve_config(args: Any, config: Any, config_params: Any) -> tuple[dict[str, Any], Any]:
    """The config dict (from ``config``, ``config_params`` or ``args.deepspeed_config``, as DeepSpeed accepts
    them) and ``args`` with ``deepspeed_config`` cleared, so DeepSpeed takes the config we pass."""
    if config is None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None)
    if from_args is not None:
        if config is not None:
            raise ValueError("got a config both in args.deepspeed_config and as an argument; pass only one")
        config = from_args
        args = copy.copy(args)
        args.deepspeed_config = None
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass config=... or args.deepspeed_config")
    return load_config(config), args


def default_params(cls: type[RuleOptimizer], model: nn.Module) -> list[Any]:
    """What a config-selected optimizer is built over when no ``model_parameters`` are given."""
    if issubclass(cls, MuonFamily):
        return muon_param_groups(model)
    return [p for p in model.parameters() if p.requires_grad]


def check_optimizer(optimizer: RuleOptimizer) -> None:
    """`ValueError` for optimizer settings the integration cannot honour."""
    for group in optimizer.param_groups:
        if group.get("is_approx") is False:
            raise ValueError(
                f"{type(optimizer).__name__} with is_approx=False (MARS exact mode) needs gradients outside the step "
                "(update_previous_grad), which DeepSpeed does not expose; use is_approx=True"
            )
        for param in group["params"]:
            if getattr(param, "use_muon", False):
                raise ValueError(
                    "a parameter carries a use_muon attribute, which makes DeepSpeed run its own Muon update on it; "
                    "mgup_dist routes parameters by param group ('use_muon' group key), so remove the attribute"
                )


class _NoStep:
    """Distributor while DeepSpeed builds its wrapper: stepping touches nothing."""

    sharded = False

    def __init__(self) -> None:
        self.ops = LocalOps()

    def segment_map(self, optimizer: torch.optim.Optimizer) -> dict:
        return {}

    def slots(self, optimizer: torch.optim.Optimizer) -> Iterator:
        return iter(())

    def any_rank(self, flag: torch.Tensor) -> bool:
        return bool(flag)


def skip_shm_build() -> None:
    """Makes DeepSpeed's communication backend skip the JIT build of its shared-memory comm op (35-43 s once
    per machine on CPU; the op only serves ``inference_all_reduce``, which then falls back to the process
    group). Takes effect for the next initialisation of ``deepspeed.comm``: call it before ``zero.Init`` or
    ``deepspeed.init_distributed`` when those come first; `initialize` calls it itself."""
    # `import deepspeed.comm.torch as m` would bind torch itself (deepspeed.comm has a `torch` attribute).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _one_group(groups: list[Any]) -> Any:
    if any(group is not groups[0] for group in groups):
        raise ValueError("param groups on different data-parallel groups (MoE experts?) are not supported")
    return groups[0]


def _wrappers() -> dict[type, tuple[Callable[[Any], list[FlatPartition]], str]]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {
        DeepSpeedZeroOptimizer: (zero12_partitions, "real_dp_process_group"),
        BF16_Optimizer: (bf16_partitions, "real_dp_process_group"),
        DeepSpeedZeroOptimizer_Stage3: (zero3_partitions, "sub_group_process_groups"),
    }


def attach(wrapper: Any, optimizer: RuleOptimizer, options: Settings = Settings()) -> None:
    """Points ``optimizer`` (the client optimizer DeepSpeed wrapped) at the partitions of ``wrapper``
    (``engine.optimizer``), with our ``options`` (the config's ``"mgup_dist"`` section). Collective over
    DeepSpeed's data-parallel group for the sharded wrappers: it checks that the ranks' segments cover every
    parameter exactly once.

    `initialize` calls it. An mgup_dist optimizer handed to plain ``deepspeed.initialize`` without it refuses to
    step DeepSpeed's flat partitions (they were never added to it); attaching afterwards still misses the
    suspension of `initialize`'s step 3 (bf16 at ZeRO-0)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if wrapper is optimizer or (type(wrapper) is FP16_UnfusedOptimizer and wrapper.optimizer is optimizer):
        # ZeRO-0: whole (averaged) gradients on every rank; bf16 swaps in fp32 clones of the same shapes.
        optimizer.registered_params.update(id(p) for group in optimizer.param_groups for p in group["params"])
        optimizer.distributor = LocalDistributor()
        return
    entry = _wrappers().get(type(wrapper))
    if entry is None or getattr(wrapper, "optimizer", None) is not optimizer:
        raise TypeError(f"cannot attach {type(optimizer).__name__} to DeepSpeed's {type(wrapper).__name__}")
    build, groups_attribute = entry
    comm = Collectives(_one_group(list(getattr(wrapper, groups_attribute))))
    partitions = build(wrapper)
    layout = check_cover(partitions, comm)
    ops = ShardedOps(comm, DistributedOrthogonalizer(comm, options.gather_max_numel, layout), layout)
    optimizer.distributor = FlatPartitionDistributor(ops, partitions, layout, finite_norm_check(wrapper))


def finite_norm_check(wrapper: Any) -> Callable[[], bool] | None:
    """For DeepSpeed's ZeRO-1/2 wrapper: a check that its gradient norm of the current step is finite, else None.

    ``DeepSpeedZeroOptimizer.step`` computes the L2 norm of all groups' gradient partitions and all-reduces it
    over the data-parallel group before it calls our ``step()`` (once per group); an inf/NaN norm becomes a
    negative sentinel (and, unless bf16 without ``check_grad_overflow``, a skipped step). A finite, non-negative
    ``_global_grad_norm`` is the same on every rank and shows that every gradient it summed is finite, and the
    clipping/unscaling after it multiplies by a finite factor <= 1. The norm leaves out pipeline-replicated
    parameters and, with a model-parallel unit, non-model-parallel parameters on model-parallel ranks > 0, so
    with either (or with ``compute_grad_norm`` off, or another wrapper) there is no check. The norm is set in
    the step that hands our optimizer its gradients (DeepSpeed clears them after each group's step)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(wrapper) is not DeepSpeedZeroOptimizer or not getattr(wrapper, "compute_grad_norm", False):
        return None
    params = [p for group in wrapper.bit16_groups for p in group]
    if wrapper.mpu is not None or any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return None

    def check() -> bool:
        norm = wrapper._global_grad_norm
        if norm is None:
            return False
        value = float(norm)
        return math.isfinite(value) and value >= 0
    return check


def _client_optimizer(spec: OptimizerSpec | None, optimizer: Any, model: nn.Module, params: Any) -> Any:
    """The optimizer to hand DeepSpeed: built from the config's ``spec``, else the caller's. A callable is
    called here, with what DeepSpeed would pass it, so that an mgup_dist optimizer it returns gets attached."""
    if spec is not None:
        if optimizer is not None:
            raise ValueError(f"the config selects {spec.cls.__name__} and an optimizer was passed too; pass only one")
        return spec.build(params if params is not None else default_params(spec.cls, model))
    if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params if params is not None else model.parameters())
    return optimizer


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    config: Any = None,
    config_params: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` (same arguments and result) with mgup_dist optimizers; see the module docstring."""
    import deepspeed

    if model is None:
        raise ValueError("deepspeed.initialize requires a model")
    config, args = _resolve_config(args, config, config_params)
    spec, ours_settings = optimizer_spec(config), settings(config)
    if model_parameters is not None:
        model_parameters = list(model_parameters)
    optimizer = _client_optimizer(spec, optimizer, model, model_parameters)
    call = dict(args=args, model=model, model_parameters=model_parameters, **kwargs)
    if not isinstance(optimizer, RuleOptimizer):
        if SECTION in config:
            raise ValueError(f"the config has a {SECTION!r} section but selects no mgup_dist optimizer")
        return deepspeed.initialize(optimizer=optimizer, config=config, **call)
    check_supported(config)
    check_optimizer(optimizer)
    if not ours_settings.build_shm_comm_op:
        skip_shm_build()
    previous, optimizer.distributor = optimizer.distributor, _NoStep()
    try:
        result = deepspeed.initialize(optimizer=optimizer, config=deepspeed_view(config), **call)
    finally:
        optimizer.distributor = previous
    attach(result[0].optimizer, optimizer, ours_settings)
    return result
