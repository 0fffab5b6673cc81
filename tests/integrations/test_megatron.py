"""`mgup_dist.megatron.get_optimizer` inside Megatron-core's DistributedOptimizer trains like one process.

A tiny GPT-like model (embedding, one pre-norm block, final norm, head; sized so that Megatron's buffer split
cuts a weight matrix between the ranks) is wrapped in Megatron's ``DistributedDataParallel`` with
``use_distributed_optimizer=True`` on 2 gloo data-parallel ranks (TP=PP=1, under the test-only CPU shim,
`tests.integrations.megatron_shim`) and trained 5 steps on different batches per rank, in fp32 and, for two
optimizers, with bf16 parameters and Megatron's fp32 main shards. In the same worker a plain copy of the model
is trained by our single-process optimizer on fp32 masters with the gradient Megatron produces: each rank's
batch gradient in fp32, halved, then summed (Megatron scales by 1/DP before its reduce-scatter; halving is exact
and a two-operand sum is order-free, so this is bit for bit Megatron's gradient).

Expected: parameters **bit for bit** equal for MGUP-AdamW (exact top-k), MGUP-Muon (Newton-Schulz on the
gathered matrix) and AlphaAdam (exact int64 aligned count); **within 1e-6 relative** for MARS-M, whose clip
norm is a float64 sum across ranks in another order than one process sums it.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgup_dist
import mgup_dist.megatron
from tests.distributed import run_distributed
from tests.integrations.tiny_block import Block

WORLD, STEPS, VOCAB, WIDTH = 2, 5, 32, 24
EXACT = ("mgup_adamw", "mgup_muon", "alpha_adam")
CLOSE = ("mars_m",)
HPARAMS = {"lr": 1e-2, "weight_decay": 0.1}
CASES = [(name, torch.float32) for name in EXACT + CLOSE]
CASES += [(name, torch.bfloat16) for name in ("mgup_adamw", "mgup_muon")]


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.block = Block(WIDTH, heads=2, hidden=2 * WIDTH)
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln_f(self.block(self.wte(tokens[:, :-1]))))
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(100 * step + rank))


def _model(dtype: torch.dtype = torch.float32) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().to(dtype)


def _train_megatron(name: str, rank: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], int]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    model = _model(dtype)
    bf16 = dtype == torch.bfloat16
    ddp = DistributedDataParallel(
        TransformerConfig(num_layers=1, hidden_size=WIDTH, num_attention_heads=2, bf16=bf16),
        DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        model,
    )
    config = OptimizerConfig(use_distributed_optimizer=True, clip_grad=0.0, bf16=bf16, **HPARAMS)
    optimizer = mgup_dist.megatron.get_optimizer(config, [ddp], name)
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(_batch(step, rank)).backward()
        ddp.finish_grad_sync()
        optimizer.step()
    layout = optimizer.chained_optimizers[0].optimizer.distributor.layouts[0]
    held = [[hi > lo for lo, hi in ranges] for ranges in layout.bounds]
    straddling = sum(all(column) for column in zip(*held))
    return [p.detach().clone() for p in model.parameters()], straddling


def _train_reference(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Megatron's arithmetic in one process: fp32 masters (the parameters themselves in fp32), each rank's
    gradient in fp32 halved then summed, masters rounded into the model after each step."""
    model = _model(dtype)
    masters = {id(p): p.detach().float().clone() for p in model.parameters()}
    groups = mgup_dist.muon_param_groups(model) if name in ("mgup_muon", "mars_m") else [{"params": model.parameters()}]
    groups = [{**g, "params": [masters[id(p)] for p in g["params"]]} for g in groups]
    optimizer = mgup_dist.build_optimizer(name, groups, **HPARAMS, **_adam_hparams(name))
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD):
            model.zero_grad()
            model(_batch(step, rank)).backward()
            grads.append([p.grad.float() * (1.0 / WORLD) for p in model.parameters()])
        for param, (g0, g1) in zip(model.parameters(), zip(*grads)):
            masters[id(param)].grad = g0 + g1
        optimizer.step()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(masters[id(param)])
    return [p.detach().clone() for p in model.parameters()]


def _adam_hparams(name: str) -> dict[str, Any]:
    """What `get_optimizer` takes from Megatron's default OptimizerConfig (adam_beta1/2, adam_eps)."""
    return {"betas": (0.9, 0.999), "eps": 1e-8} if name in ("mgup_adamw", "alpha_adam") else {}


def _worker(rank: int, world_size: int) -> dict[Any, Any]:
    from tests.integrations import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    results = {}
    for name, dtype in CASES:
        trained, straddling = _train_megatron(name, rank, dtype)
        results[name, dtype] = (trained, _train_reference(name, dtype), straddling)
    return results


def test_rejects_unknown_optimizer_and_plain_ddp() -> None:
    from megatron.core.optimizer import OptimizerConfig

    with pytest.raises(ValueError, match="unknown optimizer"):
        mgup_dist.megatron.get_optimizer(OptimizerConfig(use_distributed_optimizer=True), [], "sgdw")
    with pytest.raises(ValueError, match="use_distributed_optimizer=True"):
        mgup_dist.megatron.get_optimizer(OptimizerConfig(use_distributed_optimizer=False), [], "mgup_adamw")


@pytest.fixture(scope="module")
def runs() -> list[dict[Any, Any]]:
    return run_distributed(WORLD, _worker)


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_data_parallel_matches_single_process(runs: list[dict[Any, Any]], name: str, dtype: torch.dtype) -> None:
    initial = [p.detach() for p in _model(dtype).parameters()]
    for rank, results in enumerate(runs):
        trained, reference, straddling = results[name, dtype]
        assert straddling >= 1, "no tensor was split across both ranks; the test would not exercise sharding"
        assert len(trained) == len(reference) == len(initial)
        assert all(not torch.equal(got, start) for got, start in zip(trained, initial)), "a parameter never moved"
        for got, want in zip(trained, reference):
            assert got.dtype == dtype
            if name in EXACT:
                assert torch.equal(got, want), f"rank {rank}: {name} differs by {(got - want).abs().max()}"
            else:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
