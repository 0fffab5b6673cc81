"""`mgup_dist.megatron.get_optimizer` under Megatron's real pipeline schedule (PP=2) steps like one process.

Two gloo ranks (CPU, test-only shim `tests.integrations.megatron_shim`) run megatron-core's
``get_forward_backward_func()`` — the non-interleaved 1F1B schedule, activations and their gradients sent between
the stages with Megatron's p2p code — over a tiny GPT-like model split in two: stage 0 holds the embedding and
the first residual MLP block, stage 1 the second block, the final LayerNorm and the head. Each stage is wrapped
in Megatron's ``DistributedDataParallel`` with the distributed optimizer; Megatron's ``finalize_model_grads``
finishes the gradients and our optimizer steps through the returned ``ChainedOptimizer``.

The reference is the same (unsplit) model in one process, fed the same micro-batches with the schedule's loss
(each micro-batch's mean cross-entropy divided by the number of micro-batches, gradients accumulated in order),
stepped by our single-process optimizer (``build_optimizer``; ``muon_param_groups`` for Muon). The pipeline
changes no arithmetic: each stage computes the same per-micro-batch gradients, Megatron's DDP accumulates them
into a zeroed fp32 buffer in micro-batch order just as autograd accumulates ``.grad``, and the data-parallel
reduction over one rank scales by 1. So parameters and losses must be **bit for bit** equal (measured: exact
for MGUP-AdamW, MGUP-Muon, AlphaAdam and MARS-M, Newton-Schulz in fp32, 4 steps of 4 micro-batches); any mis-routed micro-batch,
stage or gradient scale, or even a changed accumulation order, breaks that. Megatron's gradient norm (``clip_grad``
set high enough never to clip) is a float32 sum over both stages, ours a float64 one: measured within 5e-8
relative, asserted within 1e-6.

Patches beyond the shim: none — Megatron's p2p uses ``batch_isend_irecv`` (supported by gloo) and its
``device="cuda"`` buffers are redirected to the CPU by the shim. The model draws no random numbers (no
dropout), so the CUDA RNG tracker is never entered.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgup_dist
import mgup_dist.megatron
from tests.distributed import run_distributed

STEPS, MICRO_BATCHES, MICRO_BATCH, SEQ, VOCAB, WIDTH, HIDDEN = 4, 4, 2, 8, 32, 16, 24
NAMES = ("mgup_adamw", "mgup_muon", "alpha_adam", "mars_m")
MUON_FAMILY = ("mgup_muon", "mars_m")
HPARAMS = {"lr": 1e-2, "weight_decay": 0.1}
EXTRA = {"mgup_adamw": {"betas": (0.9, 0.999), "eps": 1e-8}, "mgup_muon": {"ns_dtype": torch.float32},
         "alpha_adam": {"betas": (0.9, 0.999), "eps": 1e-8}, "mars_m": {"ns_dtype": torch.float32}}
STAGES = (("wte", "block0"), ("block1", "ln_f", "head"))
CLIP = 1e6  # Megatron computes the global gradient norm, never clips


class Block(nn.Module):
    """Pre-LayerNorm residual MLP: ``x + proj(gelu(fc(ln(x))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.proj = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class StageModel(nn.Module):
    """Stage ``parts`` of the model (one entry of `STAGES`, or both concatenated: the whole model), initialised
    identically on every rank. Follows Megatron's ``set_input_tensor`` protocol: a stage without the embedding reads the previous
    stage's activation, ``[SEQ, MICRO_BATCH, WIDTH]``; a stage without the head returns its activation in that
    layout; the last stage returns logits ``[MICRO_BATCH, SEQ, VOCAB]``."""

    def __init__(self, parts: tuple[str, ...]) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        torch.manual_seed(0)
        full = {"wte": nn.Embedding(VOCAB, WIDTH), "block0": Block(), "block1": Block(), "ln_f": nn.LayerNorm(WIDTH),
                "head": nn.Linear(WIDTH, VOCAB, bias=False)}
        full["head"].weight.is_embedding_or_output_parameter = True
        for name in parts:
            self.add_module(name, full[name])
        self.parts, self.model_type, self.input_tensor = parts, ModelType.encoder_or_decoder, None
        # What Megatron's finalize_model_grads reads of a language model: untied embedding and head.
        self.pre_process, self.post_process = "wte" in parts, "head" in parts
        self.share_embeddings_and_output_weights = False

    def set_input_tensor(self, input_tensor: Any) -> None:
        """Megatron's hook: the activation received from the previous stage (a one-element list or a tensor)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if "wte" in self.parts:
            boundary = self.block0(self.wte(tokens[:, :-1])).transpose(0, 1).contiguous()
            if "head" not in self.parts:
                return boundary
        else:
            boundary = self.input_tensor
        return self.head(self.ln_f(self.block1(boundary.transpose(0, 1))))


def _micro_batches(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator) for _ in range(MICRO_BATCHES)]


def _loss(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _forward_step(data: Iterator[torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, Any]:
    tokens = next(data)

    def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = _loss(tokens, logits)
        return loss, {"loss": loss.detach().clone()}

    return model(tokens), loss_func


def _configs() -> tuple[Any, Any, Any]:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    model_config = TransformerConfig(
        num_layers=2, hidden_size=WIDTH, num_attention_heads=2, use_cpu_initialization=True,
        pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
    )
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    return model_config, ddp_config, OptimizerConfig(use_distributed_optimizer=True, clip_grad=CLIP, **HPARAMS)


def _train_stage(name: str, stage: int) -> dict[str, Any]:
    """Trains this rank's stage `STEPS` steps with Megatron's schedule; returns its start and trained
    parameters, the last stage's per-micro-batch losses and Megatron's gradient norms."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    model_config, ddp_config, config = _configs()
    model = StageModel(STAGES[stage])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model_config, ddp_config, model)
    model_config.no_sync_func, model_config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    optimizer = mgup_dist.megatron.get_optimizer(config, [ddp], name, **EXTRA[name])
    forward_backward = get_forward_backward_func()
    losses, norms = [], []
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=_forward_step, data_iterator=iter(_micro_batches(step)), model=[ddp],
            num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
        )
        losses.append([float(r["loss"]) for r in reduced])
        success, norm, _ = optimizer.step()
        assert success, f"step {step} was skipped"
        norms.append(norm)
    return {"start": start, "trained": {n: p.detach().clone() for n, p in model.named_parameters()},
            "losses": losses, "norms": norms, "schedule": forward_backward.__name__}


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    from tests.integrations import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, world_size)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    return {name: _train_stage(name, stage) for name in NAMES}


