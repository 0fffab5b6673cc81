"""Training harness for the DeepSpeed tests: a tiny GPT-like model, its data, DeepSpeed runs and the reference.

Importing this module points DeepSpeed at the CPU accelerator when there is no CUDA and its JIT cache at the
project's git-ignored ``.cache/``, before DeepSpeed is imported (spawned workers import it first).

A case is a DeepSpeed config (one of ``configs/deepspeed/*.json``, or a dict). `train_deepspeed` runs it on
the calling rank through `mgup_dist.deepspeed.initialize`: every rank builds the same model from a seed and
back-propagates its own micro-batch; DeepSpeed averages the gradients and steps our optimizer on its
partitions. `train_reference` runs the same steps in one process, the way DeepSpeed's arithmetic does them:

- the master weights are fp32; with bf16 they start as the bf16-rounded initial weights, forward and backward
  run on a bf16 copy of the model and the gradient is averaged in bf16 (DeepSpeed's default communication
  dtype for bf16) before it is cast to fp32;
- the average is ``(g_0 + g_1) / 2``: at two ranks the sum of two operands does not depend on the order and
  halving is exact, so it equals DeepSpeed's reduction bit for bit.

Run the reference in the same worker as the DeepSpeed ranks (same thread count: CPU matmul results depend on
it), so per-micro-batch gradients are bitwise the ranks' own.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.integrations.tiny_block import Block

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs" / "deepspeed"
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

VOCAB, WIDTH, HEADS, HIDDEN, TIME = 32, 16, 2, 40, 8
MICRO_BATCH = 2
STEPS = 5
SEED = 7
# The harness's batch shape, and no gradient clipping: DeepSpeed's clipping norm is a float sum across ranks
# (its own arithmetic, not ours), which would make the comparison approximate for every optimizer.
RUN_OVERRIDES = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
}


class SmallEmbedding(nn.Embedding):
    """An embedding initialised with std 0.1, inside its constructor (so also under ``zero.Init``, which
    partitions parameters as soon as their module is built)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.1)


class TinyGPT(nn.Module):
    """Token and position embeddings, two blocks, final norm, head tied to the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = SmallEmbedding(VOCAB, WIDTH)
        self.pos = SmallEmbedding(TIME, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH, HEADS, HIDDEN), Block(WIDTH, HEADS, HIDDEN)])
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


def make_model(zero_init: dict[str, Any] | None = None) -> TinyGPT:
    """The model from ``SEED``; built under ``deepspeed.zero.Init`` with config ``zero_init`` when given."""
    torch.manual_seed(SEED)
    if zero_init is None:
        return TinyGPT()
    import deepspeed

    import mgup_dist.deepspeed

    mgup_dist.deepspeed.skip_shm_build()  # zero.Init brings up deepspeed.comm before initialize does
    with deepspeed.zero.Init(config_dict_or_path=zero_init):
        return TinyGPT()


def batches(world_size: int) -> list[list[torch.Tensor]]:
    """``STEPS`` steps of one ``(MICRO_BATCH, TIME)`` token batch per rank."""
    gen = torch.Generator().manual_seed(99)
    return [
        [torch.randint(0, VOCAB, (MICRO_BATCH, TIME), generator=gen) for _ in range(world_size)] for _ in range(STEPS)
    ]


def load(name_or_config: str | dict[str, Any]) -> dict[str, Any]:
    """A config dict: a file name in ``configs/deepspeed`` or a dict (copied)."""
    if isinstance(name_or_config, dict):
        return copy.deepcopy(name_or_config)
    return json.loads((CONFIG_DIR / name_or_config).read_text())


def is_bf16(config: dict[str, Any]) -> bool:
    return bool(config.get("bf16", {}).get("enabled", False))


def reduce_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed averages gradients in: ``communication_data_type`` when set, else the model's (also
    with ``data_types.grad_accum_dtype = fp32``, whose fp32 buffers hold bf16 gradients)."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    default = "bf16" if is_bf16(config) else "fp32"
    return names[config.get("communication_data_type", default)]


def _model_params(engine: Any) -> list[torch.Tensor]:
    """The model's parameters, whole (gathered under ZeRO-3), as fp32 copies."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().clone() for p in params]


