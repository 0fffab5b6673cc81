"""`ZeroEngine` trains a small model at W ranks to the same parameters as one process.

The single-process reference runs inside rank 0 (same thread count, so per-micro-batch gradients are bitwise
identical to the ranks'): it computes each rank's micro-batch gradient, averages them as the reduction does
(sum in rank order, then divide by W), and steps a plain optimizer. At W=2 the sum of two operands is
order-free, so elementwise, top-k and gathered Newton–Schulz paths must agree bit for bit; a float64 norm that
crosses ranks (MARS) is held to 1e-6 relative.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mgup_dist
from mgup_dist.zero import RankRegions, ZeroEngine, build_layout
from tests.distributed import run_distributed

STEPS = 5
BITWISE = ("adamw", "lion", "muon", "mgup_adamw", "cmgup_adamw", "mgup_lion", "mgup_muon", "alpha_adam")
NORM_CROSSING = ("mars_adamw", "mars_m")


class TinyLM(nn.Module):
    """Embedding, two blocks with a conv-free MLP and LayerNorm, tied head: mixed 1-D/2-D shapes."""

    def __init__(self, vocab: int = 29, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 3 * dim)
        self.down = nn.Linear(3 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(x)


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _build(name: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    family = name in ("muon", "mgup_muon", "mars_m")
    params = mgup_dist.muon_param_groups(model) if family else model.parameters()
    hp = {"ns_dtype": "float32"} if family else {}
    if name not in ("lion", "mgup_lion"):
        hp["weight_decay"] = 0.05
    return model, mgup_dist.build_optimizer(name, params, lr=0.01, **hp)


def _batches(world_size: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    return [[torch.randint(0, 29, (3, 9), generator=gen) for _ in range(world_size)] for _ in range(STEPS)]


def _averaged_grads(model: nn.Module, micro: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """The engines' gradient: each rank's micro-batch gradient in float32, summed in rank order, over W."""
    grads = []
    for tokens in micro:
        model.zero_grad(set_to_none=True)
        _loss(model, tokens).backward()
        grads.append([p.grad.float() for p in model.parameters()])
    averaged = []
    for per_rank in zip(*grads):
        total = per_rank[0].clone()
        for g in per_rank[1:]:
            total += g
        averaged.append(total / world_size)
    return averaged


def _reference(name: str, world_size: int) -> list[torch.Tensor]:
    model, opt = _build(name, seed=7)
    for micro in _batches(world_size):
        for p, grad in zip(model.parameters(), _averaged_grads(model, micro, world_size)):
            p.grad = grad
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train(rank: int, world_size: int, cases: list[tuple[str, int, str]]) -> list[tuple[list, list | None]]:
    out = []
    for name, stage, layout in cases:
        model, opt = _build(name, seed=7)
        engine = ZeroEngine(model, opt, stage=stage, layout=layout)
        for micro in _batches(world_size):
            engine.zero_grad()
            _loss(model, micro[rank]).backward()
            engine.step()
        mine = [p.detach().clone() for p in model.parameters()]
        out.append((mine, _reference(name, world_size) if rank == 0 else None))
    return out


def _compare(results: list, cases: list[tuple[str, int, str]]) -> None:
    for case_index, (name, stage, layout) in enumerate(cases):
        reference = results[0][case_index][1]
        for rank, rank_results in enumerate(results):
            params = rank_results[case_index][0]
            for i, (got, want) in enumerate(zip(params, reference)):
                where = f"{name} stage {stage} {layout} rank {rank} tensor {i}"
                if name in NORM_CROSSING:
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=where)
                else:
                    assert torch.equal(got, want), where


@pytest.mark.parametrize("layout", ["flat", "layerwise"])
def test_stage2_matches_single_process_every_optimizer(layout: str) -> None:
    cases = [(name, 2, layout) for name in (*BITWISE, *NORM_CROSSING)]
    _compare(run_distributed(2, _train, cases), cases)


def test_stage1_matches_single_process() -> None:
    cases = [(name, 1, layout) for name in ("mgup_adamw", "mgup_muon", "alpha_adam", "mars_m") for layout in ("flat", "layerwise")]
    _compare(run_distributed(2, _train, cases), cases)


def _train_three(rank: int, world_size: int) -> list:
    return _train(rank, world_size, [("mgup_adamw", 2, "flat"), ("mgup_muon", 2, "flat")])


def test_three_ranks_close_to_single_process() -> None:
    """At W=3 the reduction's summation order is gloo's, so the match is to float tolerance."""
    results = run_distributed(3, _train_three)
    for case_index in range(2):
        reference = results[0][case_index][1]
        for rank_results in results:
            for got, want in zip(rank_results[case_index][0], reference):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rank_regions_round_trip() -> None:
    shapes = [(5, 3), (7,), (1,), (2, 2, 2)]
    tensors = [torch.randn(s) for s in shapes]
    for layout in ("flat", "layerwise"):
        regions = RankRegions(build_layout(shapes, 3, layout))
        buffer = regions.pack(tensors, torch.float32)
        assert buffer.numel() == 3 * regions.region
        out = [torch.zeros(s) for s in shapes]
        regions.unpack_into(buffer, out)
        for a, b in zip(out, tensors):
            assert torch.equal(a, b)


def test_bad_arguments_fail_before_work() -> None:
    model, opt = _build("adamw", seed=0)
    with pytest.raises(ValueError, match="stage"):
        ZeroEngine(model, opt, stage=3)
    with pytest.raises(TypeError, match="mgup_dist optimizer"):
        ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="unknown ZeRO layout"):
        build_layout([(2, 2)], 2, "diagonal")


def _bf16_master(rank: int, world_size: int, name: str) -> tuple[list, list | None]:
    """A bf16 model with fp32 master segments, against a reference that keeps an fp32 master copy, steps it on
    the fp32 average of the ranks' bf16 gradients, and casts the result back to bf16."""
    model, opt = _build(name, seed=7)
    model.to(torch.bfloat16)
    engine = ZeroEngine(model, opt, stage=2, layout="flat", master_dtype=torch.float32)
    for micro in _batches(world_size):
        engine.zero_grad()
        _loss(model, micro[rank]).backward()
        engine.step()
    mine = [p.detach().clone() for p in model.parameters()]
    if rank:
        return mine, None
    ref_model, _ = _build(name, seed=7)
    ref_model.to(torch.bfloat16)
    master = [nn.Parameter(p.detach().float()) for p in ref_model.parameters()]
    _, ref_opt = _build(name, seed=7)
    ref_opt = type(ref_opt)(master, **{k: v for k, v in ref_opt.defaults.items()})
    for micro in _batches(world_size):
        for m, grad in zip(master, _averaged_grads(ref_model, micro, world_size)):
            m.grad = grad
        ref_opt.step()
        with torch.no_grad():
            for p, m in zip(ref_model.parameters(), master):
                p.copy_(m)
    return mine, [p.detach().clone() for p in ref_model.parameters()]


