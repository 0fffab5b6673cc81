"""Per-rank jobs of the FSDP2 tests, batched so that each world size spawns its processes once.

`two_rank_job` (1-D mesh of 2): the four optimizers against their single-process references, checkpoints
after `SAVE_AFTER` steps, a realistic data-parallel run, a plain parameter mixed in, and every rejected
placement. `four_rank_job` (W=4): the four optimizers on a 1-D mesh, HSDP on a 2x2 mesh, and resuming the
W=2 checkpoints on a 4-rank 1-D mesh and on the 2x2 HSDP mesh.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import mgup_dist
from mgup_dist.integrations.dtensor_state import DTensorState
from tests.integrations.fsdp_harness import (
    OPTIMIZERS, Run, full, make_mesh, state_is_dtensor, state_snapshot,
)

STEPS = 5
SAVE_AFTER = 3
CHECKPOINTED = ("mgup_muon", "alpha_adam", "mars_m")
RESUME_MESHES = {"mgup_muon": (4,), "alpha_adam": (4,), "mars_m": (2, 2)}


def _train(run: Run, first: int, last: int) -> None:
    for step in range(first, last):
        run.step(step)


def two_rank_job(rank: int, world: int, checkpoint_dir: str) -> dict[str, Any]:
    """Every W=2 case; returns results by case name (identical on every rank except the error texts)."""
    mesh = make_mesh((2,))
    out: dict[str, Any] = {}
    for name in OPTIMIZERS:
        run = Run(name, mesh)
        _train(run, 0, SAVE_AFTER)
        if name in CHECKPOINTED:
            run.save(os.path.join(checkpoint_dir, name))
            out[f"saved_state/{name}"] = state_snapshot(run.optimizer, run.model)
        _train(run, SAVE_AFTER, STEPS)
        out[f"exact/{name}"] = run.result()
        out[f"state_layout/{name}"] = state_is_dtensor(run.optimizer)
    run = Run("mgup_adamw", mesh, mode="split")
    _train(run, 0, STEPS)
    out["split/mgup_adamw"] = run.result()
    run = Run("mgup_muon", mesh, plain_extra=True)
    _train(run, 0, STEPS)
    out["plain_extra/mgup_muon"] = run.result()
    out["mixed_placements"] = mixed_placements(mesh)
    out["errors"] = rejected_layouts(mesh)
    return out


def four_rank_job(rank: int, world: int, checkpoint_dir: str) -> dict[str, Any]:
    """Every W=4 case; returns results by case name."""
    line, hsdp = make_mesh((4,)), make_mesh((2, 2))
    out: dict[str, Any] = {}
    for name in OPTIMIZERS:
        run = Run(name, line)
        _train(run, 0, STEPS)
        out[f"exact/{name}"] = run.result()
    run = Run("mgup_muon", hsdp)
    _train(run, 0, STEPS)
    out["hsdp_exact/mgup_muon"] = run.result()
    run = Run("mgup_adamw", hsdp, mode="split")
    _train(run, 0, STEPS)
    out["hsdp_split/mgup_adamw"] = run.result()
    for name in CHECKPOINTED:
        run = Run(name, line if RESUME_MESHES[name] == (4,) else hsdp, init_seed=99)
        run.load(os.path.join(checkpoint_dir, name))
        out[f"loaded_state/{name}"] = state_snapshot(run.optimizer, run.model)
        out[f"loaded_reference_state/{name}"] = state_snapshot(run.reference_optimizer, run.reference)
        _train(run, SAVE_AFTER, STEPS)
        out[f"resumed/{name}"] = run.result()
        out[f"resumed_layout/{name}"] = state_is_dtensor(run.optimizer)
    return out


def mixed_placements(mesh: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """MGUP-Muon over hand-placed DTensors, a ``Shard(0)`` matrix beside ``Replicate()`` ones, and over plain
    copies, stepped with the same gradients; returns both final parameter lists (whole tensors)."""
    gen = torch.Generator().manual_seed(7)
    values = [torch.randn(5, 4, generator=gen), torch.randn(6, 3, generator=gen), torch.randn(3, generator=gen)]
    placements = ([Shard(0)], [Replicate()], [Replicate()])
    placed = [_param(distribute_tensor(v.clone(), mesh, p)) for v, p in zip(values, placements)]
    plain = [_param(v.clone()) for v in values]
    optimizers = [mgup_dist.MGUPMuon(placed, lr=1e-2), mgup_dist.MGUPMuon(plain, lr=1e-2)]
    for _ in range(STEPS):
        grads = [torch.randn(v.shape, generator=gen) for v in values]
        for dparam, param, grad, placement in zip(placed, plain, grads, placements):
            dparam.grad = distribute_tensor(grad.clone(), mesh, placement)
            param.grad = grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    return [full(p) for p in placed], [p.detach().clone() for p in plain]


def _param(value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value)


def _attempt(action: Callable[[], Any]) -> str | None:
    """The ValueError message ``action`` raised, or None if it raised nothing."""
    try:
        action()
    except ValueError as error:
        return str(error)
    return None


def _step_with_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    optimizer = mgup_dist.MGUPAdamW([param])
    param.grad = grad
    optimizer.step()


def rejected_layouts(mesh: Any) -> dict[str, str | None]:
    """Each unsupported layout's error message (None: accepted, which the test reports as a failure).
    Collective: every rank creates the same meshes in the same order."""
    full = torch.randn(4, 6)
    cube = init_device_mesh("cpu", (1, 1, 2))
    square = init_device_mesh("cpu", (1, 2))
    lone = init_device_mesh("cpu", (2, 1))
    sharded = _param(distribute_tensor(full, mesh, [Shard(0)]))
    errors = {
        "shard1": _attempt(lambda: mgup_dist.MGUPAdamW([_param(distribute_tensor(full, mesh, [Shard(1)]))])),
        "partial": _attempt(
            lambda: mgup_dist.MGUPAdamW([_param(DTensor.from_local(full, mesh, [Partial()], run_check=False))])
        ),
        "mesh3d": _attempt(
            lambda: mgup_dist.MGUPAdamW(
                [_param(distribute_tensor(full, cube, [Replicate(), Replicate(), Shard(0)]))]
            )
        ),
        "two_shard_dims": _attempt(
            lambda: mgup_dist.MGUPAdamW([_param(distribute_tensor(full, square, [Shard(0), Shard(0)]))])
        ),
        "two_groups": _attempt(
            lambda: mgup_dist.MGUPAdamW(
                [sharded, _param(distribute_tensor(full, lone, [Replicate(), Shard(0)]))]
            )
        ),
        "grad_placement": _attempt(
            lambda: _step_with_grad(sharded, distribute_tensor(torch.ones(4, 6), mesh, [Replicate()]))
        ),
        "plain_grad": _attempt(lambda: _step_with_grad(sharded, torch.ones(4, 6))),
        "state_length": _attempt(lambda: DTensorState({}, sharded).__setitem__("exp_avg", torch.zeros(5))),
    }
    return errors
