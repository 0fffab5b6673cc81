"""`ShardedDistributor`, `ShardedTensors` and `gather_full` (in one process; ranks simulated by threads where
a collective is needed). Stepping real optimizers on gloo ranks is test_invariance's job."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mgup_dist.optim import AdamW
from mgup_dist.shard.distributor import LocalShard, ShardedDistributor, ShardedTensors, gather_full
from mgup_dist.shard.layout import flat_layout
from mgup_dist.shard.segment import Segment


class ThreadComm:
    """``all_gather_uneven`` among ``world_size`` threads sharing ``board`` and ``barrier``."""

    def __init__(self, rank: int, world_size: int, board: dict, barrier: threading.Barrier) -> None:
        self.rank, self.world_size, self.board, self.barrier = rank, world_size, board, barrier
        self.dtypes: list[torch.dtype] = []

    def all_gather_uneven(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        self.dtypes.append(tensor.dtype)
        assert tensor.numel() == sizes[self.rank]
        self.board[self.rank] = tensor.clone()
        self.barrier.wait()
        out = torch.cat([self.board[r] for r in range(self.world_size)])
        self.barrier.wait()
        return out


def _on_threads(world_size: int, fn) -> list:  # type: ignore[no-untyped-def]
    board: dict = {}
    barrier = threading.Barrier(world_size, timeout=30)
    with ThreadPoolExecutor(world_size) as pool:
        comms = [ThreadComm(r, world_size, board, barrier) for r in range(world_size)]
        return list(pool.map(fn, range(world_size), comms))


SHAPES = [(3, 4), (5,), (1,), (2, 1, 3)]


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in zip(SHAPES, dtypes)]


def test_gather_full_reassembles_every_tensor_one_gather_per_dtype() -> None:
    full = [p.detach() for p in _params()]
    layout = flat_layout(SHAPES, 3, cuts=[5, 5])  # rank 1 empty, tensor 0 split over ranks 0 and 2

    def rank_fn(rank: int, comm: ThreadComm) -> tuple[list[torch.Tensor], list[torch.dtype]]:
        pieces = [t.reshape(-1)[s.lo : s.hi].clone() for t, s in zip(full, layout.segments(rank))]
        return gather_full(comm, layout, pieces), comm.dtypes

    for gathered, dtypes in _on_threads(3, rank_fn):
        assert all(torch.equal(g, f) and g.dtype == f.dtype for g, f in zip(gathered, full))
        assert dtypes == [torch.float32, torch.bfloat16, torch.float64]


def test_gather_full_checks_the_piece_count() -> None:
    with pytest.raises(ValueError, match="1 local pieces for a layout of 4 tensors"):
        gather_full(None, flat_layout(SHAPES, 1), [torch.zeros(1)])  # type: ignore[arg-type]


def test_sharded_tensors_copy_segments_and_write_back() -> None:
    params = _params()
    before = [p.detach().clone() for p in params]
    layout = flat_layout(SHAPES, 2)  # 12 + 5 + 1 + 6 = 24: rank 0 holds [0, 12), rank 1 [12, 24)
    engines = [ShardedTensors(params, layout, rank) for rank in range(2)]
    engine = engines[1]
    assert [p.numel() for p in engine.local_params] == [0, 5, 1, 6]
    engine.local_params[1].add_(1)  # a copy: the full parameter is untouched until write_back
    assert torch.equal(params[1], before[1])
    engine.load_grads([torch.ones(s) for s in SHAPES[:3]] + [None])
    assert [None if g is None else g.numel() for g in engine.local_grads] == [0, 5, 1, None]
    for rank_engine in engines:
        for piece in rank_engine.local_params:
            piece.mul_(2)
    _on_threads(2, lambda rank, comm: engines[rank].write_back(comm))
    assert torch.equal(params[0], before[0] * 2)
    assert torch.equal(params[1], (before[1] + 1) * 2)


def test_sharded_tensors_need_the_layout_shapes() -> None:
    with pytest.raises(ValueError, match="differ from the layout"):
        ShardedTensors(_params(), flat_layout(SHAPES[:3], 2), 0)


def test_slots_use_the_full_parameter_group_and_segment_sized_state() -> None:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    optimizer = AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}])
    layout = flat_layout(SHAPES, 2)
    engine = ShardedTensors(params, layout, 1)
    engine.load_grads([torch.zeros(s) for s in SHAPES[:3]] + [None])  # the last tensor is skipped
    slots = list(engine.distributor(optimizer.distributor.ops).slots(optimizer))
    assert [slot.segment for _, slot in slots] == layout.segments(1)[:3]
    assert [group["lr"] for group, _ in slots] == [optimizer.defaults["lr"]] * 2 + [0.5]
    _, slot = slots[1]
    buffer = slot.buffer("exp_avg", torch.bfloat16)
    assert buffer.shape == (5,) and buffer.dtype == torch.bfloat16 and not buffer.any()
    assert optimizer.state[params[1]]["exp_avg"] is slot.state["exp_avg"]


def _distributor(shard: LocalShard) -> ShardedDistributor:
    return ShardedDistributor(None, lambda: [shard])  # type: ignore[arg-type]


def test_slots_reject_foreign_parameters_lost_shapes_and_wrong_pieces() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = AdamW([param])
    stranger = torch.nn.Parameter(torch.zeros(2, 3))
    segment = Segment(0, (2, 3), 1, 4)
    piece = torch.zeros(3)
    with pytest.raises(ValueError, match="tensor 0 .* is not a parameter of AdamW"):
        list(_distributor(LocalShard(stranger, segment, piece, piece)).slots(optimizer))
    with pytest.raises(ValueError, match=r"parameter has shape \(2, 3\) but the engine's segment has logical shape"):
        list(_distributor(LocalShard(param, Segment(0, (6,), 1, 4), piece, piece)).slots(optimizer))
    with pytest.raises(ValueError, match="local grad must be contiguous 1-D with 3 elements"):
        list(_distributor(LocalShard(param, segment, piece, torch.zeros(4))).slots(optimizer))
    with pytest.raises(ValueError, match="local param must be contiguous 1-D with 3 elements"):
        list(_distributor(LocalShard(param, segment, torch.zeros(3, 1), piece)).slots(optimizer))
