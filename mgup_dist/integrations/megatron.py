"""``get_optimizer``: Megatron-core's ``get_megatron_optimizer`` with an mgup_dist optimizer inside.

Mirrors ``megatron.core.optimizer.get_megatron_optimizer`` (megatron-core 0.16.x): the same parameter groups
(Megatron's weight-decay / learning-rate overrides, ``wd_mult``/``lr_mult`` keys for its scheduler), the same
process groups and the same wrapper, Megatron's ``DistributedOptimizer`` (``use_distributed_optimizer=True``),
whose inner optimizer is ours. Megatron then hands our optimizer 1-D main shards of the parameters; the
`MegatronShardDistributor` maps each to its `Segment` and our tensor-wide operations (top-k masks, norms,
Newton-Schulz on the gathered matrix) run over Megatron's data-parallel group, so the update equals the
single-process one (see `tests/integrations/test_megatron.py`).

Hyperparameters: ``lr`` and ``weight_decay`` come from the ``OptimizerConfig``, and so do ``betas`` /
``eps`` (``adam_beta1``, ``adam_beta2``, ``adam_eps``) for optimizers that take them; the Muon family's
AdamW path keeps its own ``adamw_betas`` / ``adamw_eps``. Keyword ``hparams`` override all of these.
Muon-family optimizers route a parameter to the matrix path iff its logical shape has ``ndim >= 2`` and it is
not an embedding or output layer (Megatron's ``is_embedding_or_output_parameter``, or as `muon_param_groups`
finds them in a plain module).

Tensor parallelism: the logical tensor of a split parameter is the whole matrix (the tensor-parallel pieces
concatenated along ``partition_dim``), and our operations act on it: top-k masks with the global tie rule,
Newton-Schulz of the whole matrix gathered to one owner, sums over all pieces. So TP=2 gives the update TP=1
gives for the same gradient (bit for bit; `tests/integrations/test_megatron_parallel.py`). Split parameters are
sharded over the tensor-and-data-parallel group (row-parallel weights as column-block segments); parameters
each tensor-parallel rank holds whole (norms, row-parallel biases) over the data-parallel group, each rank
stepping its identical replica. Caveat: with gated linear units (SwiGLU) Megatron's ``linear_fc1`` pieces are
``[gate_t; up_t]`` per rank, so their concatenation is a row permutation of the TP=1 weight: the update is the
same up to that permutation's effect on Newton-Schulz rounding and on top-k tie order.

Pipeline parallelism: each stage's optimizer steps its own parameters over its own groups; Megatron's gradient
norm (clipping) spans the stages as in Megatron, and our non-finite flag is ORed over every rank of the
distributed-optimizer instance, so all stages skip a step together.

Supported: DP, TP (stride-1 splits of dim 0 or 1), PP and their products, dense parameters (no MoE expert
parallelism, no virtual pipeline stages), Megatron's DDP with ``use_distributed_optimizer=True``. Tested on
gloo: DP=2, TP=2, TP=2 × DP=2, PP=2 (the PP test drives the stages by hand, not Megatron's p2p schedule);
sequence and context parallelism are untested. Megatron needs CUDA; on CPU it only runs under a test shim.

Checkpoints: `mgup_dist.checkpoint.optimizer_state_dict(inner, module)` / `load_optimizer_state_dict` (``inner``
is ``chain.chained_optimizers[0].optimizer``, ``module`` the unwrapped model naming the parameters) save and
reload the state reshardably under data parallelism (any DP size; the launcher's ``megatron`` backend does
this). Under TP or PP they raise `NotImplementedError`. Parameters kept in 16-bit have fp32 main copies that
this state does not include.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mgup_dist.integrations.megatron_state import MegatronShardDistributor, check_cover, shard_entries
from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.muon import MuonFamily
from mgup_dist.optim.param_groups import muon_param_groups
from mgup_dist.optim.registry import optimizer_class
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.ops import RoutedOps, ShardedOps
from mgup_dist.shard.orthogonalize import DistributedOrthogonalizer


def _check_supported(config: Any, model_chunks: Sequence[Any]) -> None:
    from megatron.core import parallel_state

    if not config.use_distributed_optimizer:
        raise ValueError("mgup_dist.megatron.get_optimizer needs OptimizerConfig(use_distributed_optimizer=True)")
    if config.use_precision_aware_optimizer or config.optimizer_cpu_offload:
        raise ValueError("use_precision_aware_optimizer and optimizer_cpu_offload are not supported")
    if not model_chunks or any(not getattr(c, "ddp_config", None) for c in model_chunks):
        raise TypeError("model_chunks must be a non-empty list of Megatron DistributedDataParallel modules")
    if any(c.ddp_config.use_megatron_fsdp or not c.ddp_config.use_distributed_optimizer for c in model_chunks):
        raise ValueError("wrap the model with DistributedDataParallelConfig(use_distributed_optimizer=True), no FSDP")
    if parallel_state.get_expert_model_parallel_world_size() != 1:
        raise NotImplementedError("expert parallelism (MoE) is not supported yet")
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
        raise NotImplementedError("virtual (interleaved) pipeline stages are not supported yet")


def _matrix_ids(model_chunks: Sequence[torch.nn.Module]) -> set[int]:
    """ids of the parameters taking the Muon family's matrix path."""
    ids = set()
    for chunk in model_chunks:
        for group in muon_param_groups(chunk):
            if group["use_muon"]:
                ids.update(id(p) for p in group["params"] if not getattr(p, "is_embedding_or_output_parameter", False))
    return ids


