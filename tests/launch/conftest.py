"""Shared fixtures for the launcher tests: a nano-sized run config written to a temporary file
(one intra-op thread comes from tests/conftest.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

NANO_RUN: dict[str, Any] = {
    "model": "nano",
    "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
    "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
    "batch": {"global_batch": 8, "micro_batch": 2},
    "train": {"steps": 6, "eval_every": 3, "eval_samples": 8, "checkpoint_every": 3},
    "data": {"max_bytes": 60000},
    "backend": "single",
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in (nested dicts merged key by key; ``None`` deletes a key)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """``make_config(stem="run", **overrides)`` writes the nano config with overrides to ``<stem>.json``."""

    def make(stem: str = "run", /, **overrides: Any) -> Path:
        path = tmp_path / f"{stem}.json"
        path.write_text(json.dumps(merged(NANO_RUN, overrides)))
        return path

    return make
