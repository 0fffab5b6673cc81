"""Training runs end to end: every shipped optimizer config, and DDP on 2 gloo ranks resumed at 1 rank."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from launch.metrics import read_metrics
from launch.trainer import Trainer
from tests.launch.conftest import merged
from tests.launch.helpers import checkpoint_params, run_pretrain

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIGS = sorted((REPO / "configs").glob("tiny_*.json"))
SMOKE = {"model": "nano", "schedule": {"warmup_steps": 1}, "batch": {"global_batch": 4, "micro_batch": 2},
         "train": {"steps": 3, "eval_every": 0, "eval_samples": 4, "checkpoint_every": 0}, "data": {"max_bytes": 20000}}

# Params after N steps at W=2 vs N/2 steps at W=2 + N/2 resumed at W=1 differ only by float32 summation order
# of the gradient mean (DDP: mean over ranks of per-rank micro-batch means; W=1: one mean over all micro-
# batches), ~1e-7 relative per gradient element; AdamW's elementwise step keeps that at ~1e-8 in the params
# (measured: 4e-9 in the params, 1e-7 relative in the losses). 1e-5 is >100x that, yet 300x smaller than one
# step's update (lr 3e-3): a different batch, a repeated or skipped step, or a wrong lr exceed it by far.
PARAM_ATOL = 1e-5
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_optimizer_config_trains(path: Path, tmp_path: Path) -> None:
    cfg = merged(json.loads(path.read_text()), SMOKE)
    cfg["schedule"]["min_lr"] = cfg["optimizer"]["lr"] / 10
    config = tmp_path / path.name
    config.write_text(json.dumps(cfg))
    run_pretrain("--config", config, "--out", tmp_path / "out")
    rows = read_metrics(tmp_path / "out/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] < math.log(256) + 0.5 for r in rows)
    assert math.isfinite(rows[-1]["val_loss"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *argv: object) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "launch.pretrain", *map(str, argv)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_two_ranks_then_resumed_at_one_rank_is_the_same_run(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config(backend="ddp", train={"steps": 8, "checkpoint_every": 4, "eval_every": 4})
    two, one = tmp_path / "w2", tmp_path / "w1"
    _torchrun(2, "--config", config, "--out", two)
    run_pretrain("--resume", two / "checkpoints/step_0000004", "--out", one)

    full, resumed = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in full] == list(range(1, 9)) and [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert full[-1]["loss"] < full[0]["loss"] - 0.3
    for key in ("loss", "val_loss", "lr"):
        expected = [r[key] for r in full[4:] if key in r]
        assert [r[key] for r in resumed if key in r] == pytest.approx(expected, rel=LOSS_RTOL)
    a = checkpoint_params(two / "checkpoints/step_0000008", config)
    b = checkpoint_params(one / "checkpoints/step_0000008", config)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= PARAM_ATOL
    start = checkpoint_params(two / "checkpoints/step_0000004", config)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 100 * PARAM_ATOL  # the check can fail
    hashes = [json.loads((run / "data.json").read_text())["sha256"] for run in (one, two)]
    assert hashes[0] == hashes[1]
    assert json.loads((two / "checkpoints/step_0000008/trainer.json").read_text())["world_size"] == 2
    assert torch.equal(a["lm_head.weight"], a["wte.weight"])


@pytest.mark.parametrize("layout", ["flat", "layerwise"])
def test_zero_two_ranks_then_resumed_by_the_single_backend_is_the_same_run(
    make_config: Callable[..., Path], tmp_path: Path, layout: str
) -> None:
    """Sharded optimizer state saved by backend ``zero`` at W=2 resumes under backend ``single`` (one
    process, unsharded): the checkpoint format is shared and reshardable. Same tolerances as DDP above: the
    runs differ only in the order of the gradient mean's float32 sums."""
    optimizer = {"name": "mgup_muon", "lr": 3e-3, "ns_dtype": "float32"}
    zero = make_config("zero", backend="zero", backend_options={"layout": layout}, optimizer=optimizer,
                       train={"steps": 8, "checkpoint_every": 4, "eval_every": 4})
    single = make_config("single", optimizer=optimizer, train={"steps": 8, "checkpoint_every": 4, "eval_every": 4})
    two, one = tmp_path / "w2", tmp_path / "w1"
    _torchrun(2, "--config", zero, "--out", two)
    run_pretrain("--config", single, "--resume", two / "checkpoints/step_0000004", "--out", one)
    full, resumed = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[4:]], rel=LOSS_RTOL)
    a = checkpoint_params(two / "checkpoints/step_0000008", zero)
    b = checkpoint_params(one / "checkpoints/step_0000008", single)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= PARAM_ATOL
    start = checkpoint_params(two / "checkpoints/step_0000004", zero)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 100 * PARAM_ATOL


def test_a_non_finite_gradient_is_skipped_counted_and_survives_resume(
    make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN put into one gradient of step 2 skips that step; ``skipped_steps`` counts it in metrics rows, the
    summary and the trainer state, and a run resumed from a later checkpoint keeps the count."""
    original, calls = Trainer._accumulate, []

    def poisoned(self: Trainer, batches):  # type: ignore[no-untyped-def]
        loss = original(self, batches)
        calls.append(None)
        if len(calls) == 2:
            next(self.engine.model.parameters()).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "_accumulate", poisoned)
    config = make_config(train={"steps": 4, "checkpoint_every": 3, "eval_every": 0})
    out = tmp_path / "out"
    run_pretrain("--config", config, "--out", out)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    assert json.loads((out / "checkpoints/step_0000003/trainer.json").read_text())["skipped_steps"] == 1
    run_pretrain("--resume", out / "checkpoints/step_0000003", "--out", tmp_path / "resumed")
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "resumed/metrics.jsonl")] == [1]
