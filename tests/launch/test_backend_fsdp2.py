"""Backend fsdp2: 2 gloo ranks under torchrun, resumed at 1 rank through DCP resharding; option validation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from launch import pretrain
from launch.backends import backend_class
from launch.dist_env import detect
from launch.errors import LaunchError
from launch.metrics import read_metrics
from tests.launch.conftest import NANO_RUN, merged
from tests.launch.helpers import run_pretrain
from tests.launch.test_trainer import LOSS_RTOL, REPO, _torchrun

SHIPPED = REPO / "configs/fsdp2_tiny_mgup_adamw.json"

TWO = detect(None, {"RANK": "0", "WORLD_SIZE": "2"})


def test_two_ranks_then_resumed_at_one_rank_is_the_same_run(make_config: Callable[..., Path], tmp_path: Path) -> None:
    """Sharded (W=2) and resumed unsharded (W=1) runs differ only in the float32 summation order of the
    gradient mean, as in the DDP test of test_trainer (measured: losses equal to 1e-7 relative)."""
    config = tmp_path / "shipped.json"  # the shipped FSDP2 config at nano size
    config.write_text(json.dumps(merged(json.loads(SHIPPED.read_text()), {**NANO_RUN, "backend": "fsdp2",
        "optimizer": {"lr": 3e-3}, "train": {"steps": 8, "checkpoint_every": 4, "eval_every": 4, "eval_samples": 8}})))
    two, one = tmp_path / "w2", tmp_path / "w1"
    _torchrun(2, "--config", config, "--out", two)
    run_pretrain("--resume", two / "checkpoints/step_0000004", "--out", one)
    full, resumed = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert full[-1]["loss"] < full[0]["loss"] - 0.3
    for key in ("loss", "grad_norm", "val_loss"):
        expected = [r[key] for r in full[4:] if key in r]
        assert [r[key] for r in resumed if key in r] == pytest.approx(expected, rel=LOSS_RTOL)


def test_resuming_another_backends_checkpoint_is_refused(
    make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    single = make_config("single", train={"steps": 2, "checkpoint_every": 1, "eval_every": 0})
    run_pretrain("--config", single, "--out", tmp_path / "single")
    fsdp2 = make_config("fsdp2", backend="fsdp2", train={"steps": 2, "checkpoint_every": 1, "eval_every": 0})
    status = pretrain.main(["--config", str(fsdp2), "--resume", str(tmp_path / "single/checkpoints/step_0000001"),
                            "--out", str(tmp_path / "f")])
    assert status == 2 and "was not written by backend fsdp2" in capsys.readouterr().err


def test_option_validation() -> None:
    with pytest.raises(LaunchError, match=r"mesh_shape \[2, 2\] has 4 ranks, the launch has world_size 2"):
        backend_class("fsdp2")(TWO, {"mesh_shape": [2, 2]})
    with pytest.raises(LaunchError, match=r"mesh_shape must be null or \[replicas, shards\]"):
        backend_class("fsdp2")(TWO, {"mesh_shape": [2]})
    with pytest.raises(LaunchError, match="valid: mesh_shape"):
        backend_class("fsdp2")(TWO, {"stage": 2})
    assert backend_class("fsdp2")(TWO, {"mesh_shape": [1, 2]}).options["mesh_shape"] == [1, 2]
