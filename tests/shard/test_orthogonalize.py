"""Distributed Newton–Schulz on 1–4 gloo ranks: gathered mode is bitwise `LocalOps`, every matrix is computed
on exactly one rank, whole matrices never move, and the sharded (Gram) mode matches within rounding."""
from __future__ import annotations

import math
import random

import pytest
import torch

from mgup_dist.ops.local import LocalOps
from mgup_dist.rules.requests import Orthogonalize
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.orthogonalize import DistributedOrthogonalizer
from mgup_dist.shard.segment import Segment
from tests.distributed import run_distributed

# (logical shape, NS dtype, steps): square, tall, wide, a conv viewed as (o, i·kh·kw), a single row, mixed
# dtypes, and a wide bf16 matrix whose Gram sums run over long rows.
MATRICES = [
    ((8, 8), torch.bfloat16, 5),
    ((24, 6), torch.float32, 5),
    ((5, 17), torch.bfloat16, 5),
    ((6, 3, 2, 2), torch.float32, 5),
    ((1, 9), torch.bfloat16, 3),
    ((16, 4), torch.bfloat16, 5),
    ((7, 7), torch.float32, 2),
    ((3, 20), torch.float32, 5),
    ((48, 640), torch.bfloat16, 5),
]
SPLIT_EVERYWHERE, WHOLE_ON_LAST = 0, 1  # matrices the random layout forces into those two situations
WORLD_SIZES = (1, 2, 3, 4)
Bounds = list[list[tuple[int, int]]]  # bounds[rank][matrix] = (lo, hi)


def _random_layout(world: int, seed: int) -> Bounds:
    """Each matrix cut at random flat offsets (empty pieces allowed), pieces dealt to ranks in random order;
    matrix 0 is split over every rank (all pieces non-empty when it has enough elements), matrix 1 is whole
    on the last rank."""
    rng = random.Random(seed)
    bounds: Bounds = [[] for _ in range(world)]
    for index, (shape, _, _) in enumerate(MATRICES):
        numel = math.prod(shape)
        if index == SPLIT_EVERYWHERE:
            cuts = sorted(rng.sample(range(1, numel), world - 1))
        else:
            cuts = sorted(rng.randint(0, numel) for _ in range(world - 1))
        pieces = list(zip([0, *cuts], [*cuts, numel]))
        if index == WHOLE_ON_LAST:
            pieces = [(0, 0)] * (world - 1) + [(0, numel)]
        else:
            rng.shuffle(pieces)
        for rank, piece in enumerate(pieces):
            bounds[rank].append(piece)
    return bounds


def _flat_buffer_layout(world: int, seed: int) -> Bounds:
    """ZeRO-1/2 style: all matrices concatenated into one buffer cut at random offsets, rank r the r-th cut."""
    rng = random.Random(seed)
    sizes = [math.prod(shape) for shape, _, _ in MATRICES]
    total = sum(sizes)
    cuts = [0, *sorted(rng.randint(0, total) for _ in range(world - 1)), total]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [
        [(min(max(cuts[r] - s, 0), n), min(max(cuts[r + 1] - s, 0), n)) for s, n in zip(starts, sizes)]
        for r in range(world)
    ]


def _whole_layout(world: int) -> Bounds:
    """Every matrix whole on rank ``index % world``."""
    return [
        [(0, math.prod(shape)) if i % world == r else (0, 0) for i, (shape, _, _) in enumerate(MATRICES)]
        for r in range(world)
    ]


def _matrices(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape, _, _ in MATRICES]


def _requests(matrices: list[torch.Tensor], ranges: list[tuple[int, int]]) -> list[Orthogonalize]:
    requests = []
    for index, ((shape, dtype, steps), full, (lo, hi)) in enumerate(zip(MATRICES, matrices, ranges)):
        segment = Segment(index, shape, lo, hi)
        rows, cols = segment.matrix_shape
        requests.append(Orthogonalize(segment, full.reshape(-1)[lo:hi].clone(), rows, cols, steps, dtype))
    return requests


def _run_case(rank: int, world: int, bounds: Bounds, matrices: list[torch.Tensor], **kwargs) -> dict:
    comm = Collectives()
    ortho = DistributedOrthogonalizer(comm, **kwargs)
    answers = ortho(_requests(matrices, bounds[rank]))
    return {
        "answers": answers,
        "ns_calls": ortho.ns_calls,
        "sharded_calls": ortho.sharded_calls,
        "owners": ortho.last_owners,
        "a2a_bytes": comm.stats["all_to_all"].bytes,
        "a2a_calls": comm.stats["all_to_all"].calls,
    }


