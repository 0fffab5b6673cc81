"""`run_rules`: lock-step rounds batch requests by kind; one-at-a-time mode runs each rule to completion; both
give every rule the same answers; a tuple of requests is answered with a tuple in one round; ``ops.settle()``
runs after every round, before any rule sees an answer."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from mgup_dist.ops.local import LocalOps
from mgup_dist.rules.driver import run_rules
from mgup_dist.rules.requests import NonFiniteScoresError, TensorSum, TopKMask
from mgup_dist.shard.segment import Segment


class RecordingOps(LocalOps):
    """LocalOps that logs each call as ``(method, number of requests)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def tensor_sums(self, requests):
        self.calls.append(("tensor_sums", len(requests)))
        return super().tensor_sums(requests)

    def topk_masks(self, requests):
        self.calls.append(("topk_masks", len(requests)))
        return super().topk_masks(requests)

    def settle(self):
        self.calls.append(("settle", 0))


def _rule(index: int, values: torch.Tensor, log: list[Any]):
    """Asks for a sum, then a top-2 mask; logs what it received."""
    segment = Segment.whole(index, tuple(values.shape))
    log.append((index, "start"))
    total = yield TensorSum(segment, values.sum(dtype=torch.float64))
    mask = yield TopKMask(segment, values.float(), 2)
    log.append((index, float(total), mask.tolist()))


def _run(lockstep: bool) -> tuple[list[Any], list[tuple[str, int]]]:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, generator=gen) for _ in range(3)]
    log: list[Any] = []
    ops = RecordingOps()
    run_rules([_rule(i, t, log) for i, t in enumerate(tensors)], ops, lockstep=lockstep)
    return log, ops.calls


def test_lockstep_batches_each_round() -> None:
    log, calls = _run(lockstep=True)
    assert calls == [("tensor_sums", 3), ("settle", 0), ("topk_masks", 3), ("settle", 0)]
    assert [entry[1] for entry in log[:3]] == ["start"] * 3  # every rule started before any answer came


def test_one_at_a_time_finishes_each_rule_before_the_next() -> None:
    log, calls = _run(lockstep=False)
    assert calls == [("tensor_sums", 1), ("settle", 0), ("topk_masks", 1), ("settle", 0)] * 3
    assert [entry[0] for entry in log] == [0, 0, 1, 1, 2, 2]
    assert [entry[1] for entry in log[::2]] == ["start"] * 3


def test_both_modes_give_the_same_answers() -> None:
    lockstep, _ = _run(lockstep=True)
    single, _ = _run(lockstep=False)
    finished = lambda log: sorted(entry for entry in log if entry[1] != "start")  # noqa: E731
    assert finished(lockstep) == finished(single) and len(finished(single)) == 3


@pytest.mark.parametrize("lockstep", [True, False])
def test_unknown_request_kind_raises(lockstep: bool) -> None:
    def rule():
        yield "not a request"

    with pytest.raises(TypeError, match="unknown request kinds"):
        run_rules([rule()], LocalOps(), lockstep=lockstep)


def _pair_rule(index: int, values: torch.Tensor, log: list[Any]):
    """Asks for a sum and a top-2 mask together, then a sum alone."""
    segment = Segment.whole(index, tuple(values.shape))
    total, mask = yield (TensorSum(segment, values.sum(dtype=torch.float64)), TopKMask(segment, values.float(), 2))
    again = yield TensorSum(segment, values.sum(dtype=torch.float64))
    log.append((index, float(total), mask.tolist(), float(again)))


@pytest.mark.parametrize("lockstep", [True, False])
def test_a_tuple_of_requests_is_answered_with_a_tuple_in_one_round(lockstep: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5, generator=gen) for _ in range(2)]
    log: list[Any] = []
    ops = RecordingOps()
    run_rules([_pair_rule(i, t, log) for i, t in enumerate(tensors)], ops, lockstep=lockstep)
    one_round = [("tensor_sums", 1), ("topk_masks", 1), ("settle", 0), ("tensor_sums", 1), ("settle", 0)]
    assert ops.calls == ([("tensor_sums", 2), ("topk_masks", 2), ("settle", 0), ("tensor_sums", 2), ("settle", 0)]
                         if lockstep else one_round * 2)
    for index, t in enumerate(tensors):
        entry = next(e for e in log if e[0] == index)
        top = [i in t.topk(2).indices.tolist() for i in range(5)]
        assert entry == (index, float(t.sum(dtype=torch.float64)), top, float(t.sum(dtype=torch.float64)))


class FailingSettleOps(LocalOps):
    """Answers as LocalOps but its verdict raises after the first round."""

    def settle(self):
        raise NonFiniteScoresError("pending verdict")


@pytest.mark.parametrize("lockstep", [True, False])
def test_a_settle_error_reaches_no_rule(lockstep: bool) -> None:
    log: list[Any] = []
    with pytest.raises(NonFiniteScoresError, match="pending verdict"):
        run_rules([_rule(i, torch.randn(4), log) for i in range(2)], FailingSettleOps(), lockstep=lockstep)
    assert all(entry[1] == "start" for entry in log)  # no rule got past its first request
