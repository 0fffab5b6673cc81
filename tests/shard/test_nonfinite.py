"""Non-finite gradient guard at W=2 under `ZeroEngine` (flat layout, `ShardedDistributor`): a NaN injected
into rank 1's gradient lands, after reduction, in one rank's segment only; both ranks still skip the step
(parameters, master segments and state unchanged, counter incremented on both), and training then matches a
run that never saw the bad step. Under ``"raise"`` both ranks raise; the rank holding the segment names it."""
from __future__ import annotations

import pytest
import torch

from mgup_dist.optim import build_optimizer
from mgup_dist.optim.nonfinite import NonFiniteGradientError
from mgup_dist.zero import ZeroEngine
from tests.distributed import run_distributed

NAMES = ("adamw", "mgup_adamw", "muon")


def _engine(name: str) -> tuple[torch.nn.Module, ZeroEngine]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    optimizer = build_optimizer(name, model.parameters(), weight_decay=0.1)
    optimizer.name_parameters(model)
    return model, ZeroEngine(model, optimizer, stage=2, layout="flat")


def _step(model: torch.nn.Module, engine: ZeroEngine, rank: int, seed: int, poison: int | None = None) -> None:
    gen = torch.Generator().manual_seed(100 * seed + rank)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=gen)
        if poison == i and rank == 1:
            p.grad.view(-1)[0] = float("nan")
    engine.step()
    engine.zero_grad()


def _state(engine: ZeroEngine) -> list[torch.Tensor]:
    return [t.clone() for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]


def _worker(rank: int, world_size: int) -> dict:
    out: dict = {}
    for name in NAMES:
        for poison in (0, 3):  # first tensor (rank 0's segment), last tensor (rank 1's segment)
            model, engine = _engine(name)
            clean_model, clean = _engine(name)
            _step(model, engine, rank, 0, poison)  # first step: nothing may be created
            first = {"state": len(engine.optimizer.state), "skipped": engine.optimizer.skipped_steps}
            for m, e in ((model, engine), (clean_model, clean)):
                _step(m, e, rank, 1)
            params, master = [p.detach().clone() for p in model.parameters()], [m.clone() for m in engine.master]
            state = _state(engine)
            _step(model, engine, rank, 2, poison)
            unchanged = (
                all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
                and all(torch.equal(a, b) for a, b in zip(master, engine.master))
                and len(state) == len(_state(engine))
                and all(torch.equal(a, b) for a, b in zip(state, _state(engine)))
            )
            for m, e in ((model, engine), (clean_model, clean)):
                _step(m, e, rank, 3)
            out[name, poison] = {
                **first, "unchanged": unchanged, "skipped_after": engine.optimizer.skipped_steps,
                "matches_clean": all(torch.equal(a, b) for a, b in zip(model.parameters(), clean_model.parameters())),
            }
    model, engine = _engine("adamw")
    engine.optimizer.nonfinite = "raise"
    try:
        _step(model, engine, rank, 0, poison=0)
        out["raise"] = None
    except NonFiniteGradientError as error:
        out["raise"] = str(error)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(2, _worker)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("poison", (0, 3))
def test_both_ranks_skip_and_training_continues(results: list[dict], name: str, poison: int) -> None:
    for rank, result in enumerate(results):
        got = result[name, poison]
        assert got["state"] == 0 and got["skipped"] == 1, (rank, got)
        assert got["unchanged"] and got["skipped_after"] == 2, (rank, got)
        assert got["matches_clean"], (rank, got)


def test_raise_on_every_rank(results: list[dict]) -> None:
    holder, other = results[0]["raise"], results[1]["raise"]  # tensor 0's first element lies on rank 0
    assert holder is not None and "'0.weight'" in holder
    assert other is not None and "on another rank" in other
