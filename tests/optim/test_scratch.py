"""`ScratchPool` and the single-process distributor's use of it: buffers are reused across tensors and steps,
grown to the largest request, distinct per name, and never part of the optimizer's state."""
from __future__ import annotations

import torch

from mgup_dist.optim import OPTIMIZERS, build_optimizer
from mgup_dist.optim.scratch import ScratchPool
from mgup_dist.rules.slot import Slot
from mgup_dist.shard.segment import Segment

CPU = torch.device("cpu")


def test_same_name_reuses_storage_and_grows_to_the_largest_request() -> None:
    pool = ScratchPool()
    small = pool("a", 10, torch.float32, CPU)
    again = pool("a", 6, torch.float32, CPU)
    assert small.shape == (10,) and again.shape == (6,) and again.data_ptr() == small.data_ptr()
    large = pool("a", 25, torch.float32, CPU)
    assert large.shape == (25,) and pool.nbytes == 25 * 4
    assert pool("a", 10, torch.float32, CPU).data_ptr() == large.data_ptr()


def test_views_are_kept_per_length_until_the_buffer_grows() -> None:
    """A length asked for again gets the same view (no slicing); after the buffer grows, every length gets a view
    of the new storage, and no view of the old buffer is kept."""
    pool = ScratchPool()
    first = pool("a", 10, torch.float32, CPU)
    assert pool("a", 10, torch.float32, CPU) is first
    assert pool("a", 4, torch.float32, "cpu").data_ptr() == first.data_ptr()
    large = pool("a", 40, torch.float32, CPU)
    again = pool("a", 10, torch.float32, CPU)
    assert again is not first and again.data_ptr() == large.data_ptr() and again.shape == (10,)
    assert all(view.untyped_storage().data_ptr() == large.data_ptr() for view in pool.views.values())


def test_names_and_dtypes_get_separate_buffers() -> None:
    pool = ScratchPool()
    first = pool("a", 8, torch.float32, CPU)
    other = pool("b", 8, torch.float32, CPU)
    flags = pool("a", 8, torch.bool, CPU)
    assert flags.dtype == torch.bool
    pointers = {t.data_ptr() for t in (first, other, flags)}
    assert len(pointers) == 3 and pool.nbytes == 8 * 4 * 2 + 8
    pool.clear()
    assert pool.nbytes == 0


def test_slot_scratch_without_workspace_is_fresh() -> None:
    param = torch.zeros(6, dtype=torch.float64)
    slot = Slot(param, param.clone(), {}, Segment.whole(0, (2, 3)), allocate=lambda dtype: torch.zeros(6, dtype=dtype))
    one, two = slot.scratch("x"), slot.scratch("x")
    assert one.shape == (6,) and one.dtype == torch.float64 and one.data_ptr() != two.data_ptr()
    assert slot.scratch("y", torch.bool).dtype == torch.bool


def test_local_steps_reuse_scratch_and_keep_it_out_of_the_state() -> None:
    """Two steps of every optimizer: the second allocates no new scratch, and ``state_dict`` holds none."""
    for name in sorted(OPTIMIZERS):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((6, 5), (7,), (3, 4))]
        optimizer = build_optimizer(name, params)
        pool = optimizer.distributor.scratch
        for step in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            if step == 0:
                buffers = {key: t.data_ptr() for key, t in pool.buffers.items()}
        assert {key: t.data_ptr() for key, t in pool.buffers.items()} == buffers, name
        assert all(t.numel() <= 30 for t in pool.buffers.values()), name
        state_keys = {key for entry in optimizer.state_dict()["state"].values() for key in entry}
        assert not state_keys & {key[0] for key in pool.buffers}, name


def test_shared_scratch_steps_bit_identically_to_lockstep_fresh_temporaries() -> None:
    """One-at-a-time rules over a shared pool vs lock-step rounds with fresh temporaries (``lockstep`` True
    hands out no pool): three steps of every optimizer give bitwise equal parameters and state."""
    shapes = ((16, 9), (9,), (4, 12), (16, 9))
    for name in sorted(OPTIMIZERS):
        runs = []
        for lockstep in (False, True):
            torch.manual_seed(1)
            params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
            optimizer = build_optimizer(name, params, weight_decay=0.1)
            optimizer.distributor.lockstep = lockstep
            gen = torch.Generator().manual_seed(2)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                optimizer.step()
            assert not (lockstep and optimizer.distributor.scratch.buffers), name
            runs.append((params, optimizer.state_dict()["state"]))
        (ours, state), (theirs, reference) = runs
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), name
        for index, entry in reference.items():
            for key, value in entry.items():
                assert torch.equal(torch.as_tensor(state[index][key]), torch.as_tensor(value)), (name, key)
