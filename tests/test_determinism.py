"""Determinism: the same seed and config give bit-identical parameters, run after run and across world sizes.

Claims tested (all ``torch.equal``, no tolerance):

1. the launcher's ``single`` backend: two runs of one config end with identical parameters and metrics;
2. `ZeroEngine` at W=2 (flat layout, tensors straddling the ranks): two runs in fresh process sets end with
   identical parameters (nothing depends on timing, thread scheduling or addresses);
3. across world sizes, given identical averaged gradients: ZeRO at W=2 steps to exactly the parameters of the
   plain single-process optimizer (W=1). Every rank feeds the full batch's gradient, so the all-reduce average
   ``(g + g) / 2`` is exactly ``g``; the optimizer math on segments (elementwise moments, the exact top-k mask
   with its tie rule, gathered Newton–Schulz) is then bit-identical to the whole-tensor math. With *different*
   per-rank micro-batches the averaged gradient itself depends on the float32 summation order, so launcher
   runs at W=1 and W=2 agree only within tests/launch/test_crash_resume.py's tolerance, not bitwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import mgup_dist
from launch.metrics import read_metrics
from launch.model import GPT, GPTShape
from mgup_dist.zero import ZeroEngine
from tests.distributed import run_distributed
from tests.launch.conftest import NANO_RUN, merged
from tests.launch.helpers import checkpoint_params, run_pretrain

SHAPE = GPTShape(n_layer=1, n_head=2, n_embd=16, block_size=8)
STEPS = 4
OPTIMIZERS = ("mgup_adamw", "mgup_muon")


def _build(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(11)
    model = GPT(SHAPE)
    params = mgup_dist.muon_param_groups(model) if name == "mgup_muon" else model.parameters()
    extra = {"ns_dtype": "float32"} if name == "mgup_muon" else {}
    return model, mgup_dist.build_optimizer(name, params, lr=0.01, weight_decay=0.05, **extra)


def _batches() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [[torch.randint(0, 256, (2, SHAPE.block_size + 1), generator=gen) for _ in range(2)] for _ in range(STEPS)]


def _backward(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()


def _zero_run(rank: int, world_size: int, name: str, identical_grads: bool) -> list[torch.Tensor]:
    """ZeRO-2 flat: with ``identical_grads`` every rank backpropagates both micro-batches (the full batch),
    else rank r only micro-batch r."""
    model, opt = _build(name)
    engine = ZeroEngine(model, opt, stage=2, layout="flat")
    for micro in _batches():
        for i in range(2) if identical_grads else [rank]:
            _backward(model, micro[i])
        engine.step()
        engine.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _both_modes(rank: int, world_size: int) -> dict[tuple[str, bool], list[torch.Tensor]]:
    return {(name, same): _zero_run(rank, world_size, name, same) for name in OPTIMIZERS for same in (False, True)}


def _single_run(name: str) -> list[torch.Tensor]:
    model, opt = _build(name)
    for micro in _batches():
        for tokens in micro:
            _backward(model, tokens)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_zero_two_ranks_is_bit_reproducible_and_matches_one_process_given_identical_gradients() -> None:
    first, second = run_distributed(2, _both_modes), run_distributed(2, _both_modes)
    for name in OPTIMIZERS:
        for same in (False, True):
            assert _equal(first[0][(name, same)], first[1][(name, same)])  # ranks agree
            assert _equal(first[0][(name, same)], second[0][(name, same)])  # runs agree
        reference = _single_run(name)
        assert _equal(first[0][(name, True)], reference)
        start = _build(name)[0]
        assert not _equal(first[0][(name, True)], [p.detach() for p in start.parameters()])  # it did train
        assert not _equal(first[0][(name, False)], reference)  # other gradients, other parameters


def test_single_backend_runs_are_bit_identical(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps(merged(NANO_RUN, {"optimizer": {"name": "mgup_muon", "lr": 0.02}})))
    run_pretrain("--config", config, "--out", tmp_path / "a")
    run_pretrain("--config", config, "--out", tmp_path / "b")
    a = checkpoint_params(tmp_path / "a/checkpoints/step_0000006", config)
    b = checkpoint_params(tmp_path / "b/checkpoints/step_0000006", config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [read_metrics(tmp_path / x / "metrics.jsonl") for x in "ab"]
    timeless = [[{k: v for k, v in row.items() if k != "tokens_per_s"} for row in run] for run in rows]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 6
