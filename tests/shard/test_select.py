"""Exact distributed top-k (`mgup_dist.shard.select`) against the single-process `topk_mask`, on gloo ranks."""
from __future__ import annotations

import functools
import math
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mgup_dist.ops.select import topk_mask
from mgup_dist.rules.requests import NonFiniteScoresError, ScoreProduct, TopKMask
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.segment import Segment
from mgup_dist.shard.select import order_keys, topk_masks
from tests.distributed import run_distributed

Case = tuple[torch.Tensor, int]  # full scores, k
FINITE_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _scores(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "zeros":  # tie-heavy: mostly ±0.0, a few non-zeros
        s = torch.where(torch.rand(n, generator=gen) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        hits = torch.rand(n, generator=gen) < 0.1
        return torch.where(hits, torch.randn(n, generator=gen), s)
    if kind == "few_values":  # ties at every level, -0.0 among them
        s = torch.randint(-2, 3, (n,), generator=gen).float()
        return torch.where((s == 0) & (torch.rand(n, generator=gen) < 0.5), torch.tensor(-0.0), s)
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "wide":  # magnitudes from subnormal to 1e30, both signs
        return torch.randn(n, generator=gen) * torch.logspace(-44, 30, n)[torch.randperm(n, generator=gen)]
    raise ValueError(kind)


def _cases(seed: int) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        for kind in ("normal", "zeros", "few_values", "equal", "wide"):
            scores = _scores(kind, n, gen)
            for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
                cases.append((scores, k))
    return cases


def _random_bounds(n: int, world_size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random cover of [0, n): one range per rank (some empty), ranks in shuffled flat-offset order; sometimes
    the whole tensor on one rank."""
    if rng.random() < 0.2:
        owner = rng.randrange(world_size)
        return [(0, n) if r == owner else (0, 0) for r in range(world_size)]
    cuts = sorted(rng.randint(0, n) for _ in range(world_size - 1))
    edges = [0, *cuts, n]
    ranges = [(edges[i], edges[i + 1]) for i in range(world_size)]
    rng.shuffle(ranges)
    return ranges


def _layout(cases: list[Case], world_size: int, seed: int) -> ShardLayout:
    rng = random.Random(seed)
    per_tensor = [_random_bounds(s.numel(), world_size, rng) for s, _ in cases]
    return ShardLayout(tuple((s.numel(),) for s, _ in cases), tuple(zip(*per_tensor)))


def _local_requests(cases: list[Case], layout: ShardLayout, rank: int) -> list[TopKMask]:
    requests = []
    for (scores, k), segment in zip(cases, layout.segments(rank)):
        requests.append(TopKMask(segment, scores[segment.lo : segment.hi].clone(), k))
    return requests


def _round_requests(rank: int, sizes: list[int], mode: str) -> list[TopKMask]:
    """A request per size, the tensors split over two ranks (``"split"``: distinct scores whose k-th and
    (k+1)-th largest differ in the last bit only, so all four passes run and no tie is split; ``"ties"``:
    all-zero scores) or each whole on one rank (``"whole"``)."""
    gen = torch.Generator().manual_seed(0)
    requests = []
    for index, n in enumerate(sizes):
        k = n // 2
        scores = torch.zeros(n) if mode == "ties" else torch.randn(n, generator=gen)
        if mode != "ties":
            order = scores.argsort(descending=True)
            scores[order[k]] = torch.nextafter(scores[order[k - 1]], torch.tensor(-math.inf))
        lo, hi = ((0, n) if index % 2 == rank else (0, 0)) if mode == "whole" else (rank * n // 2, (rank + 1) * n // 2)
        requests.append(TopKMask(Segment(index, (n,), lo, hi), scores[lo:hi].clone(), k))
    return requests


def _stats(comm: Collectives) -> dict[str, tuple[int, int]]:
    return {kind: (s.calls, s.bytes) for kind, s in comm.stats.items()}


def _select_rounds(
    rank: int, world_size: int, cases: list[Case], layouts: list[ShardLayout], volume: list[tuple[list[int], str]]
) -> dict:
    """One batched `topk_masks` round per layout; a round with a NaN on the last rank only; the first layout
    again (collectives must still be in step); then the `_round_requests` rounds of ``volume``. Returns the
    masks, the error message and each round's collective ``{kind: (calls, bytes)}``."""
    comm = Collectives()
    masks, stats = [], []
    for layout in layouts:
        comm.reset_stats()
        masks.append(topk_masks(comm, _local_requests(cases, layout, rank)))
        stats.append(_stats(comm))
    poisoned = _local_requests(cases, layouts[0], rank)
    if rank == world_size - 1:
        next(r for r in poisoned if r.segment.length > 0).scores[-1] = float("nan")
    try:
        topk_masks(comm, poisoned)
        raised = None
    except NonFiniteScoresError as err:
        raised = str(err)
    after = topk_masks(comm, _local_requests(cases, layouts[0], rank))
    volume_stats = []
    for sizes, mode in volume:
        comm.reset_stats()
        topk_masks(comm, _round_requests(rank, sizes, mode))
        volume_stats.append(_stats(comm))
    return {"masks": masks, "stats": stats, "raised": raised, "after": after, "volume": volume_stats}


SMALL, LARGE = [1000, 3000], [100_000, 300_000]
VOLUME_ROUNDS = [(SMALL, "split"), (LARGE, "split"), (LARGE, "ties"), (LARGE, "whole")]


def _setup(world_size: int) -> tuple[list[Case], list[ShardLayout]]:
    cases = _cases(seed=world_size)
    return cases, [_layout(cases, world_size, seed=100 * world_size + i) for i in range(2)]


@functools.lru_cache(maxsize=None)
def _results(world_size: int) -> tuple[dict, ...]:
    """Per rank: `_select_rounds` for `_setup(world_size)` (one spawned process set per world size; the
    collective-volume rounds run at world size 2)."""
    volume = VOLUME_ROUNDS if world_size == 2 else []
    return tuple(run_distributed(world_size, _select_rounds, *_setup(world_size), volume))


def _assemble(local_masks: list[list[torch.Tensor]], layout: ShardLayout, index: int) -> torch.Tensor:
    full = torch.zeros(math.prod(layout.shapes[index]), dtype=torch.bool)
    for rank, masks in enumerate(local_masks):
        lo, hi = layout.bounds[rank][index]
        assert masks[index].dtype == torch.bool and masks[index].numel() == hi - lo
        full[lo:hi] = masks[index]
    return full


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distributed_masks_equal_local(world_size: int) -> None:
    cases, layouts = _setup(world_size)
    results = _results(world_size)
    expected = [topk_mask(scores, k) for scores, k in cases]
    for round_, layout in enumerate(layouts):
        for index, want in enumerate(expected):
            got = _assemble([r["masks"][round_] for r in results], layout, index)
            assert torch.equal(got, want), f"round {round_}, case {index}: k={cases[index][1]}"
    for result in results:
        for stats in result["stats"]:
            assert stats["all_reduce"][0] <= 4 and stats.get("all_gather", (0, 0))[0] <= 1


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_nonfinite_scores_raise_on_every_rank_and_collectives_stay_in_step(world_size: int) -> None:
    cases, layouts = _setup(world_size)
    victim = next(i for i, (lo, hi) in enumerate(layouts[0].bounds[world_size - 1]) if hi > lo)
    results = _results(world_size)
    for result in results:
        assert result["raised"] == (
            f"MGUP mask scores of tensors [{victim}] contain NaN or infinity (non-finite gradient?)"
        )
    for index, (scores, k) in enumerate(cases):
        assert torch.equal(_assemble([r["after"] for r in results], layouts[0], index), topk_mask(scores, k))


def test_collective_volume_is_independent_of_tensor_size() -> None:
    header_pass = 4 * (2 * 2 + 2 * 256)  # int32 counts: (non-finite, whole) flags + 256 bins, 2 requests
    split = {"all_reduce": (4, header_pass + 3 * 4 * 2 * 256)}
    ties = {**split, "all_gather": (1, 8 * 2 * 2)}  # one (lo, ties) int64 pair per request
    whole = {"all_reduce": (1, header_pass)}  # tensors held whole finish locally after the first pass
    for result in _results(2):
        assert result["volume"] == [split, split, ties, whole]


@settings(max_examples=300, deadline=None)
@given(FINITE_FLOAT32, FINITE_FLOAT32)
def test_order_keys_preserve_float_order(a: float, b: float) -> None:
    keys = order_keys(torch.tensor([a, b], dtype=torch.float32)).tolist()
    assert (keys[0] < keys[1]) == (a < b) and (keys[0] == keys[1]) == (a == b)


def test_order_keys_match_the_spec_unsigned_encoding() -> None:
    values = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3.0e38, -3.0e38]
    for value in values:
        bits = struct.unpack("<I", struct.pack("<f", value + 0.0))[0]
        unsigned = bits | 0x80000000 if value + 0.0 >= 0 else ~bits & 0xFFFFFFFF
        assert int(order_keys(torch.tensor([value]))) + 2**31 == unsigned


# Scores given as a `ScoreProduct`: the holder of a whole tensor selects from the factors (never forming the
# product), split tensors form it; non-finite values reach every rank either way.

PRODUCT_SIZES = [5000, 20_000, 20_000, 3000, 20_000]
PRODUCT_BOUNDS = [  # per tensor, (rank 0, rank 1): whole on 0, whole on 1, split, split, whole on 1 with k = 0
    [(0, 5000), (0, 0)], [(0, 0), (0, 20_000)], [(7000, 20_000), (0, 7000)], [(0, 1500), (1500, 3000)],
    [(20_000, 20_000), (0, 20_000)],
]
POISONS = [("none", -1, 0.0), ("nan", 1, math.nan), ("-nan", 2, -math.nan), ("inf", 2, math.inf),
           ("-inf", 0, -math.inf), ("inf at k=0", 4, math.inf), ("huge", 2, 3.0e38), ("-huge", 3, -3.0e38)]


def _factors(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(index)
    n = PRODUCT_SIZES[index]
    grad = torch.randn(n, generator=gen)
    return grad + torch.randn(n, generator=gen), grad  # direction, grad


def _poisoned_factors(poison: tuple[str, int, float]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Every tensor's full (direction, grad, k); the poisoned tensor's direction holds ``value`` at its middle
    element (a ``huge`` value makes scores of ~±1e38, finite, or ±inf after the product)."""
    name, victim, value = poison
    tensors = []
    for index, n in enumerate(PRODUCT_SIZES):
        direction, grad = _factors(index)
        if index == victim:
            direction[n // 2], grad[n // 2] = value, 1.0
        tensors.append((direction, grad, 0 if index == 4 else n // 3))
    return tensors


def _product_rounds(rank: int, world_size: int) -> list[dict]:
    """One `topk_masks` round per poison in `POISONS`; per round the masks (or the error message), whether
    each request's scores are still a `ScoreProduct` afterwards and whether each mask is the request's ``out``."""
    comm = Collectives()
    rounds = []
    for poison in POISONS:
        requests = []
        for index, (direction, grad, k) in enumerate(_poisoned_factors(poison)):
            lo, hi = PRODUCT_BOUNDS[index][rank]
            segment = Segment(index, (PRODUCT_SIZES[index],), lo, hi)
            scores = ScoreProduct(direction[lo:hi].clone(), grad[lo:hi].clone(), torch.full((hi - lo,), math.nan))
            requests.append(TopKMask(segment, scores, k, out=torch.empty(hi - lo, dtype=torch.bool)))
        try:
            masks, raised = topk_masks(comm, requests), None
        except NonFiniteScoresError as err:
            masks, raised = None, str(err)
        rounds.append({
            "masks": masks, "raised": raised,
            "unformed": [isinstance(r.scores, ScoreProduct) for r in requests],
            "in_out": None if masks is None else [m is r.out for m, r in zip(masks, requests)],
        })
    return rounds


@functools.lru_cache(maxsize=None)
def _product_results() -> tuple[list[dict], ...]:
    return tuple(run_distributed(2, _product_rounds))


@pytest.mark.parametrize("round_", range(len(POISONS)), ids=[p[0] for p in POISONS])
def test_score_products_select_like_the_local_mask_and_report_nonfinite_everywhere(round_: int) -> None:
    name, victim, _ = POISONS[round_]
    results = [per_rank[round_] for per_rank in _product_results()]
    tensors = _poisoned_factors(POISONS[round_])
    if not math.isfinite(POISONS[round_][2]):
        for result in results:
            assert result["raised"] == (
                f"MGUP mask scores of tensors [{victim}] contain NaN or infinity (non-finite gradient?)"
            )
        return
    for index, (direction, grad, k) in enumerate(tensors):
        want = topk_mask(direction * grad, k)
        in_flat_order = sorted((0, 1), key=lambda rank: PRODUCT_BOUNDS[index][rank])
        got = torch.cat([results[rank]["masks"][index] for rank in in_flat_order])
        assert torch.equal(got, want), f"{name}: tensor {index}"


def test_whole_tensors_select_from_the_factors_into_out() -> None:
    for rank, per_rank in enumerate(_product_results()):
        result = per_rank[0]
        whole = [hi - lo == PRODUCT_SIZES[i] for i, (lo, hi) in enumerate(b[rank] for b in PRODUCT_BOUNDS)]
        split = [0 < hi - lo < PRODUCT_SIZES[i] for i, (lo, hi) in enumerate(b[rank] for b in PRODUCT_BOUNDS)]
        assert [u for u, w in zip(result["unformed"], whole) if w] == [True] * sum(whole)
        assert [u for u, s in zip(result["unformed"], split) if s] == [False] * sum(split)
        assert [o for o, w, s in zip(result["in_out"], whole, split) if w or s] == [True] * (sum(whole) + sum(split))
