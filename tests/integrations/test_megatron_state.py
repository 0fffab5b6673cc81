"""`mgup_dist.integrations.megatron_state`: Megatron's main shards as `Segment`s, on a stand-in for Megatron's
``DistributedOptimizer`` bookkeeping (its ``model_*_groups`` / ``shard_*_groups`` and ``param_range_map``).
The end-to-end behaviour under real Megatron is `tests/integrations/test_megatron.py`."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mgup_dist.integrations.megatron_state import MegatronShardDistributor, check_cover, shard_entries
from mgup_dist.ops.local import LocalOps
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout
from tests.distributed import run_distributed


def _wrapper(params: list[torch.Tensor], ranges: dict[int, tuple[int, int]]) -> SimpleNamespace:
    """Megatron's view of one fp32 group: ``ranges[i]`` is the held range of ``params[i]`` (absent: none)."""
    held = [i for i in range(len(params)) if i in ranges]
    shards = [params[i].detach().view(-1)[slice(*ranges[i])] for i in held]
    by_id = {id(params[i]): ranges[i] for i in held}
    return SimpleNamespace(
        model_fp32_groups=[[params[i] for i in held]], shard_fp32_groups=[shards],
        model_float16_groups=[[]], shard_fp32_from_float16_groups=[[]],
        _get_model_param_range_map=lambda p: {"param": SimpleNamespace(start=by_id[id(p)][0], end=by_id[id(p)][1])},
    )


def _params() -> list[torch.Tensor]:
    return [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]


def test_entries_map_ranges_to_segments_and_missing_tensors_to_empty_ones() -> None:
    params = _params()
    entries = shard_entries(_wrapper(params, {0: (5, 12)}), [params])
    assert [(e.segment.index, e.segment.shape, e.segment.lo, e.segment.hi) for e in entries] == [
        (0, (3, 4), 5, 12), (1, (5,), 0, 0)
    ]
    assert entries[0].main is not None and entries[0].main.numel() == 7 and entries[1].main is None


def test_slots_step_every_tensor_with_empty_pieces_where_nothing_is_held() -> None:
    params = _params()
    wrapper = _wrapper(params, {0: (5, 12)})
    entries = shard_entries(wrapper, [params])
    wrapper.shard_fp32_groups[0][0].grad = torch.ones(7)
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}], state=defaultdict(dict))
    layout = ShardLayout([(3, 4), (5,)], [[(0, 12), (0, 5)]])  # kept for inspection only
    slots = list(MegatronShardDistributor(LocalOps(), entries, [layout]).slots(optimizer))
    assert [slot.param.numel() for _, slot in slots] == [7, 0]
    assert slots[0][1].state is optimizer.state[wrapper.shard_fp32_groups[0][0]]
    assert slots[1][1].buffer("m").numel() == 0


def test_state_entries_name_model_parameters_and_refuse_model_parallel_layouts() -> None:
    params = _params()
    wrapper = _wrapper(params, {0: (5, 12)})
    entries = shard_entries(wrapper, [params])
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}], state=defaultdict(dict))
    layout = ShardLayout([(3, 4), (5,)], [[(0, 12), (0, 5)]])
    listed = MegatronShardDistributor(LocalOps(), entries, [layout]).state_entries(optimizer)
    assert [e.param for e in listed] == params and [e.group_index for e in listed] == [0, 0]
    assert [(e.segment.lo, e.segment.hi) for e in listed] == [(5, 12), (0, 0)]
    assert listed[0].state is optimizer.state[wrapper.shard_fp32_groups[0][0]]
    refusing = MegatronShardDistributor(LocalOps(), entries, [layout], checkpoint_refusal="not at TP=2, PP=1")
    with pytest.raises(NotImplementedError, match="not at TP=2, PP=1"):
        refusing.state_entries(optimizer)


def test_a_held_shard_without_gradient_raises() -> None:
    params = _params()
    entries = shard_entries(_wrapper(params, {1: (0, 5)}), [params])
    distributor = MegatronShardDistributor(LocalOps(), entries, [ShardLayout([(3, 4), (5,)], [[(0, 12), (0, 5)]])])
    with pytest.raises(RuntimeError, match="no gradient"):
        list(distributor.slots(SimpleNamespace(param_groups=[{}], state={})))


def test_a_shard_whose_size_disagrees_with_its_range_raises() -> None:
    params = _params()
    wrapper = _wrapper(params, {0: (0, 4)})
    wrapper.shard_fp32_groups[0][0] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="has 3 elements but its range"):
        shard_entries(wrapper, [params])


def _cover(rank: int, world_size: int, ranges: list[dict[int, tuple[int, int]]]) -> Any:
    params = _params()
    entries = shard_entries(_wrapper(params, ranges[rank]), [params])
    try:
        return check_cover(entries, Collectives(torch.distributed.group.WORLD)).bounds
    except ValueError as error:
        return str(error)


def test_cover_check_accepts_a_split_and_rejects_an_overlap() -> None:
    good = [{0: (0, 7), 1: (0, 5)}, {0: (7, 12)}]
    bad = [{0: (0, 7), 1: (0, 5)}, {0: (6, 12)}]
    assert run_distributed(2, _cover, good)[0] == (((0, 7), (0, 5)), ((7, 12), (0, 0)))
    assert all("miss or overlap" in message for message in run_distributed(2, _cover, bad))
