"""Atomic, reshardable training checkpoints (torch.distributed.checkpoint).

Layout: ``OUT/checkpoints/step_NNNNNNN/`` holds the DCP files of the engine's state dict (model and optimizer
keyed by parameter FQN) plus ``trainer.json``: ``step``, ``data`` (the sampler position ``{"seed", "step"}``
and the corpus ``sha256``), ``tokens``, ``world_size`` and the resolved ``config``. All ranks write into
``.tmp-step_NNNNNNN`` first; rank 0 renames it only after every rank finished, so a checkpoint folder either
exists complete or not at all. DCP reshards on load, so a checkpoint saved at N ranks loads at M.
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
    """Complete checkpoints under ``out``, oldest (lowest step) first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def resolve(path: Path) -> Path:
    """The checkpoint ``--resume path`` means: the folder itself, or the newest one of a run folder."""
    if (path / TRAINER_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise LaunchError(f"--resume {path}: no checkpoint there (expected {TRAINER_FILE} or {CHECKPOINTS}/{_PREFIX}*)")
    return found[-1]


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_FILE).read_text(encoding="utf-8"))


def _replace_dir(new: Path, final: Path) -> None:
    """Renames ``new`` to ``final``; an existing ``final`` (the same step saved again after an in-place resume)
    is moved aside first and deleted only once ``new`` took its place."""
    old = final.with_name(".old-" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save(engine: Engine, out: Path, trainer_state: dict[str, Any], is_main: bool, keep_last: int) -> Path:
    """Writes the checkpoint of ``trainer_state["step"]`` (all ranks call this) and, with ``keep_last`` > 0,
    removes older checkpoints beyond the newest ``keep_last``. Returns the checkpoint folder."""
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
    if is_main:
        _replace_dir(tmp, final)
        if keep_last > 0:
            for old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    return final


def load(engine: Engine, ckpt: Path) -> dict[str, Any]:
    """Loads model and optimizer state from ``ckpt`` into ``engine`` (all ranks); returns its trainer state."""
    with _quiet_single_process():
        engine.load_checkpoint(str(ckpt))
    return read_trainer_state(ckpt)
