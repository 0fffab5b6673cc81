"""DeepSpeed's own checkpoint files as opaque DCP entries: the checkpoint format of backend ``deepspeed`` at ZeRO
stage 3, whose partitioned parameters `mgup_dist.integrations.deepspeed_checkpoint` does not cover.

`files_state_dict` runs ``engine.save_checkpoint`` into a temporary folder and returns this rank's files
(``deepspeed.file.<name>``, bytes) with the run's layout (``deepspeed.meta``); `load_files` writes them back and
runs ``engine.load_checkpoint``. DeepSpeed loads them only at the same ZeRO stage and world size: anything else
is a `LaunchError` naming the reason.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from launch.errors import LaunchError

FILE_PREFIX = "deepspeed.file."
META_KEY = "deepspeed.meta"
_TAG = "launch"


def layout(stage: int) -> dict[str, int]:
    """What a checkpoint of DeepSpeed's files is bound to."""
    return {"zero_stage": stage, "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def files_state_dict(ds: Any, stage: int) -> dict[str, Any]:
    """DeepSpeed's checkpoint files of this rank and the run's `layout`. Collective."""
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, _TAG), exist_ok=True)
        ds.save_checkpoint(tmp, tag=_TAG, save_latest=False)
        files = {f"{FILE_PREFIX}{p.name}": io.BytesIO(p.read_bytes()) for p in Path(tmp, _TAG).iterdir()}
    return {**files, META_KEY: pickle.dumps(layout(stage))}


def load_files(ds: Any, stage: int, path: str, metadata: dict[str, Any]) -> None:
    """Loads a `files_state_dict` checkpoint (DCP ``metadata`` already read) into engine ``ds``. Collective."""
    target: dict[str, Any] = {key: None for key in metadata if key.startswith(FILE_PREFIX) or key == META_KEY}
    dcp.load(target, checkpoint_id=path)
    saved = pickle.loads(target.pop(META_KEY))
    if saved != layout(stage):
        raise LaunchError(
            f"checkpoint {path} holds DeepSpeed's own files for {saved}, this run is {layout(stage)}: such a "
            "checkpoint (backend deepspeed at zero_stage 3) resumes only at the same zero_stage and world size"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, _TAG)
        folder.mkdir()
        for key, value in target.items():
            value.seek(0)
            (folder / key[len(FILE_PREFIX):]).write_bytes(value.read())
        loaded, _ = ds.load_checkpoint(tmp, tag=_TAG, load_lr_scheduler_states=False)
        if loaded is None:
            raise LaunchError(f"DeepSpeed could not load its checkpoint from {path}")
