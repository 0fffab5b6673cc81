"""`mgup_dist.megatron.get_optimizer` under Megatron's tensor and pipeline parallelism steps like one process.

Tensor parallelism (TP=2, and TP=2 × DP=2 on 4 ranks): a tiny GPT-like model made of Megatron's own layers,
a replicated embedding and LayerNorm, a ``ColumnParallelLinear`` MLP input (weight and bias split by rows),
a ``RowParallelLinear`` output (weight split by columns, bias replicated) and a ``ColumnParallelLinear`` head
(gathered output), wrapped in Megatron's ``DistributedDataParallel`` with the distributed optimizer, trained 5
steps on gloo under the test-only CPU shim. Megatron's CPU initialisation slices one full master weight, so the
logical (unsplit) model is known. Each step records every rank's local gradient before Megatron's reduction;
the reference is our single-process optimizer on the logical model fed the logical gradient Megatron reduces:
the tensor-parallel pieces concatenated along ``partition_dim`` and each data-parallel rank's gradient halved
then summed (bit for bit Megatron's, see test_megatron.py). So this checks the optimizer path exactly (the TP
model's own forward rounds differently from an unsplit one; that is Megatron's, not ours): parameters **bit for
bit** equal for MGUP-AdamW, MGUP-Muon and AlphaAdam (exact top-k with the global tie rule, Newton-Schulz of the
whole gathered matrix, exact counts), within 1e-6 relative for MARS-M (a float64 norm summed across ranks).
Megatron's gradient norm (``clip_grad`` set high enough never to clip) must equal the logical gradient's norm,
so its tensor-parallel replicas are counted once.

Pipeline parallelism (PP=2): each stage wraps its own half of the model's parameters (embedding, norm and
MLP input on stage 0; MLP output and head on stage 1) in Megatron's DDP and our optimizer, and steps them with
its own groups. Here both ranks compute the whole model's gradient in one process (the same arithmetic as the
reference), Megatron's DDP hooks take each stage's part, each stage steps, and the stages exchange their
updated parameters: the optimizer path under PP (per-stage groups and layouts, Megatron's gradient norm across
stages, our non-finite flag over all ranks). Megatron's real p2p pipeline schedule is run in
`tests/integrations/test_megatron_pipeline.py`.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mgup_dist
import mgup_dist.megatron
from tests.distributed import run_distributed

STEPS, VOCAB, WIDTH, HIDDEN = 5, 32, 16, 24
EXACT = ("mgup_adamw", "mgup_muon", "alpha_adam")
NAMES = EXACT + ("mars_m",)
HPARAMS = {"lr": 1e-2, "weight_decay": 0.1}
CLIP = 1e6  # Megatron computes the global gradient norm, never clips


class TinyParallelGPT(nn.Module):
    """Embedding → LayerNorm → column-parallel MLP input → GELU → row-parallel output (residual) →
    head; a plain ``nn.Linear`` version (``config=None``) is the logical model."""

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.ln = nn.Embedding(VOCAB, WIDTH), nn.LayerNorm(WIDTH)
        if config is None:
            self.fc, self.proj = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
            self.head = nn.Linear(WIDTH, VOCAB, bias=False)
            self.parallel = False
            return
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        init = nn.init.xavier_normal_
        self.fc = ColumnParallelLinear(WIDTH, HIDDEN, config=config, init_method=init, bias=True)
        self.proj = RowParallelLinear(
            HIDDEN, WIDTH, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
        )
        self.head = ColumnParallelLinear(
            WIDTH, VOCAB, config=config, init_method=init, bias=False, gather_output=True
        )
        self.head.weight.is_embedding_or_output_parameter = True
        self.parallel = True

    def layer(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)[0] if self.parallel else module(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens[:, :-1])
        x = x + self.layer(self.proj, F.gelu(self.layer(self.fc, self.ln(x))))
        logits = self.layer(self.head, x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _batch(step: int, dp_rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(100 * step + dp_rank))


def _configs(tp: int) -> tuple[Any, Any, Any]:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    model_config = TransformerConfig(
        num_layers=1, hidden_size=WIDTH, num_attention_heads=2, use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
    )
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    return model_config, ddp_config, OptimizerConfig(use_distributed_optimizer=True, clip_grad=CLIP, **HPARAMS)


def _reference_groups(name: str, params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    if name not in ("mgup_muon", "mars_m"):
        return [{"params": list(params.values())}]
    matrices = ("fc.weight", "proj.weight")
    return [
        {"params": [params[n] for n in matrices], "use_muon": True},
        {"params": [p for n, p in params.items() if n not in matrices], "use_muon": False},
    ]


def _reference(
    name: str, start: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Our single-process optimizer on the logical parameters ``start`` fed ``grads[step]``."""
    params = {n: p.clone() for n, p in start.items()}
    adam = {"betas": (0.9, 0.999), "eps": 1e-8} if name in ("mgup_adamw", "alpha_adam") else {}
    optimizer = mgup_dist.build_optimizer(name, _reference_groups(name, params), **HPARAMS, **adam)
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        optimizer.step()
    return params


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.stack([g.double().square().sum() for g in grads.values()]).sum().sqrt())


