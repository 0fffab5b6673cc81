"""Backend ``megatron``: Megatron-core's GPT model, DDP and distributed optimizer with an mgup_dist optimizer inside.

The model is Megatron's own ``GPTModel`` (`launch.megatron_model.MegatronGPT`), wrapped in Megatron's
``DistributedDataParallel`` (``use_distributed_optimizer=True``); the optimizer is
`mgup_dist.megatron.get_optimizer`, i.e. Megatron's ``DistributedOptimizer`` whose inner optimizer is the
configured mgup_dist optimizer stepping its 1-D main shards (optimizer state sharded over the data-parallel
ranks). Gradients accumulate over micro-batches in Megatron's buffers and are reduce-scattered once, on the last
micro-batch of a step (``finish_grad_sync``); clipping uses Megatron's global norm over the main gradients.

Supported: data parallelism over all ranks (tensor- and pipeline-parallel size 1), fp32. Megatron-core 0.16
hard-codes CUDA in its buffers, so this backend needs a CUDA device; on a CPU-only machine it refuses to start
(the project's tests run it on CPU under a test-only shim that stands in for the CUDA calls).

Checkpoints use `mgup_dist.checkpoint`'s reshardable format, keyed by ``GPTModel``'s own parameter names, so a
run resumes under ``megatron`` at any world size (the fp32 main shards are views of the fp32 parameters, so
loading the model restores them); its names differ from the launcher's GPT, so other backends refuse it.
"""
from __future__ import annotations

import contextlib
import importlib.util
from contextlib import AbstractContextManager
from typing import Any, Iterator

import torch
from torch import nn

from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.registry import register
from launch.errors import LaunchError
from launch.megatron_model import MegatronGPT
from launch.model import GPTShape
from mgup_dist.checkpoint import (
    load_model_state_dict, load_optimizer_state_dict, model_state_dict, optimizer_state_dict,
)


def _cuda_usable() -> bool:
    """True on a CUDA machine, or where a stand-in for Megatron's CUDA calls is installed (the test shim marks
    ``torch.cuda._mgup_dist_cpu_shim``)."""
    return torch.cuda.is_available() or bool(getattr(torch.cuda, "_mgup_dist_cpu_shim", False))


class MegatronEngine(Engine):
    """``model``: the `MegatronGPT` whose ``module`` is Megatron's DDP; ``chain``: the ``ChainedOptimizer`` that
    `mgup_dist.megatron.get_optimizer` returns; ``optimizer``: our inner optimizer (where the lr is set)."""

    def __init__(self, model: MegatronGPT, chain: Any) -> None:
        self.model = model
        self.chain = chain
        self.optimizer = chain.chained_optimizers[0].optimizer

    @contextlib.contextmanager
    def _sync_on_exit(self) -> Iterator[None]:
        yield
        self.model.module.finish_grad_sync()

    def micro_step(self, sync: bool) -> AbstractContextManager[Any]:
        return self._sync_on_exit() if sync else self.model.module.no_sync()

    def clip_grad_norm(self, max_norm: float) -> float:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self.chain.prepare_grads()  # model gradients -> fp32 main-shard gradients
        norm = float(self.chain.get_grad_norm())
        if max_norm > 0:
            params = [p for inner in self.chain.chained_optimizers for p in inner.get_parameters()]
            clip_grad_by_total_norm_fp32(params, max_norm, norm)
        return norm

    def step(self) -> None:
        self.chain.step_with_ready_grads()  # our step on the main shards, copy to the model, all-gather params

    def zero_grad(self) -> None:
        self.model.module.zero_grad_buffer()
        self.chain.zero_grad(set_to_none=True)

    def _gpt(self) -> nn.Module:
        """Megatron's ``GPTModel`` inside its DDP wrapper (names the checkpoint's entries)."""
        return self.model.module.module

    def state_dict(self) -> dict[str, Any]:
        gpt = self._gpt()
        return {**model_state_dict(gpt), **optimizer_state_dict(self.optimizer, gpt)}

    def load_checkpoint(self, path: str) -> None:
        gpt = self._gpt()
        load_model_state_dict(gpt, path, verify=False)  # launch.checkpoint.load verified the folder already
        load_optimizer_state_dict(self.optimizer, gpt, path, verify=False)


@register
class MegatronBackend(Backend):
    """Megatron-core data parallelism with its distributed optimizer; see the module docstring."""

    name = "megatron"
    OPTIONS: dict[str, Any] = {}

    def check(self) -> None:
        # find_spec, not import: importing megatron.core takes seconds and prints its warnings before the error
        if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
            raise LaunchError('backend megatron needs megatron-core: pip install -e ".[megatron]"')
        if not _cuda_usable():
            raise LaunchError(
                "backend megatron needs a CUDA device: megatron-core 0.16 allocates its gradient buffers and "
                "distributed optimizer on CUDA (use backend zero, ddp, deepspeed or fsdp2 on CPU)"
            )

    def make_model(self, shape: GPTShape) -> nn.Module:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)
        if torch.cuda.is_available():
            model_parallel_cuda_manual_seed(int(torch.initial_seed()) % 2**31)
        return MegatronGPT(shape)

    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig

        import mgup_dist.megatron

        if not isinstance(model, MegatronGPT):
            raise TypeError(f"backend megatron builds its own model (make_model), got {type(model).__name__}")
        ours = make_optimizer(model)  # validates the configured name and hyperparameters on the plain model
        if any(group.get("is_approx") is False for group in ours.param_groups):
            raise LaunchError("backend megatron does not run MARS exact mode (is_approx: false); use backend ddp")
        model.module = DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
            model.module,
        )
        hparams = dict(ours.defaults)  # the configured hyperparameters (group values equal the defaults)
        config = OptimizerConfig(
            use_distributed_optimizer=True, clip_grad=0.0, lr=hparams["lr"], weight_decay=hparams["weight_decay"]
        )
        chain = mgup_dist.megatron.get_optimizer(config, [model.module], type(ours).__name__, **hparams)
        return MegatronEngine(model, chain)
