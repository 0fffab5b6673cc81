"""Training windows depend only on (seed, step); ranks get disjoint slices whose union is the global batch."""
from __future__ import annotations

import torch

from launch.batches import EvalWindows, TrainWindows

CPU = torch.device("cpu")
TOKENS = torch.arange(1000, dtype=torch.int64).remainder(251).to(torch.uint8)


def _rows(windows: TrainWindows, step: int, world: int, micro: int) -> list[list[int]]:
    rows = []
    for rank in range(world):
        for x, _ in windows.micro_batches(step, rank, world, micro, CPU):
            rows += x.tolist()
    return rows


def test_same_global_batch_at_every_world_size_and_split() -> None:
    windows = TrainWindows(TOKENS, block_size=8, global_batch=8, seed=3)
    reference = _rows(windows, step=5, world=1, micro=8)
    for world, micro in ((1, 2), (2, 4), (2, 1), (4, 2), (8, 1)):
        assert _rows(windows, 5, world, micro) == reference


def test_ranks_get_disjoint_contiguous_slices() -> None:
    windows = TrainWindows(TOKENS, block_size=8, global_batch=8, seed=3)
    offsets = windows.offsets(2)
    for rank in range(4):
        (x, _), = list(windows.micro_batches(2, rank, 4, 2, CPU))
        assert [row[0] for row in x.tolist()] == [int(TOKENS[o]) for o in offsets[2 * rank:2 * rank + 2]]


def test_windows_are_deterministic_per_step_and_seed() -> None:
    a = TrainWindows(TOKENS, 8, 16, seed=1)
    b = TrainWindows(TOKENS, 8, 16, seed=1)
    assert torch.equal(a.offsets(7), b.offsets(7))
    assert not torch.equal(a.offsets(7), a.offsets(8))
    assert not torch.equal(a.offsets(7), TrainWindows(TOKENS, 8, 16, seed=2).offsets(7))
    assert int(a.offsets(7).max()) <= TOKENS.numel() - 9


def test_targets_are_inputs_shifted_by_one() -> None:
    windows = TrainWindows(TOKENS, block_size=8, global_batch=4, seed=0)
    for (x, y), offset in zip(windows.micro_batches(1, 0, 1, 1, CPU), windows.offsets(1)):
        window = TOKENS[int(offset):int(offset) + 9].long()
        assert torch.equal(x[0], window[:-1]) and torch.equal(y[0], window[1:])
        assert x.dtype == torch.long and x.shape == (1, 8)


def test_eval_windows_are_partitioned_over_ranks() -> None:
    evals = EvalWindows(TOKENS, block_size=8, count=7, seed=0)
    single = [row for x, _ in evals.micro_batches(0, 1, 3, CPU) for row in x.tolist()]
    split = [row for rank in range(3) for x, _ in evals.micro_batches(rank, 3, 2, CPU) for row in x.tolist()]
    assert len(single) == 7 and sorted(split) == sorted(single)
