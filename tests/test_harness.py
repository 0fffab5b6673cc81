"""The multi-process harness itself: results come back per rank, and a rank's failure is reported."""
import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _sum_ranks(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t)


def _fail_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom")


def test_results_per_rank() -> None:
    assert run_distributed(3, _sum_ranks) == [3.0, 3.0, 3.0]


def test_rank_failure_is_reported() -> None:
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_distributed(2, _fail_on_one)
