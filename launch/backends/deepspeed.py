"""Backend ``deepspeed``: DeepSpeed ZeRO (stages 1-3, fp32 or bf16) through `mgup_dist.deepspeed.initialize`.

The DeepSpeed config is built from the run config: ``train_micro_batch_size_per_gpu`` is the launcher's
micro-batch, ``gradient_clipping`` is ``train.grad_clip``, and ``managed_gradient_accumulation`` is off with
``gradient_accumulation_steps`` 1: the launcher's loop owns the accumulation (it scales each micro-batch's loss
by 1/accum and calls ``loss.backward()``, which DeepSpeed's output hooks route through its backward), so every
DeepSpeed ``step()`` is a boundary that reduces the accumulated gradients and updates. DeepSpeed clips inside
that ``step()``, so `DeepSpeedEngine.clip_grad_norm` runs the step and reports DeepSpeed's global gradient norm
(``engine.get_global_grad_norm()``: the L2 norm of the averaged gradients before clipping, over all ranks);
`DeepSpeedEngine.step` then has nothing left to do.

Options: ``zero_stage`` (1, 2 or 3; stage 0 is plain data parallelism: use backend ``ddp``), ``bf16`` (bf16
weights and gradients with fp32 master weights), ``gather_max_numel`` (matrices larger than this run
Newton–Schulz sharded; null = always gather).

Skipped steps: a launcher step counts as skipped when DeepSpeed skipped it (its overflow check found a non-finite
gradient norm: ``engine.skipped_steps`` grew) or our optimizer's non-finite guard skipped any of the param groups
DeepSpeed stepped in it (`RuleOptimizer.skipped_steps` grew). The count is ``engine.optimizer.skipped_steps``
(kept on DeepSpeed's wrapper, which the loop reads and restores on resume like any optimizer's).

Checkpoints are in `mgup_dist.checkpoint`'s reshardable format at every ZeRO stage
(`mgup_dist.integrations.deepspeed_checkpoint`: whole model tensors, gathered at stage 3; per-tensor optimizer
state, param groups and DeepSpeed's fp32 master weights keyed by parameter FQN), so a run resumes at any world
size and zero stage, and from (or into) backends ``single``, ``ddp`` and ``zero``. A checkpoint of backend
``fsdp2`` (DTensor state) is a `LaunchError` naming the reason.
"""
from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn

from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.fsdp2 import MARKER_KEY as FSDP2_MARKER
from launch.backends.registry import register
from launch.errors import LaunchError
from mgup_dist.integrations import deepspeed_checkpoint
from mgup_dist.optim.base import RuleOptimizer

STAGES = (1, 2, 3)


def deepspeed_config(micro_batch: int, world_size: int, grad_clip: float, options: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config for this run (see the module docstring); ``options`` are the backend's options."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": bool(options["bf16"])},
        "zero_optimization": {"stage": options["zero_stage"]},
    }
    if options["gather_max_numel"] is not None:
        config["mgup_dist"] = {"gather_max_numel": options["gather_max_numel"]}
    return config


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine driven by the launcher's loop; ``model`` is the DeepSpeed engine itself (its forward
    registers the backward hooks DeepSpeed needs), ``optimizer`` DeepSpeed's wrapper around our ``client``."""

    def __init__(self, ds: Any, client: RuleOptimizer, grad_clip: float) -> None:
        self.ds = ds
        self.model = ds
        self.optimizer = ds.optimizer
        self.optimizer.skipped_steps = 0  # launcher steps skipped (see the module docstring)
        self.client = client
        self.grad_clip = grad_clip
        self._stepped = False

    def micro_step(self, sync: bool) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _step(self) -> None:
        """DeepSpeed's step, counting it in ``optimizer.skipped_steps`` if it was skipped."""
        ours, theirs = self.client.skipped_steps, self.ds.skipped_steps
        self.ds.step()
        if self.client.skipped_steps > ours or self.ds.skipped_steps > theirs:
            self.optimizer.skipped_steps += 1

    def clip_grad_norm(self, max_norm: float) -> float:
        """Runs DeepSpeed's step (reduce, clip to the configured ``gradient_clipping``, update); returns the
        global norm before clipping. ``max_norm`` must be the configured value."""
        if max_norm != self.grad_clip:
            raise LaunchError(f"DeepSpeed clips to {self.grad_clip} (its gradient_clipping), not to {max_norm}")
        self._step()
        self._stepped = True
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self) -> None:
        if not self._stepped:
            self._step()
        self._stepped = False

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return deepspeed_checkpoint.state_dict(self.ds.module, self.client)

    def load_checkpoint(self, path: str) -> None:
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        if FSDP2_MARKER in metadata:
            raise LaunchError(
                f"checkpoint {path} was written by backend fsdp2 (DTensor state, not mgup_dist.checkpoint's "
                "flattened format); resume it with backend fsdp2"
            )
        deepspeed_checkpoint.load_state_dict(self.ds.module, self.client, path)


@register
class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1/2/3 with an mgup_dist optimizer; see the module docstring."""

    name = "deepspeed"
    OPTIONS = {"zero_stage": 1, "bf16": False, "gather_max_numel": None}

    def check(self) -> None:
        stage = self.options["zero_stage"]
        if isinstance(stage, bool) or stage not in STAGES:
            raise LaunchError(
                f"backend_options.zero_stage must be one of {list(STAGES)}, got {stage!r} (stage 0: use backend ddp)"
            )
        if not isinstance(self.options["bf16"], bool):
            raise LaunchError(f"backend_options.bf16 must be true or false, got {self.options['bf16']!r}")
        limit = self.options["gather_max_numel"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise LaunchError(f"backend_options.gather_max_numel must be null or an integer >= 1, got {limit!r}")

    def build(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Engine:
        if self.env.device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from mgup_dist import deepspeed as mgup_deepspeed

        mgup_deepspeed.skip_shm_build()
        optimizer = make_optimizer(model)
        if any(group.get("is_approx") is False for group in optimizer.param_groups):
            raise LaunchError("backend deepspeed does not run MARS exact mode (is_approx: false); use backend ddp")
        config = deepspeed_config(self.micro_batch, self.env.world_size, self.grad_clip, self.options)
        ds, _, _, _ = mgup_deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return DeepSpeedEngine(ds, optimizer, self.grad_clip)
