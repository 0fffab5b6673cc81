"""Backend deepspeed: ZeRO-2 on 2 gloo ranks under torchrun matches the single-process run, resumes at the same
world size, refuses another one; option validation and the DeepSpeed config built from the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from launch.backends import backend_class
from launch.backends.deepspeed import deepspeed_config
from launch.dist_env import detect
from launch.errors import LaunchError
from launch.metrics import read_metrics
from tests.launch.helpers import run_pretrain
from tests.launch.test_trainer import LOSS_RTOL, REPO, _free_port

ONE = detect(None, {})
OPTIMIZER = {"name": "mgup_adamw", "lr": 3e-3}
TRAIN = {"steps": 8, "checkpoint_every": 4, "eval_every": 4}


def _torchrun(nproc: int, *argv: object) -> subprocess.CompletedProcess[str]:
    """Runs pretrain on ``nproc`` torchrun ranks; returns the finished process (the caller checks its status)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "launch.pretrain", *map(str, argv)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_zero2_two_ranks_matches_single_and_resumes(make_config: Callable[..., Path], tmp_path: Path) -> None:
    """DeepSpeed averages the accumulated micro-batch gradients over ranks, clips to train.grad_clip and steps
    our rules on its flat partitions: the W=2 run equals the single-process run up to the float32 summation
    order of the gradient mean (tolerance as in test_trainer's DDP test; measured: 1e-7 relative). Resuming
    its step-4 checkpoint at W=2 continues the same run; at W=1 it is refused."""
    ds = make_config("ds", backend="deepspeed", backend_options={"zero_stage": 2}, optimizer=OPTIMIZER, train=TRAIN)
    single = make_config("single", optimizer=OPTIMIZER, train=TRAIN)
    two, again, one = tmp_path / "w2", tmp_path / "w2r", tmp_path / "single"
    assert _torchrun(2, "--config", ds, "--out", two).returncode == 0
    run_pretrain("--config", single, "--out", one)
    full, reference = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert full[-1]["loss"] < full[0]["loss"] - 0.3
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r[key] for r in full if key in r] == pytest.approx([r[key] for r in reference if key in r], rel=LOSS_RTOL)

    assert _torchrun(2, "--resume", two / "checkpoints/step_0000004", "--out", again).returncode == 0
    resumed = read_metrics(again / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for key in ("loss", "grad_norm", "val_loss"):
        expected = [r[key] for r in full[4:] if key in r]
        assert [r[key] for r in resumed if key in r] == pytest.approx(expected, rel=LOSS_RTOL)

    refused = _torchrun(1, "--resume", two / "checkpoints/step_0000004", "--out", tmp_path / "w1")
    assert refused.returncode != 0 and "resumes only at the same zero_stage and world size" in refused.stderr


def test_deepspeed_config_follows_the_run() -> None:
    options = {"zero_stage": 3, "bf16": True, "gather_max_numel": 4096}
    config = deepspeed_config(micro_batch=4, world_size=2, grad_clip=0.5, options=options)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 8 and config["managed_gradient_accumulation"] is False
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3} and config["mgup_dist"] == {"gather_max_numel": 4096}
    assert "mgup_dist" not in deepspeed_config(4, 2, 0.5, {**options, "gather_max_numel": None})


def test_option_validation() -> None:
    with pytest.raises(LaunchError, match=r"zero_stage must be one of \[1, 2, 3\], got 0 \(stage 0: use backend ddp\)"):
        backend_class("deepspeed")(ONE, {"zero_stage": 0})
    with pytest.raises(LaunchError, match="zero_stage must be one of"):
        backend_class("deepspeed")(ONE, {"zero_stage": True})
    with pytest.raises(LaunchError, match="bf16 must be true or false"):
        backend_class("deepspeed")(ONE, {"bf16": "yes"})
    with pytest.raises(LaunchError, match="gather_max_numel must be null or an integer >= 1"):
        backend_class("deepspeed")(ONE, {"gather_max_numel": 0})
    with pytest.raises(LaunchError, match="valid: bf16, gather_max_numel, zero_stage"):
        backend_class("deepspeed")(ONE, {"stage": 2})
