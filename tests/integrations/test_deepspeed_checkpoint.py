"""`mgup_dist.integrations.deepspeed_checkpoint`: a DeepSpeed run's state saved at W=2 in the shared reshardable
format loads at W=1 into exactly the same logical state (model, fp32 masters, every per-tensor optimizer state
entry and scalar, groups): saving it again there gives the same checkpoint, entry for entry, bit for bit. Pairs:
ZeRO-2 -> ZeRO-1, ZeRO-3 -> ZeRO-3, ZeRO-3 -> ZeRO-1 and ZeRO-2 -> ZeRO-3. The case is MGUP-Muon in bf16
(model != master, Muon momentum and AdamW moments, ``step`` scalars, a tied embedding), trained two steps first
so that every entry is non-trivial; the saved bf16 model (gathered whole at ZeRO-3) is the saved fp32 master
(assembled from both ranks' ranges) rounded to bf16, entry by entry. Also: the format is the one
`mgup_dist.checkpoint` reads and writes (a replicated optimizer loads it; a replicated run's checkpoint loads
into DeepSpeed at ZeRO-1 and ZeRO-3)."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mgup_dist.checkpoint import (
    GROUPS_KEY, MODEL_PREFIX, STATE_PREFIX, load_optimizer_state_dict, model_state_dict, optimizer_state_dict,
)
from mgup_dist.optim.param_groups import muon_param_groups
from mgup_dist.zero import MASTER_PREFIX
from tests.distributed import run_distributed
from tests.integrations.deepspeed_harness import RUN_OVERRIDES, batches, load, make_model

SAVED_AT_2 = "zero2_mgup_muon_bf16.json"
LOADED_AT_1 = "zero1_mgup_muon_bf16.json"
ZERO3 = "zero3_mgup_muon_bf16.json"
REPLICATED = "zero1_mgup_muon_fp32.json"
REPLICATED_ZERO3 = "zero3_mgup_muon_fp32.json"
# (saved at W=2, loaded at W=1 and saved again): checkpoint names in the `checkpoints` fixture
ROUND_TRIPS = [("zero2", "zero2_at_zero1"), ("zero3", "zero3_at_zero3"), ("zero3", "zero3_at_zero1"),
               ("zero2", "zero2_at_zero3")]


def _engine(name: str, world_size: int, rank: int) -> Any:
    import os

    import mgup_dist.deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    config = {**load(name), **RUN_OVERRIDES}
    return mgup_dist.deepspeed.initialize(model=make_model(), config=config)[0]


def _train_and_save(rank: int, world_size: int, cases: list[tuple[str, str]]) -> None:
    """For each ``(config, directory)``: two steps, then the state saved to ``directory``."""
    from mgup_dist.integrations.deepspeed_checkpoint import state_dict

    for config, directory in cases:
        engine = _engine(config, world_size, rank)
        for micro in batches(world_size)[:2]:
            engine.backward(engine(micro[rank]))
            engine.step()
        dcp.save(state_dict(engine.module, engine.optimizer.optimizer), checkpoint_id=directory)
        engine.destroy()


def _load_and_save(rank: int, world_size: int, cases: list[tuple[str, str, str]]) -> None:
    """For each ``(config, source, directory)``: a fresh engine loads ``source`` and saves to ``directory``."""
    from mgup_dist.integrations.deepspeed_checkpoint import load_state_dict, state_dict

    for config, source, directory in cases:
        engine = _engine(config, world_size, rank)
        load_state_dict(engine.module, engine.optimizer.optimizer, source)
        dcp.save(state_dict(engine.module, engine.optimizer.optimizer), checkpoint_id=directory)
        engine.destroy()


def _replicated_checkpoint(directory: Path) -> None:
    """A single-process MGUP-Muon run (fp32) of one step, saved with `mgup_dist.checkpoint`."""
    from mgup_dist.integrations.deepspeed import default_params
    from mgup_dist.integrations.deepspeed_config import optimizer_spec

    model = make_model()
    spec = optimizer_spec(load(REPLICATED))
    optimizer = spec.build(default_params(spec.cls, model))
    model(batches(1)[0][0]).backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save({**model_state_dict(model), **optimizer_state_dict(optimizer, model)}, checkpoint_id=str(directory),
                 no_dist=True)


def _read_all(directory: Path) -> dict[str, Any]:
    """Every entry of a DCP checkpoint, whole (tensors) or unpickled (groups), read in this process."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    state = {
        key: torch.zeros(tuple(meta.size), dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata)
        else None
        for key, meta in metadata.items()
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    state[GROUPS_KEY] = pickle.loads(state[GROUPS_KEY])
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints by name: ``zero2``/``zero3`` saved by DeepSpeed at W=2; ``<source>_at_<stage>`` that loaded
    and saved again at W=1 (`ROUND_TRIPS`); ``replicated``, a single-process run's, and it loaded and saved again
    by DeepSpeed at W=1, ``replicated_at_zero1``/``replicated_at_zero3``."""
    root = tmp_path_factory.mktemp("ds_ckpt")
    names = ["zero2", "zero3", "replicated", "replicated_at_zero1", "replicated_at_zero3"]
    paths = {name: root / name for name in names + [again for _, again in ROUND_TRIPS]}
    run_distributed(2, _train_and_save, [(SAVED_AT_2, str(paths["zero2"])), (ZERO3, str(paths["zero3"]))])
    _replicated_checkpoint(paths["replicated"])
    configs = {"zero1": LOADED_AT_1, "zero3": ZERO3}
    cases = [(configs[again.rsplit("_", 1)[1]], str(paths[source]), str(paths[again])) for source, again in ROUND_TRIPS]
    cases += [(REPLICATED, str(paths["replicated"]), str(paths["replicated_at_zero1"])),
              (REPLICATED_ZERO3, str(paths["replicated"]), str(paths["replicated_at_zero3"]))]
    run_distributed(1, _load_and_save, cases)
    return paths


def _assert_same(saved: dict[str, Any], again: dict[str, Any]) -> None:
    assert set(saved) == set(again)
    for key, value in saved.items():
        assert (torch.equal(value, again[key]) if torch.is_tensor(value) else value == again[key]), key


@pytest.mark.parametrize("source, again", ROUND_TRIPS)
def test_w2_checkpoint_loads_exactly_at_w1(checkpoints: dict[str, Path], source: str, again: str) -> None:
    saved = _read_all(checkpoints[source])
    module = make_model()
    model = dict(module.named_parameters())
    names = {id(p): n for n, p in model.items()}
    matrices = [names[id(p)] for g in muon_param_groups(module) if g["use_muon"] for p in g["params"]]
    assert matrices
    for name in model:
        assert f"{MODEL_PREFIX}{name}" in saved and saved[f"{MASTER_PREFIX}{name}"].shape == (model[name].numel(),)
        if name in matrices:  # Muon path: momentum
            assert saved[f"{STATE_PREFIX}{name}.momentum_buffer"].abs().sum() > 0
        else:  # AdamW path: moments and a step counter
            assert int(saved[f"{STATE_PREFIX}{name}.step"]) == 2
            assert saved[f"{STATE_PREFIX}{name}.exp_avg_sq"].abs().sum() > 0
        master = saved[f"{MASTER_PREFIX}{name}"]  # the bf16 model is the rounded fp32 master
        assert torch.equal(saved[f"{MODEL_PREFIX}{name}"].reshape(-1), master.to(torch.bfloat16)), name
    assert saved[f"{MODEL_PREFIX}lm_head.weight"].dtype == torch.bfloat16
    bf16_model = saved[f"{MODEL_PREFIX}embed.weight"].float().reshape(-1)
    assert not torch.equal(bf16_model, saved[f"{MASTER_PREFIX}embed.weight"])
    _assert_same(saved, _read_all(checkpoints[again]))


@pytest.mark.parametrize("again", ["replicated_at_zero1", "replicated_at_zero3"])
def test_replicated_checkpoint_loads_into_deepspeed(checkpoints: dict[str, Path], again: str) -> None:
    """A checkpoint of a replicated optimizer (backend single/ddp) has no master entries: DeepSpeed's masters
    come from the loaded model; every model and optimizer entry survives the round trip unchanged."""
    replicated, loaded = _read_all(checkpoints["replicated"]), _read_all(checkpoints[again])
    assert set(loaded) - set(replicated) == {k for k in loaded if k.startswith(MASTER_PREFIX)}
    for key, value in replicated.items():
        assert (torch.equal(value, loaded[key]) if torch.is_tensor(value) else value == loaded[key]), key
    for name, param in make_model().named_parameters():
        assert torch.equal(loaded[f"{MASTER_PREFIX}{name}"], replicated[f"{MODEL_PREFIX}{name}"].reshape(-1))


@pytest.mark.parametrize("source", ["zero2", "zero3"])
def test_replicated_optimizer_reads_the_format(checkpoints: dict[str, Path], source: str) -> None:
    """The optimizer entries are `mgup_dist.checkpoint`'s: a single-process MGUP-Muon over the same model
    loads them and holds the same state."""
    from mgup_dist.integrations.deepspeed import default_params
    from mgup_dist.integrations.deepspeed_config import optimizer_spec

    saved = _read_all(checkpoints[source])
    model = make_model()
    spec = optimizer_spec(load(SAVED_AT_2))
    optimizer = spec.build(default_params(spec.cls, model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load_optimizer_state_dict(optimizer, model, str(checkpoints[source]), verify=False)
    names = {id(p): n for n, p in model.named_parameters()}
    loaded = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            expected = saved[f"{STATE_PREFIX}{names[id(param)]}.{key}"]
            assert torch.equal(value.reshape(expected.shape), expected)
            loaded += 1
    assert loaded >= 2 * len(names)
