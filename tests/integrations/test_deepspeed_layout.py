"""Flat-partition layouts (`deepspeed_layout`) and stepping through them (`deepspeed_state`), in one process.

The multi-process tests in test_deepspeed.py check the layouts against real DeepSpeed wrappers; here the
arithmetic is checked against brute force over many shapes, cuts and world sizes, and the distributor against
plain stepping of the same optimizer.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import mgup_dist
from mgup_dist.integrations.deepspeed_layout import FlatPartition, TensorPiece, even_split_pieces, flat_cut_pieces
from mgup_dist.integrations.deepspeed_state import TENSORS_KEY, FlatPartitionDistributor, PieceState
from mgup_dist.ops.local import LocalOps
from mgup_dist.shard.layout import ShardLayout
from mgup_dist.shard.segment import Segment


def _random_shapes(rng: random.Random) -> list[tuple[int, ...]]:
    return [tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 6))]


def _owner_of_each_element(pieces_per_rank: list[list[TensorPiece]], shapes: list[tuple[int, ...]]) -> dict:
    owners = {}
    for rank, pieces in enumerate(pieces_per_rank):
        for piece in pieces:
            for element in range(piece.segment.lo, piece.segment.hi):
                assert (piece.segment.index, element) not in owners
                owners[(piece.segment.index, element)] = (rank, piece.offset + element - piece.segment.lo)
    return owners


@pytest.mark.parametrize("seed", range(40))
def test_flat_cut_pieces_match_brute_force(seed: int) -> None:
    """Tensors at (possibly padded) offsets in a flat buffer, padded to ``W·size``: each element is held by the
    rank whose range contains its buffer position, at that position minus the range start."""
    rng = random.Random(seed)
    shapes, world = _random_shapes(rng), rng.randint(1, 4)
    offsets, position = [], 0
    for shape in shapes:
        offsets.append(position)
        position += math.prod(shape) + rng.choice([0, 0, 1, 3])  # alignment padding between tensors
    size = -(-position // world)
    pieces = [flat_cut_pieces(shapes, offsets, r * size, size, first_index=10) for r in range(world)]
    owners = _owner_of_each_element(pieces, shapes)
    for index, (shape, offset) in enumerate(zip(shapes, offsets)):
        for element in range(math.prod(shape)):
            flat = offset + element
            assert owners[(10 + index, element)] == (flat // size, flat % size)
    assert len(owners) == sum(math.prod(s) for s in shapes)
    ShardLayout(shapes, [[(p.segment.lo, p.segment.hi) for p in rank_pieces] for rank_pieces in pieces])


@pytest.mark.parametrize("seed", range(40))
def test_even_split_pieces_match_zero3_partitioning(seed: int) -> None:
    """ZeRO-3: rank r holds ``[r·c, (r+1)·c)`` of each tensor, ``c = ceil(numel / W)``, its parts stored back to
    back, each padded to ``c``."""
    rng = random.Random(seed)
    shapes, world = _random_shapes(rng), rng.randint(1, 4)
    parts = [-(-math.prod(s) // world) for s in shapes]
    pieces = [even_split_pieces(shapes, parts, r, first_index=0) for r in range(world)]
    owners = _owner_of_each_element(pieces, shapes)
    starts = [sum(parts[:i]) for i in range(len(parts))]
    for index, (shape, part) in enumerate(zip(shapes, parts)):
        for element in range(math.prod(shape)):
            assert owners[(index, element)] == (element // part, starts[index] + element % part)
    ShardLayout(shapes, [[(p.segment.lo, p.segment.hi) for p in rank_pieces] for rank_pieces in pieces])


def test_a_straddling_tensor_is_split_at_the_partition_boundary() -> None:
    pieces = flat_cut_pieces([(2, 3), (4,), (5,)], [0, 6, 10], start=8, size=8, first_index=0)
    assert [(p.segment.lo, p.segment.hi, p.offset) for p in pieces] == [(6, 6, 0), (2, 4, 0), (0, 5, 2)]


def test_flat_partition_rejects_overlapping_or_overflowing_pieces() -> None:
    flat = torch.zeros(6)
    whole = Segment.whole(0, (4,))
    with pytest.raises(ValueError, match="overlaps"):
        FlatPartition(flat, (TensorPiece(0, whole, 0), TensorPiece(1, Segment.whole(1, (2,)), 3)))
    with pytest.raises(ValueError, match="reach element 7"):
        FlatPartition(flat, (TensorPiece(0, whole, 3),))
    FlatPartition(flat, (TensorPiece(0, whole, 2), TensorPiece(1, Segment(1, (3,), 0, 0), 0)))


def test_piece_state_keeps_elementwise_state_flat_and_scalars_per_tensor() -> None:
    flat_state: dict = {}
    first = PieceState(flat_state, TensorPiece(0, Segment(0, (4,), 1, 4), 0), numel=8)
    second = PieceState(flat_state, TensorPiece(1, Segment(1, (5,), 0, 5), 3), numel=8)
    first["exp_avg"] = torch.tensor([1.0, 2.0, 3.0])
    assert flat_state["exp_avg"].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    second["exp_avg"].add_(5)  # a view: in-place updates land in the flat tensor
    assert flat_state["exp_avg"].tolist() == [1, 2, 3, 5, 5, 5, 5, 5]
    first["step"] = torch.tensor(3)
    second["alpha_bar"] = 0.25
    assert flat_state[TENSORS_KEY] == {0: {"step": torch.tensor(3)}, 1: {"alpha_bar": 0.25}}
    assert "step" in first and "step" not in second and second.get("alpha_bar") == 0.25
    assert sorted(first) == ["exp_avg", "step"] and len(second) == 2
    with pytest.raises(TypeError, match="float32"):
        first["exp_avg"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="range has 3"):
        first["momentum_buffer"] = torch.zeros(4)


def _flat_setup(optimizer_name: str, **hparams):
    """An optimizer over three parameters, then its groups re-pointed at one flat master holding them with
    padding (as DeepSpeed does), and the distributor over it."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(6, 4), (5,), (3, 7)]]
    optimizer = mgup_dist.build_optimizer(optimizer_name, params, lr=0.1, **hparams)
    offsets = [0, 26, 33]
    flat = torch.zeros(56, requires_grad=True)
    pieces = tuple(
        TensorPiece(i, Segment.whole(i, tuple(p.shape)), offset) for i, (p, offset) in enumerate(zip(params, offsets))
    )
    with torch.no_grad():
        for p, piece in zip(params, pieces):
            flat[piece.offset : piece.offset + p.numel()] = p.reshape(-1)
    optimizer.param_groups[0]["params"] = [flat]
    layout = ShardLayout([p.shape for p in params], [[(0, p.numel()) for p in params]])
    optimizer.distributor = FlatPartitionDistributor(LocalOps(), [FlatPartition(flat, pieces)], layout)
    return optimizer, params, flat, pieces


