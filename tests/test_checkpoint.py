"""Reshardable checkpoints: optimizer state saved at one world size/layout continues the same run at another.

A run of 3 + 3 steps is compared with 3 steps, a checkpoint, and 3 more steps after loading it elsewhere. Every
continuation consumes the same global batches and reduces gradients as ``(g0 + g1) / 2``, so for the
elementwise and top-k optimizers the continuation is bit-identical whatever the world size.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import mgup_dist
from mgup_dist.checkpoint import (
    CheckpointMismatchError, load_optimizer_state_dict, optimizer_state_dict, save_atomic,
)
from mgup_dist.zero import ZeroEngine
from tests.distributed import run_distributed
from tests.test_zero import TinyLM, _loss

HALF = 3
MICRO = 2  # micro-batches per step: one per rank at W=2


def _build(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = TinyLM()
    return model, mgup_dist.build_optimizer(name, model.parameters(), lr=0.02, weight_decay=0.01)


def _batches() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    return [[torch.randint(0, 29, (2, 7), generator=gen) for _ in range(MICRO)] for _ in range(2 * HALF)]


def _local_grads(model: nn.Module, micro: list[torch.Tensor], mine: list[int]) -> None:
    """Sets ``p.grad`` to the sum of the gradients of micro-batches ``mine`` (summed in index order)."""
    total = [torch.zeros_like(p) for p in model.parameters()] if not mine else None
    for i in mine:
        model.zero_grad(set_to_none=True)
        _loss(model, micro[i]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    for p, g in zip(model.parameters(), total):
        p.grad = g


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _zero_run(rank: int, world_size: int, name: str, path: str, resume: bool, layout: str) -> list[torch.Tensor]:
    """Steps [0, 3) then saves, or (``resume``) loads and steps [3, 6). Each rank sums its share of the two
    micro-batches, rescaled so that the engine's division by W averages over the micro-batches."""
    model, opt = _build(name)
    engine = ZeroEngine(model, opt, stage=2, layout=layout)
    steps = range(HALF, 2 * HALF) if resume else range(HALF)
    if resume:
        state = _model_state(model)
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
        engine.load_master_state_dict(model, path)
        load_optimizer_state_dict(opt, model, path)
    mine = [i for i in range(MICRO) if i % world_size == rank]
    for step in steps:
        _local_grads(model, _batches()[step], mine)
        if world_size != MICRO:
            for p in model.parameters():
                p.grad *= world_size / MICRO
        engine.step()
    if not resume:
        save_atomic({**_model_state(model), **optimizer_state_dict(opt, model), **engine.master_state_dict(model)}, path)
    return [p.detach().clone() for p in model.parameters()]


def _single_run(name: str, path: str | None, steps: range) -> list[torch.Tensor]:
    """The same run in one process with a plain (unsharded) optimizer, optionally resumed from ``path``."""
    model, opt = _build(name)
    if path is not None:
        state = _model_state(model)
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
        load_optimizer_state_dict(opt, model, path)
    for step in steps:
        _local_grads(model, _batches()[step], list(range(MICRO)))
        for p in model.parameters():
            p.grad = p.grad / MICRO
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["mgup_adamw", "alpha_adam"])
def test_save_at_two_ranks_resume_at_one_rank_and_in_a_single_process(tmp_path, name: str) -> None:
    path = str(tmp_path / "ckpt")
    run_distributed(2, _zero_run, name, path, False, "flat")
    assert os.path.isdir(path) and not os.path.exists(path + ".partial")
    uninterrupted = _single_run(name, None, range(2 * HALF))
    resumed_w1 = run_distributed(1, _zero_run, name, path, True, "layerwise")[0]
    resumed_single = _single_run(name, path, range(HALF, 2 * HALF))
    for a, b, c in zip(uninterrupted, resumed_w1, resumed_single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_save_single_process_resume_at_three_ranks(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    model, opt = _build("mgup_muon")
    for step in range(HALF):
        _local_grads(model, _batches()[step], list(range(MICRO)))
        for p in model.parameters():
            p.grad = p.grad / MICRO
        opt.step()
    save_atomic({**_model_state(model), **optimizer_state_dict(opt, model)}, path)
    uninterrupted = _single_run("mgup_muon", None, range(2 * HALF))
    resumed = run_distributed(3, _zero_run, "mgup_muon", path, True, "flat")
    for rank_params in resumed:
        for got, want in zip(rank_params, uninterrupted):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    model, opt = _build("adamw")
    _local_grads(model, _batches()[0], [0])
    opt.step()
    save_atomic({**_model_state(model), **optimizer_state_dict(opt, model)}, path)
    torch.manual_seed(0)
    other = TinyLM(vocab=31)
    other_opt = mgup_dist.build_optimizer("adamw", other.parameters())
    with pytest.raises(CheckpointMismatchError, match="elements"):
        load_optimizer_state_dict(other_opt, other, path)