def _split_for_muon(groups: list[dict[str, Any]], matrix: set[int]) -> list[dict[str, Any]]:
    """Each Megatron group split in two, ``use_muon`` True then False (empty halves kept: every rank must build
    the same groups)."""
    split = []
    for group in groups:
        for use_muon in (True, False):
            params = [p for p in group["params"] if (id(p) in matrix) == use_muon]
            split.append({**group, "params": params, "use_muon": use_muon})
    return split


def _config_hparams(cls: type[RuleOptimizer], config: Any) -> dict[str, Any]:
    """The hyperparameters ``config`` sets for ``cls`` (a ``None`` in the config leaves our default)."""
    hparams = {"lr": config.lr, "weight_decay": config.weight_decay}
    if "betas" in cls.DEFAULTS:
        hparams["betas"] = (config.adam_beta1, config.adam_beta2)
    if "eps" in cls.DEFAULTS:
        hparams["eps"] = config.adam_eps
    return {key: value for key, value in hparams.items() if value is not None}


def _grad_scaler(config: Any) -> Any:
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale, growth_factor=2.0,
            backoff_factor=0.5, growth_interval=config.loss_scale_window, hysteresis=config.hysteresis,
        )
    return None


def _distributed_optimizer(
    inner: RuleOptimizer, config: Any, model_chunks: Sequence[Any], buffers: Any, groups: dict[str, Any]
) -> Any:
    """Megatron's ``DistributedOptimizer`` with ``inner`` as its inner optimizer, stepping main shards.

    Megatron 0.16 accepts only Adam-type inner optimizers (an isinstance check made for its checkpoint format),
    so it is built around a stateless ``torch.optim.AdamW`` placeholder over the same groups, in the same order;
    the main shards it puts in the placeholder's groups then move into ``inner``'s groups, and ``inner``
    replaces the placeholder. Collective over all ranks."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    placeholder = torch.optim.AdamW([{"params": list(g["params"])} for g in inner.param_groups], lr=0.0)
    wrapper = DistributedOptimizer(
        placeholder, config, _grad_scaler(config), None,
        model_chunks=list(model_chunks), per_model_buffers=buffers,
        data_parallel_group=groups["intra_dp_cp_group"], data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
        data_parallel_group_idx=torch.distributed.get_rank(groups["mp_group"]), distributed_optimizer_instance_id=0,
    )
    for ours, theirs in zip(inner.param_groups, wrapper.optimizer.param_groups, strict=True):
        ours["params"] = list(theirs["params"])
    wrapper.optimizer = inner
    return wrapper


def get_optimizer(
    config: Any,
    model_chunks: Sequence[torch.nn.Module],
    optimizer_name: str = "mgup_adamw",
    config_overrides: dict[Any, Any] | None = None,
    use_gloo_process_groups: bool = True,
    **hparams: Any,
) -> Any:
    """A Megatron ``ChainedOptimizer`` (as ``get_megatron_optimizer`` returns) around one ``DistributedOptimizer``
    whose inner optimizer is mgup_dist's ``optimizer_name`` (e.g. ``"mgup_adamw"``, ``"mgup_muon"``,
    ``"alpha_adam"``, ``"mars_m"``). ``config``: Megatron's ``OptimizerConfig`` (its ``optimizer`` field is
    ignored); ``model_chunks``: the model's Megatron ``DistributedDataParallel`` chunks; ``config_overrides``
    as in Megatron. Collective over all ranks (called on every rank after
    ``parallel_state.initialize_model_parallel``)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import ChainedOptimizer, _get_param_groups_and_buffers
    from megatron.core.process_groups_config import ProcessGroupCollection

    cls = optimizer_class(optimizer_name)
    _check_supported(config, model_chunks)
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(None, model_chunks, use_gloo_process_groups)
    param_groups, buffers = _get_param_groups_and_buffers(
        list(model_chunks), 0, config, config_overrides, lambda g: True, "buffers"
    )
    if any(g["is_expert_parallel"] and g["params"] for g in param_groups):
        raise NotImplementedError("expert-parallel (MoE) parameters are not supported yet")
    param_groups = [g for g in param_groups if not g["is_expert_parallel"]]
    if issubclass(cls, MuonFamily):
        param_groups = _split_for_muon(param_groups, _matrix_ids(model_chunks))
    model_params = [list(g["params"]) for g in param_groups]
    inner = cls(param_groups, **{**_config_hparams(cls, config), **hparams})
    wrapper = _distributed_optimizer(inner, config, model_chunks, buffers, groups)
    wrapper.grad_stats_parallel_group = groups["intra_dist_opt_group"]
    wrapper.tp_group = parallel_state.get_tensor_model_parallel_group()
    inner.distributor = _distributor(wrapper, model_params, groups)
    return ChainedOptimizer([wrapper])


