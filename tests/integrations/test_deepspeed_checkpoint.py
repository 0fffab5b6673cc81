"""`mgup_dist.integrations.deepspeed_checkpoint`: a DeepSpeed ZeRO-2 run's state saved at W=2 in the shared
reshardable format loads at W=1 under ZeRO-1 into exactly the same logical state (model, fp32 masters, every
per-tensor optimizer state entry and scalar, groups): saving it again there gives the same checkpoint, entry for
entry, bit for bit. The case is MGUP-Muon in bf16 (model != master, Muon momentum and AdamW moments, ``step``
scalars), trained two steps first so that every entry is non-trivial. Also: the format is the one
`mgup_dist.checkpoint` reads and writes (a replicated optimizer loads it; a replicated run's checkpoint loads
into DeepSpeed), and ZeRO-3 is refused."""
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
REPLICATED = "zero1_mgup_muon_fp32.json"


def _engine(name: str, world_size: int, rank: int) -> Any:
    import os

    import mgup_dist.deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    config = {**load(name), **RUN_OVERRIDES}
    return mgup_dist.deepspeed.initialize(model=make_model(), config=config)[0]


def _train_and_save(rank: int, world_size: int, directory: str) -> None:
    from mgup_dist.integrations.deepspeed_checkpoint import state_dict

    engine = _engine(SAVED_AT_2, world_size, rank)
    for micro in batches(world_size)[:2]:
        engine.backward(engine(micro[rank]))
        engine.step()
    dcp.save(state_dict(engine.module, engine.optimizer.optimizer), checkpoint_id=directory)


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
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(saved by DeepSpeed at W=2, that loaded and saved again at W=1, a replicated run's, that loaded and saved
    again by DeepSpeed at W=1)."""
    root = tmp_path_factory.mktemp("ds_ckpt")
    at_2, at_1, replicated, from_replicated = root / "w2", root / "w1", root / "replicated", root / "from_replicated"
    run_distributed(2, _train_and_save, str(at_2))
    _replicated_checkpoint(replicated)
    cases = [(LOADED_AT_1, str(at_2), str(at_1)), (REPLICATED, str(replicated), str(from_replicated))]
    run_distributed(1, _load_and_save, cases)
    return at_2, at_1, replicated, from_replicated


def test_w2_zero2_checkpoint_loads_exactly_at_w1_zero1(checkpoints: tuple[Path, ...]) -> None:
    saved, again = (_read_all(path) for path in checkpoints[:2])
    assert set(saved) == set(again)
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
    assert saved[f"{MODEL_PREFIX}embed.weight"].dtype == torch.bfloat16
    bf16_model = saved[f"{MODEL_PREFIX}embed.weight"].float().reshape(-1)
    assert not torch.equal(bf16_model, saved[f"{MASTER_PREFIX}embed.weight"])
    for key, value in saved.items():
        if torch.is_tensor(value):
            assert torch.equal(value, again[key]), key
        else:
            assert value == again[key], key


def test_replicated_checkpoint_loads_into_deepspeed(checkpoints: tuple[Path, ...]) -> None:
    """A checkpoint of a replicated optimizer (backend single/ddp) has no master entries: DeepSpeed's masters
    come from the loaded model; every model and optimizer entry survives the round trip unchanged."""
    replicated, again = (_read_all(path) for path in checkpoints[2:])
    assert set(again) - set(replicated) == {k for k in again if k.startswith(MASTER_PREFIX)}
    for key, value in replicated.items():
        assert (torch.equal(value, again[key]) if torch.is_tensor(value) else value == again[key]), key
    for name, param in make_model().named_parameters():
        assert torch.equal(again[f"{MASTER_PREFIX}{name}"], replicated[f"{MODEL_PREFIX}{name}"].reshape(-1))


def test_replicated_optimizer_reads_the_format(checkpoints: tuple[Path, ...]) -> None:
    """The optimizer entries are `mgup_dist.checkpoint`'s: a single-process MGUP-Muon over the same model
    loads them and holds the same state."""
    from mgup_dist.integrations.deepspeed import default_params
    from mgup_dist.integrations.deepspeed_config import optimizer_spec

    saved = _read_all(checkpoints[0])
    model = make_model()
    spec = optimizer_spec(load(SAVED_AT_2))
    optimizer = spec.build(default_params(spec.cls, model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load_optimizer_state_dict(optimizer, model, str(checkpoints[0]), verify=False)
    names = {id(p): n for n, p in model.named_parameters()}
    loaded = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            expected = saved[f"{STATE_PREFIX}{names[id(param)]}.{key}"]
            assert torch.equal(value.reshape(expected.shape), expected)
            loaded += 1
    assert loaded >= 2 * len(names)


def _zero3_refused(rank: int, world_size: int) -> str:
    from mgup_dist.integrations.deepspeed_checkpoint import state_dict

    engine = _engine("zero3_mgup_adamw_fp32.json", world_size, rank)
    with pytest.raises(TypeError, match="ZeRO-3") as error:
        state_dict(engine.module, engine.optimizer.optimizer)
    return str(error.value)


def test_zero3_is_refused_with_a_clear_error() -> None:
    assert "not supported" in run_distributed(1, _zero3_refused)[0]
