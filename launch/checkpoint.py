"""Atomic, verified, reshardable training checkpoints (torch.distributed.checkpoint).

Layout: ``OUT/checkpoints/step_NNNNNNN/`` holds the DCP files of the engine's state dict (model and optimizer
keyed by parameter FQN; the deepspeed backend's opaque DeepSpeed files) plus ``trainer.json``: ``step``,
``data`` (the sampler position ``{"seed", "step"}`` and the corpus ``sha256``), ``tokens``, ``world_size`` and
the resolved ``config``, and last ``manifest.json`` (`mgup_dist.manifest`: every file's size and sha256, the
saving world size, the step, the model/optimizer identity). All ranks write into ``.tmp-step_NNNNNNN`` first;
rank 0 renames it only after every rank finished and the manifest is written, so a checkpoint folder either
exists complete or not at all; a folder without a manifest is not a checkpoint. `load` verifies the manifest
(and the identity of the run's model/optimizer) before the engine touches any state; a damaged or foreign
checkpoint is a `LaunchError` naming the file or the mismatch. DCP reshards on load, so a checkpoint saved at
N ranks loads at M (where the backend allows it).
"""
from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from launch.backends.base import Engine
from launch.errors import LaunchError
from mgup_dist.manifest import MANIFEST, CheckpointError, read_verified, verify_checkpoint, write_manifest

CHECKPOINTS = "checkpoints"
TRAINER_FILE = "trainer.json"
_PREFIX = "step_"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silences DCP's "assuming the intent is to save/load in a single process" warning (that is the intent
    when no process group exists: the ``single`` backend)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def step_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (folders with a manifest) under ``out``, oldest (lowest step) first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def resolve(path: Path) -> Path:
    """The checkpoint ``--resume path`` means: the folder itself, or the newest one of a run folder."""
    if (path / MANIFEST).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise LaunchError(f"--resume {path}: no checkpoint there (expected {MANIFEST} or {CHECKPOINTS}/{_PREFIX}*)")
    return found[-1]


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of run folder ``out``, or None (``--resume auto``)."""
    found = list_checkpoints(out)
    return found[-1] if found else None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer.json`` of ``ckpt``, checked against its manifest (`LaunchError` if damaged or missing)."""
    try:
        return json.loads(read_verified(ckpt, TRAINER_FILE))
    except CheckpointError as exc:
        raise LaunchError(str(exc)) from None


def _replace_dir(new: Path, final: Path) -> None:
    """Renames ``new`` to ``final``; an existing ``final`` (the same step saved again after an in-place resume)
    is moved aside first and deleted only once ``new`` took its place."""
    old = final.with_name(".old-" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save(
    engine: Engine, out: Path, trainer_state: dict[str, Any], is_main: bool, keep_last: int,
    identity: dict[str, Any] | None = None,
) -> Path:
    """Writes the checkpoint of ``trainer_state["step"]`` (all ranks call this), its manifest last (recording
    ``identity``, `mgup_dist.manifest.checkpoint_identity` of the run's model and optimizer), and, with
    ``keep_last`` > 0, removes older checkpoints beyond the newest ``keep_last``. Returns the checkpoint folder."""
    final = step_dir(out, trainer_state["step"])
    tmp = final.with_name(".tmp-" + final.name)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(engine.state_dict(), checkpoint_id=str(tmp), no_dist=not _distributed())
    if is_main:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
    _barrier()
    write_manifest(tmp, world_size=trainer_state["world_size"], step=trainer_state["step"], identity=identity)
    if is_main:
        _replace_dir(tmp, final)
        if keep_last > 0:
            for old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    return final


def load(engine: Engine, ckpt: Path, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verifies ``ckpt`` against its manifest and ``identity`` (the run's `checkpoint_identity`), then loads
    model and optimizer state into ``engine`` (all ranks); returns its trainer state. A damaged or foreign
    checkpoint is a `LaunchError` raised on every rank before the engine's state changes."""
    try:
        verify_checkpoint(ckpt, identity)
    except CheckpointError as exc:
        raise LaunchError(str(exc)) from None
    with _quiet_single_process():
        engine.load_checkpoint(str(ckpt))
    return read_trainer_state(ckpt)