def _run_with_layout(rank: int, world: int, bounds: Bounds, rounds: list[list[torch.Tensor]]) -> dict:
    """One orthogonalizer given the layout, over several rounds of the same matrices (new values each round):
    whether each round's answers are bitwise `LocalOps`', the owners of each round, and how often the metadata
    table was built."""
    layout = ShardLayout([shape for shape, _, _ in MATRICES], bounds)
    ortho = DistributedOrthogonalizer(Collectives(), layout=layout)
    built = []
    exchange = ortho._exchange_metadata
    ortho._exchange_metadata = lambda requests: built.append(1) or exchange(requests)
    out: dict = {"bitwise": [], "owners": []}
    for matrices in rounds:
        whole = [(0, math.prod(shape)) for shape, _, _ in MATRICES]
        reference = LocalOps().orthogonalize(_requests(matrices, whole))
        answers = ortho(_requests(matrices, bounds[rank]))
        out["bitwise"].append(all(torch.equal(a, r[lo:hi]) for a, r, (lo, hi) in zip(answers, reference, bounds[rank])))
        out["owners"].append(list(ortho.last_owners))
    out["built"] = len(built)
    return out


def _scenarios(rank: int, world: int, seed: int) -> dict:
    """Runs every layout on this rank; compares with `LocalOps` here (same process, same threads)."""
    matrices = _matrices(seed)
    whole = [Segment.whole(i, shape) for i, (shape, _, _) in enumerate(MATRICES)]
    reference = LocalOps().orthogonalize(_requests(matrices, [(s.lo, s.hi) for s in whole]))
    layouts = {
        "random": _random_layout(world, seed),
        "flat": _flat_buffer_layout(world, seed),
        "whole": _whole_layout(world),
    }
    out = {"layouts": layouts, "reference": reference}
    for name, bounds in layouts.items():
        out[name] = _run_case(rank, world, bounds, matrices)
        pieces = zip(out[name]["answers"], reference, bounds[rank])
        out[name]["bitwise"] = [torch.equal(answer, ref[lo:hi]) for answer, ref, (lo, hi) in pieces]
    out["planned"] = _run_with_layout(rank, world, layouts["random"], [matrices, _matrices(seed + 1)])
    out["sharded"] = _run_case(rank, world, layouts["random"], matrices, gather_max_numel=0)
    out["threshold"] = _run_case(rank, world, layouts["random"], matrices, gather_max_numel=50)
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def world_results(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    return request.param, run_distributed(request.param, _scenarios, 11 + request.param)


def _assemble(results: list[dict], case: str, bounds: Bounds, index: int) -> torch.Tensor:
    numel = math.prod(MATRICES[index][0])
    full = torch.full((numel,), float("nan"), dtype=torch.float64)
    for rank, result in enumerate(results):
        lo, hi = bounds[rank][index]
        full[lo:hi] = result[case]["answers"][index].double()
    return full


@pytest.mark.parametrize("case", ["random", "flat", "whole"])
def test_gathered_mode_is_bitwise_local_ops(world_results: tuple[int, list[dict]], case: str) -> None:
    world, results = world_results
    for rank, result in enumerate(results):
        assert all(result[case]["bitwise"]), (rank, result[case]["bitwise"])
        for answer, (_, dtype, _), (lo, hi) in zip(result[case]["answers"], MATRICES, result["layouts"][case][rank]):
            assert answer.dtype == dtype and answer.shape == (hi - lo,)


@pytest.mark.parametrize("case", ["random", "flat", "whole"])
def test_each_matrix_computed_on_exactly_one_rank(world_results: tuple[int, list[dict]], case: str) -> None:
    world, results = world_results
    owners = results[0][case]["owners"]
    assert all(r[case]["owners"] == owners for r in results)
    assert all(0 <= o < world for o in owners)
    assert [r[case]["ns_calls"] for r in results] == [owners.count(rank) for rank in range(world)]
    assert sum(r[case]["ns_calls"] for r in results) == len(MATRICES)


def test_a_layout_plans_each_round_once_and_reuses_the_plan(world_results: tuple[int, list[dict]]) -> None:
    """Given the layout, the second round of the same matrices (other values) reuses the first round's plan:
    the same owners as without a layout, answers still bitwise `LocalOps`'."""
    _, results = world_results
    for rank, result in enumerate(results):
        planned = result["planned"]
        assert planned["bitwise"] == [True, True], rank
        assert planned["owners"] == [result["random"]["owners"]] * 2, rank
        assert planned["built"] == 1, rank


def test_matrices_whole_on_a_rank_stay_there(world_results: tuple[int, list[dict]]) -> None:
    world, results = world_results
    assert results[0]["whole"]["owners"] == [i % world for i in range(len(MATRICES))]
    assert results[0]["random"]["owners"][WHOLE_ON_LAST] == world - 1
    for result in results:
        assert result["whole"]["a2a_bytes"] == 0 and result["whole"]["a2a_calls"] == 0


def test_split_layouts_move_bytes(world_results: tuple[int, list[dict]]) -> None:
    world, results = world_results
    moved = sum(r["random"]["a2a_bytes"] for r in results)
    assert (moved > 0) == (world > 1)
    # Gathered mode sends each non-owner piece to its owner and back: at most 2 x matrix bytes in the NS dtype.
    bound = sum(2 * math.prod(shape) * dtype.itemsize for shape, dtype, _ in MATRICES)
    assert moved <= bound


def test_sharded_mode_matches_gathered_within_rounding(world_results: tuple[int, list[dict]]) -> None:
    world, results = world_results
    bounds = results[0]["layouts"]["random"]
    for case in ("sharded", "threshold"):
        for index, (shape, dtype, _) in enumerate(MATRICES):
            got = _assemble(results, case, bounds, index)
            want = results[0]["reference"][index].double()
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.linalg.norm(got - want) <= tolerance * torch.linalg.norm(want), (case, index)
            assert all(r[case]["answers"][index].dtype == dtype for r in results)


def test_sharded_mode_runs_on_every_rank_and_skips_whole_matrices(world_results: tuple[int, list[dict]]) -> None:
    world, results = world_results
    whole_somewhere = sum(
        any(results[0]["layouts"]["random"][r][i] == (0, math.prod(shape)) for r in range(world))
        for i, (shape, _, _) in enumerate(MATRICES)
    )
    for result in results:
        assert result["sharded"]["sharded_calls"] == len(MATRICES) - whole_somewhere
    assert sum(r["sharded"]["ns_calls"] for r in results) == whole_somewhere
    bounds = results[0]["layouts"]["random"]
    expect_sharded = [
        math.prod(shape) > 50 and all(bounds[r][i] != (0, math.prod(shape)) for r in range(world))
        for i, (shape, _, _) in enumerate(MATRICES)
    ]
    assert [owner is None for owner in results[0]["threshold"]["owners"]] == expect_sharded
    assert all(r["threshold"]["sharded_calls"] == sum(expect_sharded) for r in results)


def _bad_requests(rank: int, world: int) -> list[str]:
    comm = Collectives()
    ortho = DistributedOrthogonalizer(comm)
    x = torch.randn(12)
    messages = []
    attempts = [
        [Orthogonalize(Segment(0, (3, 4), 0, 12 if rank == 0 else 0), x if rank == 0 else x[:0], 3, 4, 5, torch.int32)],
        [Orthogonalize(Segment(0, (3, 4), 0, 12), x, 2, 4, 5, torch.float32)],
        [Orthogonalize(Segment(0, (3, 4), 0, 12), x[:5], 3, 4, 5, torch.float32)],
        [Orthogonalize(Segment(0, (3, 4), 0, 12), x, 3, 4, -1, torch.float32)],
        # collective checks: every rank claims all of it (overlap), then ranks disagree on steps
        [Orthogonalize(Segment(0, (3, 4), 0, 12), x, 3, 4, 5, torch.float32)],
        [Orthogonalize(Segment(0, (3, 4), 6 * rank, 6 * rank + 6), x[:6], 3, 4, 5 + rank, torch.float32)],
    ]
    for requests in attempts:
        with pytest.raises((ValueError, TypeError)) as info:
            ortho(requests)
        messages.append(str(info.value))
    return messages


def test_bad_requests_fail_loudly_on_every_rank() -> None:
    messages = run_distributed(2, _bad_requests)
    assert messages[0] == messages[1]
    expected = ["NS dtype", "not a matrix view", "local piece has 5", "steps must be", "exactly once", "disagree"]
    for message, fragment in zip(messages[0], expected):
        assert fragment in message
    with pytest.raises(ValueError, match="gather_max_numel"):
        DistributedOrthogonalizer(None, gather_max_numel=-1)  # type: ignore[arg-type]