@pytest.mark.parametrize("name", ["mgup_adamw", "alpha_adam"])
def test_bf16_model_with_fp32_master_matches_reference(name: str) -> None:
    (mine0, reference), (mine1, _) = run_distributed(2, _bf16_master, name)
    for got0, got1, want in zip(mine0, mine1, reference):
        assert got0.dtype == torch.bfloat16
        assert torch.equal(got0, want) and torch.equal(got1, want)


def _bytes_per_step(rank: int, world_size: int, names: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for name in names:
        model, opt = _build(name, seed=7)
        engine = ZeroEngine(model, opt, stage=2, layout="layerwise")
        for micro in _batches(world_size)[:2]:
            engine.zero_grad()
            _loss(model, micro[rank]).backward()
            engine.comm.reset_stats()
            engine.step()
        out[name] = {kind: s.bytes for kind, s in engine.comm.stats.items()}
    return out


def test_layerwise_muon_family_sends_exactly_what_zero_adamw_sends() -> None:
    """On the layer-wise layout every matrix is whole on its owner: Newton-Schulz (and MARS-M's norm) need no
    traffic beyond ZeRO AdamW's gradient reduce-scatter and parameter all-gather."""
    for per_rank in run_distributed(2, _bytes_per_step, ["adamw", "muon", "mars_m"]):
        assert per_rank["muon"] == per_rank["adamw"], per_rank
        assert "all_to_all" not in per_rank["muon"]
        # MARS-M adds only its clip norms: one float64 per matrix-path tensor (up.weight, down.weight).
        assert sum(per_rank["mars_m"].values()) - sum(per_rank["adamw"].values()) == 8 * 2