def _reference(name: str) -> dict[str, Any]:
    """The unsplit model trained by our single-process optimizer on the same micro-batches and loss."""
    model = StageModel(STAGES[0] + STAGES[1])
    groups = mgup_dist.muon_param_groups(model) if name in MUON_FAMILY else [{"params": list(model.parameters())}]
    optimizer = mgup_dist.build_optimizer(name, groups, **HPARAMS, **EXTRA[name])
    losses, norms = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        step_losses = []
        for tokens in _micro_batches(step):
            loss = _loss(tokens, model(tokens))
            step_losses.append(float(loss.detach()))
            (loss / MICRO_BATCHES).backward()
        losses.append(step_losses)
        norms.append(float(torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt()))
        optimizer.step()
    return {"trained": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses,
            "norms": norms}


@pytest.fixture(scope="module")
def pipeline() -> list[dict[str, Any]]:
    return run_distributed(2, _worker)


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_schedule_matches_single_process(pipeline: list[dict[str, Any]], name: str) -> None:
    stages, reference = [run[name] for run in pipeline], _reference(name)
    assert all(s["schedule"] == "forward_backward_pipelining_without_interleaving" for s in stages)
    trained = {**stages[0]["trained"], **stages[1]["trained"]}
    assert trained.keys() == reference["trained"].keys()
    assert not set(stages[0]["trained"]) & set(stages[1]["trained"]), "a parameter lives on both stages"
    for n, want in reference["trained"].items():
        start = stages[0]["start"].get(n, stages[1]["start"].get(n))
        assert not torch.equal(trained[n], start), f"{n} never moved"
        gap = (trained[n] - want).abs().max()
        assert torch.equal(trained[n], want), f"{name} {n}: differs by {gap}"
    assert stages[0]["losses"] == [[]] * STEPS, "only the last stage computes losses"
    assert stages[1]["losses"] == reference["losses"]
    for stage in stages:  # Megatron's norm spans both stages' gradients
        torch.testing.assert_close(torch.tensor(stage["norms"], dtype=torch.float64),
                                   torch.tensor(reference["norms"], dtype=torch.float64), rtol=1e-6, atol=0)
