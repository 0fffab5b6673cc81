"""Backend megatron: Megatron-core's GPT, DDP and distributed optimizer with our optimizer inside, on gloo CPU
ranks under the test-only CUDA shim (`tests/launch/megatron_site`); refused without CUDA outside the tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
import pytest

from launch.backends import backend_class
from launch.dist_env import detect
from launch.errors import LaunchError
from launch.metrics import read_metrics
from tests.launch.conftest import NANO_RUN, merged
from tests.launch.test_trainer import LOSS_RTOL, REPO, _free_port

SITE = Path(__file__).parent / "megatron_site"


def _torchrun_shimmed(nproc: int, *argv: object) -> None:
    """``launch.pretrain`` on ``nproc`` torchrun ranks with the Megatron CPU shim installed at start-up."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO)])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "launch.pretrain", *map(str, argv)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r[key] for r in got if key in r] == pytest.approx([r[key] for r in want if key in r], rel=LOSS_RTOL)


SHIPPED = REPO / "configs/megatron_tiny_mgup_adamw.json"
RUN = {"train": {"steps": 8, "checkpoint_every": 4, "eval_every": 4, "eval_samples": 8}}
CASES = {  # the shipped config at nano size, and MGUP-Muon
    "mgup_adamw": merged(json.loads(SHIPPED.read_text()),
                         {**NANO_RUN, "backend": "megatron", "optimizer": {"lr": 3e-3}, **RUN}),
    "mgup_muon": merged(NANO_RUN, {"backend": "megatron", "optimizer": {"name": "mgup_muon", "lr": 3e-3,
                                                                         "ns_dtype": "float32"}, **RUN}),
}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_train_like_one_and_resume_at_one_rank(case: str, tmp_path: Path) -> None:
    """Megatron's data parallelism with our sharded optimizer reproduces the one-rank run, and its step-4
    checkpoint (mgup_dist.checkpoint's format, optimizer state sharded over 2 ranks) continues at 1 rank as the
    same run, within test_trainer's LOSS_RTOL: the runs differ only by the float32 summation order of the
    gradient mean over ranks (measured: MGUP-AdamW 1e-7 relative). MGUP-Muon runs Newton-Schulz in fp32: in bf16
    its rounding amplified that order difference to 5e-6 within four steps."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps(CASES[case]))
    _torchrun_shimmed(2, "--config", config, "--out", tmp_path / "w2")
    _torchrun_shimmed(1, "--config", config, "--out", tmp_path / "w1")
    _torchrun_shimmed(1, "--resume", tmp_path / "w2/checkpoints/step_0000004", "--out", tmp_path / "resumed")
    two, one = read_metrics(tmp_path / "w2/metrics.jsonl"), read_metrics(tmp_path / "w1/metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed/metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, 9)) and [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert two[-1]["loss"] < two[0]["loss"] - 0.3
    _same_metrics(two, one)
    _same_metrics(resumed, two[4:])


def test_refused_without_cuda() -> None:
    with pytest.raises(LaunchError, match="backend megatron needs a CUDA device"):
        backend_class("megatron")(detect(None, {}), {})


def test_refuses_options() -> None:
    with pytest.raises(LaunchError, match=r"unknown backend_options \['stage'\] for backend megatron; valid: none"):
        backend_class("megatron")(detect(None, {}), {"stage": 2})
