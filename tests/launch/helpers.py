"""Test helpers: read a run's parameters back from a DCP checkpoint, and run pretrain in this process."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from launch import pretrain
from mgup_dist.checkpoint import MODEL_PREFIX, model_state_dict
from launch.config import load_config
from launch.model import GPT


def checkpoint_params(ckpt: Path, config: Path) -> dict[str, torch.Tensor]:
    """The model parameters stored in checkpoint folder ``ckpt`` of a run of ``config``."""
    state = model_state_dict(GPT(load_config(config).model.shape()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return {key[len(MODEL_PREFIX):]: value for key, value in state.items()}


def run_pretrain(*argv: object) -> None:
    """``python -m launch.pretrain *argv`` in this process; fails the test on a non-zero status."""
    status = pretrain.main([str(a) for a in argv])
    assert status == 0, f"pretrain {argv} exited with {status}"