def _distributor(wrapper: Any, model_params: list[list[torch.Tensor]], groups: dict[str, Any]) -> Any:
    """Our distributor over ``wrapper``'s main shards: tensor-parallel pieces over the tensor-and-data-parallel
    group, everything else over the data-parallel group (one group when TP=1), the non-finite flag over the
    whole distributed-optimizer instance. Collective (cover checks)."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    refusal = None
    if (tp_size, pp_size) != (1, 1):
        refusal = (
            f"mgup_dist.checkpoint supports Megatron's distributed optimizer under data parallelism only, not at "
            f"TP={tp_size}, PP={pp_size} (parameter names there denote per-rank pieces or repeat across stages)"
        )
    entries = shard_entries(wrapper, model_params, parallel_state.get_tensor_model_parallel_rank(), tp_size)
    dp = Collectives(groups["intra_dp_cp_group"])
    flags = Collectives(groups["intra_dist_opt_group"])
    if tp_size == 1:
        ops = ShardedOps(dp, DistributedOrthogonalizer(dp))
        return MegatronShardDistributor(ops, entries, [check_cover(entries, dp)], flags, refusal)
    tp_dp = Collectives(parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
    comms = (dp, tp_dp)
    layouts = [check_cover([e for e in entries if e.tensor_parallel == bool(k)], c) for k, c in enumerate(comms)]
    route = [int(e.tensor_parallel) for e in entries]
    ops = RoutedOps([ShardedOps(c, DistributedOrthogonalizer(c)) for c in comms], route, flags)
    return MegatronShardDistributor(ops, entries, layouts, flags, refusal)
