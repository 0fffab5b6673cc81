"""Non-finite gradient guard at W=2 under `ZeroEngine` (flat layout, `ShardedDistributor`): a NaN injected
into rank 1's gradient lands, after reduction, in one rank's segment only; both ranks still skip the step
(parameters, master segments and state unchanged, counter incremented on both), and training then matches a
run that never saw the bad step. Under ``"raise"`` both ranks raise; the rank holding the segment names it.
Finite gradients whose MGUP-Muon mask scores overflow raise `NonFiniteScoresError` on both ranks, on the
layer-wise layout (every matrix held whole: the verdict settles after Newton–Schulz) as on the flat one, and
the ranks' collectives stay in step."""
from __future__ import annotations

import pytest
import torch

from mgup_dist.optim import build_optimizer
from mgup_dist.optim.nonfinite import NonFiniteGradientError
from mgup_dist.rules.requests import NonFiniteScoresError
from mgup_dist.zero import ZeroEngine
from tests.distributed import run_distributed

NAMES = ("adamw", "mgup_adamw", "muon")


def _engine(name: str, layout: str = "flat") -> tuple[torch.nn.Module, ZeroEngine]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    optimizer = build_optimizer(name, model.parameters(), weight_decay=0.1)
    optimizer.name_parameters(model)
    return model, ZeroEngine(model, optimizer, stage=2, layout=layout)


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


def _overflow_worker(rank: int, world_size: int) -> dict:
    out = {}
    for layout in ("layerwise", "flat"):
        model, engine = _engine("mgup_muon", layout)
        _step(model, engine, rank, 0)
        for p in model.parameters():  # finite, but the momentum-times-gradient scores overflow float32
            p.grad = torch.full(p.shape, 1e30)
        try:
            engine.step()
            out[layout] = None
        except NonFiniteScoresError as error:
            out[layout] = str(error)
        out[layout, "in step"] = int(engine.comm.all_reduce(torch.tensor([rank + 1])))
    return out


def test_overflowing_mask_scores_raise_on_every_rank_with_either_layout() -> None:
    results = run_distributed(2, _overflow_worker)
    for layout in ("layerwise", "flat"):
        messages = {result[layout] for result in results}
        assert len(messages) == 1 and "MGUP mask scores of tensors [0, 2] contain NaN or infinity" in messages.pop()
        assert all(result[layout, "in step"] == 3 for result in results)