@pytest.mark.parametrize("name, hparams", [("mgup_adamw", {}), ("alpha_adam", {"alpha_ema": 0.5}), ("mgup_lion", {})])
def test_stepping_flat_partitions_equals_stepping_the_parameters(name: str, hparams: dict) -> None:
    optimizer, params, flat, pieces = _flat_setup(name, **hparams)
    copies = [p.detach().clone().requires_grad_() for p in params]
    reference = mgup_dist.build_optimizer(name, copies, lr=0.1, **hparams)
    for step in range(3):
        grads = [torch.randn(p.shape) for p in params]
        flat.grad = torch.full_like(flat, float("nan"))  # padding must never be read
        for grad, piece in zip(grads, pieces):
            flat.grad.detach()[piece.offset : piece.offset + grad.numel()] = grad.reshape(-1)
        for p, grad in zip(reference.param_groups[0]["params"], grads):
            p.grad = grad
        optimizer.step()
        reference.step()
    flat_state = optimizer.state[flat]
    for p, piece in zip(reference.param_groups[0]["params"], pieces):
        assert torch.equal(flat.detach()[piece.offset : piece.offset + p.numel()], p.detach().reshape(-1))
        for key, value in reference.state[p].items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert torch.equal(flat_state[key][piece.offset : piece.offset + p.numel()], value.reshape(-1)), key
            else:
                assert flat_state[TENSORS_KEY][piece.position][key] == value, key
    saved = optimizer.state_dict()  # torch's own: what DeepSpeed checkpoints
    optimizer.state.clear()
    optimizer.load_state_dict(saved)
    assert optimizer.state[flat].keys() == flat_state.keys()


def test_a_tensor_deepspeed_never_announced_is_an_error() -> None:
    optimizer, _, flat, _ = _flat_setup("mgup_adamw")
    stranger = torch.zeros(56, requires_grad=True)
    stranger.grad = torch.zeros(56)
    optimizer.param_groups[0]["params"] = [stranger]
    with pytest.raises(RuntimeError, match="not one of the flat partitions"):
        optimizer.step()


def test_state_entries_name_the_parameters_and_view_their_ranges() -> None:
    optimizer, params, flat, pieces = _flat_setup("mgup_adamw")
    with pytest.raises(TypeError, match="do not name their parameters"):
        optimizer.distributor.state_entries(optimizer)
    layout = optimizer.distributor.layout
    optimizer.distributor = FlatPartitionDistributor(LocalOps(), [FlatPartition(flat, pieces, tuple(params))], layout)
    flat.grad = torch.randn(56)
    optimizer.step()
    entries = optimizer.distributor.state_entries(optimizer)
    assert [e.param for e in entries] == params and [e.group_index for e in entries] == [0, 0, 0]
    assert [e.segment for e in entries] == [piece.segment for piece in pieces]
    assert torch.equal(entries[2].state["exp_avg"], optimizer.state[flat]["exp_avg"][33:54])
    assert entries[2].state["step"] == 1
    entries[0].state.clear()  # a per-element key goes for the whole partition, scalars per tensor
    assert "exp_avg" not in optimizer.state[flat] and "step" not in entries[0].state and entries[2].state["step"] == 1


def test_state_entries_of_a_partition_outside_the_groups_take_its_group() -> None:
    """ZeRO-3 puts a sub-group's flat partition in ``param_groups`` only while stepping it: between steps the
    partition's own ``group`` places its tensors; without one it is an error."""
    optimizer, params, flat, pieces = _flat_setup("mgup_adamw")
    layout = optimizer.distributor.layout
    optimizer.param_groups[0]["params"] = []
    unplaced = FlatPartitionDistributor(LocalOps(), [FlatPartition(flat, pieces, tuple(params))], layout)
    with pytest.raises(TypeError, match="not the optimizer's"):
        unplaced.state_entries(optimizer)
    placed = FlatPartitionDistributor(LocalOps(), [FlatPartition(flat, pieces, tuple(params), group=0)], layout)
    entries = placed.state_entries(optimizer)
    assert [e.param for e in entries] == params and [e.group_index for e in entries] == [0, 0, 0]