def _logical(param: torch.Tensor, tensor: torch.Tensor, tp: int, group: Any) -> torch.Tensor:
    """The whole logical tensor of ``tensor`` (this rank's piece, or replica, of ``param``)."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    pieces = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(pieces, tensor.detach().contiguous(), group=group)
    return torch.cat(pieces, dim=param.partition_dim)


def _copies(tensor: torch.Tensor, size: int, group: Any) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _sum_over(tensor: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """Sum over ``group`` of every rank's ``tensor``, in rank order (order-free for two ranks)."""
    parts = _copies(tensor, size, group)
    return parts[0] if size == 1 else parts[0] + parts[1]


def _train_tensor_parallel(name: str, tp: int, dp: int) -> dict[str, Any]:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel

    model_config, ddp_config, config = _configs(tp)
    tp_group, dp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_data_parallel_group()
    model = TinyParallelGPT(model_config)
    start = {n: _logical(p, p, tp, tp_group) for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model_config, ddp_config, model)
    optimizer = mgup_dist.megatron.get_optimizer(config, [ddp], name)
    grads, norms = [], []
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(_batch(step, parallel_state.get_data_parallel_rank())).backward()
        grads.append({
            n: _sum_over(_logical(p, p.main_grad, tp, tp_group) * (1.0 / dp), dp, dp_group)
            for n, p in model.named_parameters()
        })
        ddp.finish_grad_sync()
        norms.append(optimizer.step()[1])
    trained = {n: _logical(p, p, tp, tp_group) for n, p in model.named_parameters()}
    replicas_agree = all(
        all(torch.equal(t, copy) for copy in _copies(t, tp, tp_group)) for t in trained.values()
    )
    return {
        "replicas_agree": replicas_agree,
        "trained": trained, "reference": _reference(name, start, grads), "norms": norms,
        "reference_norms": [_norm(g) for g in grads], "start": start,
    }


def _tp_worker(rank: int, world_size: int, tp: int) -> dict[str, Any]:
    from tests.integrations import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tp, 1)
    return {name: _train_tensor_parallel(name, tp, world_size // tp) for name in NAMES}


def _check(run: dict[str, Any], name: str) -> None:
    trained, reference = run["trained"], run["reference"]
    assert run["replicas_agree"], "the tensor-parallel ranks' logical parameters differ"
    assert trained.keys() == reference.keys()
    for n in trained:
        assert not torch.equal(trained[n], run["start"][n]), f"{n} never moved"
        if name in EXACT:
            gap = (trained[n] - reference[n]).abs().max()
            assert torch.equal(trained[n], reference[n]), f"{name} {n}: differs by {gap}"
        else:
            torch.testing.assert_close(trained[n], reference[n], rtol=1e-6, atol=1e-7)
    norms, want = (torch.tensor(run[key], dtype=torch.float64) for key in ("norms", "reference_norms"))
    torch.testing.assert_close(norms, want, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def tp2() -> list[dict[str, Any]]:
    return run_distributed(2, _tp_worker, 2)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_parallel_matches_single_process(tp2: list[dict[str, Any]], name: str) -> None:
    for run in tp2:
        _check(run[name], name)


@pytest.fixture(scope="module")
def tp2_dp2() -> list[dict[str, Any]]:
    return run_distributed(4, _tp_worker, 2)


@pytest.mark.parametrize("name", ("mgup_adamw", "mgup_muon"))
def test_tensor_and_data_parallel_match_single_process(tp2_dp2: list[dict[str, Any]], name: str) -> None:
    for run in tp2_dp2:
        _check(run[name], name)


STAGES = (("wte", "ln", "fc"), ("proj", "head"))


def _train_pipeline_stage(name: str) -> dict[str, Any]:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel

    model_config, ddp_config, config = _configs(1)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    stage_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    model = TinyParallelGPT()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    chunk = nn.ModuleDict({k: getattr(model, k) for k in STAGES[stage]})
    ddp = DistributedDataParallel(model_config, ddp_config, chunk)
    optimizer = mgup_dist.megatron.get_optimizer(config, [ddp], name)
    grads, norms = [], []
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        model.zero_grad()
        model(_batch(step, 0)).backward()  # Megatron's hooks move this stage's gradients into its buffer
        grads.append({
            n: (p.main_grad if n.split(".")[0] in STAGES[stage] else p.grad).detach().clone()
            for n, p in model.named_parameters()
        })
        ddp.finish_grad_sync()
        norms.append(optimizer.step()[1])
        with torch.no_grad():
            for n, p in model.named_parameters():
                owner = next(s for s, owned in enumerate(STAGES) if n.split(".")[0] in owned)
                dist.broadcast(p.data, src=stage_ranks[owner])
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "replicas_agree": True, "trained": trained, "reference": _reference(name, start, grads), "norms": norms,
        "reference_norms": [_norm(g) for g in grads], "start": start,
    }


def _pp_worker(rank: int, world_size: int) -> dict[str, Any]:
    from tests.integrations import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 2)
    return {name: _train_pipeline_stage(name) for name in NAMES}


@pytest.fixture(scope="module")
def pp2() -> list[dict[str, Any]]:
    return run_distributed(2, _pp_worker)


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_parallel_matches_single_process(pp2: list[dict[str, Any]], name: str) -> None:
    for run in pp2:
        _check(run[name], name)
