"""FSDP2 (``fully_shard``, DTensor parameters) with mgup_dist optimizers, on gloo ranks.

Users shard with ``fully_shard`` and build the optimizer over ``model.parameters()`` (or
``muon_param_groups(model)``); nothing else. The tests check, against a single-process run of the same
model on the same data (`tests.integrations.fsdp_harness`):

- W=2 and W=4 on a 1-D mesh, for MGUP-AdamW, MGUP-Muon, AlphaAdam and MARS-M: parameters after 5 steps
  equal bit for bit. The harness makes FSDP2's gradient averaging exact (see its docstring), so any
  difference is the optimizer's. MARS-M's clip norm is a float sum across ranks, so it is allowed 1e-6
  relative (it is in practice bitwise here too); everything else (elementwise math, int64 counts, exact
  top-k, owner-computed Newton–Schulz) is bitwise by construction.
- HSDP on a 2x2 mesh: bitwise equality; and with distinct micro-batches per rank, FSDP2's averaged gradient
  matches the single-process average over all four micro-batches (so the replicate dimension is already
  reduced and the optimizer adds no collective there), to float32 rounding of a 4-term sum.
- Optimizer state is DTensors placed like the parameters; a DCP checkpoint saved at W=2 loads at W=4 (1-D
  and HSDP meshes), holds the same state, and continues bitwise like the uninterrupted run.
- Uneven dim-0 sizes (13, 18, 10, 6, 5 rows) and fewer rows than ranks (1) are part of the model; a plain
  parameter mixed in, and ``Replicate()`` DTensors beside a ``Shard(0)`` one, are stepped locally and match
  too; unsupported placements raise ValueError (at construction, or at the step for a misplaced gradient).
"""
from __future__ import annotations


import pytest
import torch

from mgup_dist.integrations.fsdp import chunk_rows
from tests.distributed import run_distributed
from tests.integrations import fsdp_harness, fsdp_workers
from tests.integrations.fsdp_harness import OPTIMIZERS, RunResult

NORM_ACROSS_RANKS = {"mars_m"}  # MARS clip norm: a float64 sum whose order depends on the layout
EXPECTED_ERRORS = {
    "shard1": "Shard(dim=1)",
    "partial": "Partial",
    "mesh3d": "3-D device mesh",
    "two_shard_dims": "Shard(0) on 2 mesh dimensions",
    "two_groups": "one optimizer needs one shard group",
    "grad_placement": "redistribute the gradient",
    "plain_grad": "is a DTensor but its gradient is not",
    "state_length": "per-element state must match the local shard",
}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fsdp_dcp"))


@pytest.fixture(scope="module")
def two_ranks(checkpoint_dir: str) -> list[dict]:
    return run_distributed(2, fsdp_workers.two_rank_job, checkpoint_dir)


@pytest.fixture(scope="module")
def four_ranks(two_ranks: list[dict], checkpoint_dir: str) -> list[dict]:
    return run_distributed(4, fsdp_workers.four_rank_job, checkpoint_dir)  # resumes two_ranks' checkpoints


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], name: str) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        if name in NORM_ACROSS_RANKS:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
        else:
            assert torch.equal(ours[key], theirs[key]), (
                f"{name}: {key} differs by {(ours[key] - theirs[key]).abs().max().item():.3e}"
            )


def _assert_matches_reference(result: RunResult, name: str) -> None:
    assert result.distributor == "FSDPDistributor"
    _assert_same(result.fsdp, result.reference, name)


def _assert_trained(result: RunResult) -> None:
    """Guards against a vacuous comparison: every parameter moved away from its initial value."""
    torch.manual_seed(fsdp_harness.SEED)
    initial = dict(fsdp_harness.TinyGPT().named_parameters())
    for key, param in initial.items():
        assert not torch.equal(result.fsdp[key], param.detach()), f"{key} did not change"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_match_single_process(two_ranks: list[dict], name: str) -> None:
    for rank_result in two_ranks:
        _assert_matches_reference(rank_result[f"exact/{name}"], name)
    _assert_trained(two_ranks[0][f"exact/{name}"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_four_ranks_match_single_process(four_ranks: list[dict], name: str) -> None:
    for rank_result in four_ranks:
        _assert_matches_reference(rank_result[f"exact/{name}"], name)


def test_hsdp_mesh_matches_single_process(four_ranks: list[dict]) -> None:
    for rank_result in four_ranks:
        _assert_matches_reference(rank_result["hsdp_exact/mgup_muon"], "mgup_muon")


@pytest.mark.parametrize(("job", "key", "bound"), [
    ("two", "split/mgup_adamw", 0.0),  # (g0 + g1) / 2: a 2-term sum is exact in any order
    ("four", "hsdp_split/mgup_adamw", 1e-6),  # 4-term sum over shard, then replicate group
])
def test_data_parallel_gradients_are_averaged(
    two_ranks: list[dict], four_ranks: list[dict], job: str, key: str, bound: float
) -> None:
    results = two_ranks if job == "two" else four_ranks
    for rank_result in results:
        result = rank_result[key]
        assert result.grad_error <= bound
        _assert_matches_reference(result, "mgup_adamw")


def test_plain_parameter_mixed_in(two_ranks: list[dict]) -> None:
    result = two_ranks[0]["plain_extra/mgup_muon"]
    _assert_matches_reference(result, "mgup_muon")
    assert "plain_extra" in result.fsdp


def test_replicated_dtensors_beside_sharded_ones(two_ranks: list[dict]) -> None:
    placed, plain = two_ranks[0]["mixed_placements"]
    for ours, theirs in zip(placed, plain):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_is_dtensor_like_the_parameter(two_ranks: list[dict], name: str) -> None:
    layout = two_ranks[0][f"state_layout/{name}"]
    per_element = {key: ok for key, ok in layout.items() if not key.startswith("scalar:")}
    assert per_element and all(per_element.values()), layout
    assert layout["scalar:step"], layout


@pytest.mark.parametrize("name", fsdp_workers.CHECKPOINTED)
def test_checkpoint_resumes_on_another_mesh(two_ranks: list[dict], four_ranks: list[dict], name: str) -> None:
    saved = two_ranks[0][f"saved_state/{name}"]
    for rank_result in four_ranks:
        for loaded in (rank_result[f"loaded_state/{name}"], rank_result[f"loaded_reference_state/{name}"]):
            assert loaded.keys() == saved.keys()
            for key, value in saved.items():
                assert torch.equal(torch.as_tensor(loaded[key]), torch.as_tensor(value)), key
        resumed = rank_result[f"resumed/{name}"]
        _assert_same(resumed.fsdp, two_ranks[0][f"exact/{name}"].fsdp, name)
        _assert_matches_reference(resumed, name)
        assert all(rank_result[f"resumed_layout/{name}"].values())


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_unsupported_layouts_raise(two_ranks: list[dict], case: str) -> None:
    for rank_result in two_ranks:
        message = rank_result["errors"][case]
        assert message is not None, f"{case} was accepted"
        assert EXPECTED_ERRORS[case] in message, message


@pytest.mark.parametrize("rows", [0, 1, 3, 5, 8, 13])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_chunk_rows_follow_torch_chunk(rows: int, shards: int) -> None:
    pieces = torch.arange(rows).chunk(shards) if rows else ()
    for coordinate in range(shards):
        lo, hi = chunk_rows(rows, shards, coordinate)
        expected = pieces[coordinate].tolist() if coordinate < len(pieces) else []
        assert list(range(lo, hi)) == expected
