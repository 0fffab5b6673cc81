"""`CollectiveCounter` counts what `mgup_dist.shard.collectives.Collectives` counts for the same calls (its
byte convention), nested calls once; `CallCounter` counts calls and shapes of a wrapped function."""
from __future__ import annotations

import types

import torch
import torch.distributed as dist

from benchmarks.collective_counter import CallCounter, CollectiveCounter
from tests.distributed import run_distributed


def _both_counts(rank: int, world_size: int) -> tuple[dict[str, int], dict[str, int]]:
    import mgup_dist.shard.collectives as collectives

    counter = CollectiveCounter()
    counter.install()
    collectives._all_gather_single = dist.all_gather_single
    collectives._reduce_scatter_single = dist.reduce_scatter_single
    try:
        comm = collectives.Collectives()
        comm.all_reduce(torch.ones(10))
        comm.reduce_scatter(torch.ones(8))
        comm.all_gather_equal(torch.ones(3, dtype=torch.float64))
        comm.all_to_all(torch.ones(5), [2, 3], [2, 2] if rank == 0 else [3, 3])
        dist.all_gather_object([None] * world_size, {"rank": rank})  # an object collective: a call, no bytes
        ours = {kind: stats.bytes for kind, stats in comm.stats.items()}
        return dict(counter.bytes_by_kind), ours | {"object": 0}
    finally:
        counter.uninstall()


def test_bytes_agree_with_collectives_stats() -> None:
    for rank, (counted, expected) in enumerate(run_distributed(2, _both_counts)):
        assert counted == expected
        assert counted["all_reduce"] == 40 and counted["reduce_scatter"] == 16 and counted["all_gather"] == 24
        assert counted["all_to_all"] == (3 if rank == 0 else 2) * 4


def test_call_counter_counts_calls_and_shapes() -> None:
    module = types.SimpleNamespace(double=lambda t, scale=2: t * scale)
    counter = CallCounter()
    counter.wrap(module, "double", shape_arg=0)
    assert torch.equal(module.double(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    module.double(torch.ones(4), scale=3)
    assert counter.calls == 2 and counter.shapes == [(2, 3), (4,)]
    counter.reset()
    assert counter.calls == 0 and counter.shapes == []
