"""Crash and resume under torchrun: a rank SIGKILLed mid-training, ``--max-restarts 1``, ``--resume auto``.

torchrun runs with ``--standalone`` (c10d rendezvous): with the static rendezvous (``--master_port`` alone) the
restarted ranks read the dead attempt's gloo addresses from the store and fail to connect (observed, torch 2.13).

Rank 1 kills itself right after step 7 (`launch.faults`, first attempt only); torchrun stops rank 0 and
restarts both; ``--resume auto`` finds the step-4 checkpoint in ``--out`` and the run completes. The restarted
run repeats steps 5-7 with the same world size, engine and batches as the uninterrupted run, so its metrics and
final parameters are bit-identical (``==``, no tolerance). A W=2 checkpoint resumed at W=1 continues with the
losses of the W=2 run within `LOSS_RTOL`: the ZeRO optimizer math is bit-identical across world sizes given
identical averaged gradients (tests/test_determinism.py), but the gradient average differs in float32
summation order (W=2: mean over ranks of per-rank micro-batch means; W=1: one mean over four micro-batches).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.faults import FAULT_RANK, KILL_AT_STEP
from launch.metrics import read_metrics
from tests.launch.conftest import NANO_RUN, merged
from tests.launch.helpers import checkpoint_params, run_pretrain
from tests.launch.test_trainer import LOSS_RTOL, REPO

STEPS, EVERY, KILL = 12, 4, 7
CONFIG = merged(NANO_RUN, {
    "backend": "zero", "optimizer": {"name": "mgup_adamw", "lr": 3e-3},
    "train": {"steps": STEPS, "checkpoint_every": EVERY, "eval_every": EVERY},
})


def _torchrun(out: Path, config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", KILL_AT_STEP)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
               "-m", "launch.pretrain",
               "--config", str(config), "--out", str(out), "--resume", "auto"]
    proc = subprocess.Popen(command, cwd=REPO, env={**base, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: no orphaned ranks after a hang
        out, err = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted W=2 run of `CONFIG`: (config path, output folder)."""
    folder = tmp_path_factory.mktemp("reference")
    config = folder / "run.json"
    config.write_text(json.dumps(CONFIG))
    result = _torchrun(folder / "out", config)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, folder / "out"


def test_killed_rank_is_restarted_and_the_run_resumes_bit_identically(reference: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    config, full = reference
    out = tmp_path / "crashed"
    result = _torchrun(out, config, "--max-restarts", "1", env={KILL_AT_STEP: str(KILL), FAULT_RANK: "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in result.stderr  # rank 1 died of SIGKILL
    assert result.stdout.count("run: GPT") == 2  # the first attempt and the restart each announced the run
    rows, expected = read_metrics(out / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert _timeless(rows) == _timeless(expected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == EVERY and summary["steps"] == STEPS
    final = f"checkpoints/step_{STEPS:07d}"
    a, b = checkpoint_params(out / final, config), checkpoint_params(full / final, config)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_checkpoint_resumed_at_one_rank_continues_the_run(reference: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    config, full = reference
    resumed = tmp_path / "w1"
    run_pretrain("--resume", full / f"checkpoints/step_{EVERY:07d}", "--out", resumed)
    rows, expected = read_metrics(resumed / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")[EVERY:]
    assert [r["step"] for r in rows] == list(range(EVERY + 1, STEPS + 1))
    assert expected[-1]["loss"] < read_metrics(full / "metrics.jsonl")[0]["loss"] - 0.3
    for key in ("loss", "grad_norm", "val_loss", "lr"):
        want = [r[key] for r in expected if key in r]
        assert [r[key] for r in rows if key in r] == pytest.approx(want, rel=LOSS_RTOL)