def _masters(engine: Any) -> list[torch.Tensor] | None:
    """The fp32 master weights of every model parameter, whole, through DeepSpeed's own APIs; None under
    ``round_robin_gradients``, where DeepSpeed's ``safe_get_full_fp32_param`` reads the wrong ranges (its
    ``_hp_mapping`` assumes the unreordered parameter order)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(engine.module.parameters())
    wrapper = engine.optimizer
    if isinstance(wrapper, FP16_UnfusedOptimizer):  # ZeRO-0 with bf16: per-parameter fp32 clones
        clones = {id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lps, hps)}
        return [clones[id(p)].detach().clone() for p in params]
    if engine.zero_optimization_stage() == 0:
        return [p.detach().clone() for p in params]
    if engine.zero_round_robin_gradients():
        return None
    return [safe_get_full_fp32_param(p).detach().clone() for p in params]


def _exp_avg(engine: Any) -> list[torch.Tensor] | None:
    """Every parameter's whole ``exp_avg`` through DeepSpeed's ``safe_get_full_optimizer_state`` (ZeRO 1-3, no
    round robin, Adam-family optimizers), else None."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0 or engine.zero_round_robin_gradients():
        return None
    if "exp_avg" not in next(iter(engine.optimizer.optimizer.state.values())):
        return None
    return [safe_get_full_optimizer_state(p, "exp_avg").clone() for p in engine.module.parameters()]


def _split_tensors(engine: Any) -> int | None:
    """How many tensors the engine's layout splits over more than one rank (None at ZeRO-0)."""
    if engine.zero_optimization_stage() == 0:
        return None
    layout = engine.optimizer.optimizer.distributor.layout
    return sum(1 for index in range(len(layout.shapes)) if sum(n > 0 for n in layout.lengths(index)) > 1)


@dataclass
class Run:
    """What one rank reports of a DeepSpeed run (all whole tensors, fp32, in ``model.parameters()`` order)."""

    params: list[torch.Tensor]
    masters: list[torch.Tensor] | None
    exp_avg: list[torch.Tensor] | None
    split_tensors: int | None


def train_deepspeed(
    rank: int, world_size: int, config: dict[str, Any], checkpoint: tuple[str, int] | None = None
) -> Run:
    """Trains the tiny model for ``STEPS`` steps under ``config`` on this rank. Harness keys, removed before
    DeepSpeed sees the config: ``"zero_init": true`` builds the model under ``deepspeed.zero.Init``;
    ``"as_callable": true`` passes the optimizer as ``optimizer=<callable>`` instead of in the config.

    ``checkpoint = (directory, k)``: after ``k`` steps, save with ``engine.save_checkpoint``, build a new engine
    over a freshly initialised model, ``load_checkpoint`` and run the remaining steps there.
    """
    import mgup_dist.deepspeed
    from mgup_dist.integrations.deepspeed_config import optimizer_spec

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    config = {**config, **RUN_OVERRIDES}
    config.pop("train_batch_size", None)
    zero_init = config if config.pop("zero_init", False) else None
    client = optimizer_spec(config).build if config.pop("as_callable", False) else None
    if client is not None:
        del config["optimizer"]

    def start() -> Any:
        model = make_model(zero_init)
        return mgup_dist.deepspeed.initialize(model=model, optimizer=client, config=config)[0]

    engine = start()
    for step, micro in enumerate(batches(world_size)):
        if checkpoint is not None and step == checkpoint[1]:
            engine.save_checkpoint(checkpoint[0], tag="resume")
            engine = start()
            engine.load_checkpoint(checkpoint[0], tag="resume")
        engine.backward(engine(micro[rank]))
        engine.step()
    return Run(_model_params(engine), _masters(engine), _exp_avg(engine), _split_tensors(engine))


def _average(grads: list[torch.Tensor]) -> torch.Tensor:
    total = grads[0].clone()
    for g in grads[1:]:
        total += g
    return total / len(grads)


@dataclass
class Reference:
    """The single-process run's fp32 masters and each parameter's ``exp_avg`` (None without one)."""

    masters: list[torch.Tensor]
    exp_avg: list[torch.Tensor | None]


def train_reference(world_size: int, config: dict[str, Any]) -> Reference:
    """The single-process run DeepSpeed must match (see the module docstring)."""
    from mgup_dist.integrations.deepspeed import default_params
    from mgup_dist.integrations.deepspeed_config import optimizer_spec

    master = make_model()
    spec = optimizer_spec(config)
    optimizer = spec.build(default_params(spec.cls, master))
    compute = copy.deepcopy(master).to(torch.bfloat16 if is_bf16(config) else torch.float32)
    with torch.no_grad():
        for m in master.parameters():
            m.copy_(m.to(compute.embed.weight.dtype))
    for micro in batches(world_size):
        per_rank = []
        for tokens in micro:
            with torch.no_grad():
                for c, m in zip(compute.parameters(), master.parameters()):
                    c.copy_(m)
            compute.zero_grad(set_to_none=True)
            compute(tokens).backward()
            per_rank.append([p.grad.clone() for p in compute.parameters()])
        for m, grads in zip(master.parameters(), zip(*per_rank)):
            m.grad = _average([g.to(reduce_dtype(config)) for g in grads]).float()
        optimizer.step()
    params = list(master.parameters())
    return Reference([p.detach().clone() for p in params], [optimizer.state[p].get("exp_avg") for p in params])
