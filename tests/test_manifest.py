"""Checkpoint manifests: every damaged or foreign checkpoint is refused with one clear error before any state
changes; a sound one verifies at any world size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import mgup_dist
from mgup_dist.checkpoint import (
    CheckpointIntegrityError, CheckpointMismatchError, load_model_state_dict, load_optimizer_state_dict,
    model_state_dict, optimizer_state_dict, save_atomic,
)
from mgup_dist.manifest import MANIFEST, checkpoint_identity, read_verified, verify_checkpoint
from mgup_dist.zero import ZeroEngine
from tests.distributed import run_distributed
from tests.test_zero import TinyLM, _loss


def _trained(name: str = "mgup_adamw", seed: int = 3, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    opt = mgup_dist.build_optimizer(name, model.parameters(), lr=0.02, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, torch.randint(0, 29, (2, 7), generator=gen)).backward()
        opt.step()
    return model, opt


def _save(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    state = {**model_state_dict(model), **optimizer_state_dict(opt, model)}
    save_atomic(state, path, identity=checkpoint_identity(model, opt), step=2)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        tensors += [v.clone() if torch.is_tensor(v) else torch.tensor(float(v)) for _, v in sorted(state.items())]
    return tensors


def _data_file(path: Path) -> Path:
    return next(p for p in sorted(path.iterdir()) if p.suffix == ".distcp")


def _truncate(path: Path) -> None:
    f = _data_file(path)
    f.write_bytes(f.read_bytes()[:-7])


def _flip(path: Path) -> None:
    f = _data_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _drop_metadata(path: Path) -> None:
    (path / ".metadata").unlink()


def _extra(path: Path) -> None:
    (path / "__7_0.distcp").write_bytes(b"stray")


def _no_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def _bad_json(path: Path) -> None:
    (path / MANIFEST).write_text("{not json")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, r"file __0_0\.distcp has \d+ bytes, manifest.json records \d+ \(truncated"),
    "flipped byte": (_flip, r"file __0_0\.distcp does not match its sha256 in manifest.json \(corrupted\)"),
    "missing file": (_drop_metadata, r"file \.metadata listed in manifest.json is missing"),
    "extra file": (_extra, r"file __7_0\.distcp is not listed in manifest.json"),
    "no manifest": (_no_manifest, r"has no manifest.json: it is incomplete"),
    "unreadable manifest": (_bad_json, r"manifest.json is unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_and_nothing_changes(case: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _save(*_trained(steps=2), path)
    damage, message = DAMAGE[case]
    damage(path)
    model, opt = _trained(steps=3)  # same model and optimizer, other values
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointIntegrityError, match=message):
        load_model_state_dict(model, path)
    with pytest.raises(CheckpointIntegrityError, match=message):
        load_optimizer_state_dict(opt, model, path)
    after = _snapshot(model, opt)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def _other_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM(dim=16)
    return model, mgup_dist.build_optimizer("mgup_adamw", model.parameters(), lr=0.02)


def _other_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model, _ = _trained(steps=1)
    return model, mgup_dist.build_optimizer("adamw", model.parameters(), lr=0.02)


def _other_groups() -> tuple[nn.Module, torch.optim.Optimizer]:
    model, _ = _trained(steps=1)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    return model, mgup_dist.build_optimizer("mgup_adamw", [{"params": matrices}, {"params": vectors}], lr=0.02)


FOREIGN = {
    "model": (_other_model,
              r"parameter names/shapes differ .*checkpoint: 6 tensors, 1272 elements; here: 6 tensors, 2080"),
    "optimizer": (_other_optimizer, r"optimizer class differs: checkpoint MGUPAdamW, here AdamW"),
    "grouping": (_other_groups, r"param groups differ"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_checkpoint_of_another_model_or_optimizer_is_refused_before_loading(case: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _save(*_trained(), path)
    build, message = FOREIGN[case]
    model, opt = build()
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointMismatchError, match=message):
        load_optimizer_state_dict(opt, model, path)
    if case == "model":
        with pytest.raises(CheckpointMismatchError, match=message):
            load_model_state_dict(model, path)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))


def test_sound_checkpoint_loads_and_records_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    model, opt = _trained()
    _save(model, opt, path)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["world_size"] == 1 and manifest["step"] == 2
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp"]
    assert manifest["identity"]["optimizer"] == "MGUPAdamW" and manifest["identity"]["num_tensors"] == 6
    fresh, fresh_opt = _trained(steps=3)
    load_model_state_dict(fresh, path)
    load_optimizer_state_dict(fresh_opt, fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model, opt), _snapshot(fresh, fresh_opt)))
    assert read_verified(path, ".metadata") == (path / ".metadata").read_bytes()


def _zero_save(rank: int, world_size: int, path: str) -> None:
    model, opt = _trained(steps=0)
    engine = ZeroEngine(model, opt, stage=2)
    identity = checkpoint_identity(model, opt)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    engine.step()
    save_atomic({**model_state_dict(model), **optimizer_state_dict(opt, model), **engine.master_state_dict(model)},
                path, identity=identity, step=1)


def _zero_verify(rank: int, world_size: int, path: str) -> str:
    model, opt = _trained(steps=0)
    ZeroEngine(model, opt, stage=2)
    try:
        verify_checkpoint(path, checkpoint_identity(model, opt))
    except CheckpointIntegrityError as exc:
        return str(exc)
    return "ok"


def test_two_rank_checkpoint_verifies_at_one_rank_and_both_ranks_agree_on_damage(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    run_distributed(2, _zero_save, path)
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model, opt = _trained(steps=0)  # a plain single-process optimizer: loading at another world size is legal
    load_model_state_dict(model, path)
    load_optimizer_state_dict(opt, model, path)
    assert all(int(state["step"]) == 1 for state in opt.state.values())
    data = Path(path) / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    messages = run_distributed(2, _zero_verify, path)  # rank 0 hashes .metadata and __1_0, rank 1 __0_0
    assert messages[0] == messages[1] and "file __1_0.distcp does not match its sha256" in messages[0]
