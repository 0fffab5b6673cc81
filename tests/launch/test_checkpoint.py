"""Checkpoints: resuming continues the very same run (params, optimizer state, data stream), atomically written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from launch import checkpoint, pretrain
from launch.errors import LaunchError
from launch.metrics import read_metrics
from tests.launch.helpers import checkpoint_params, run_pretrain

OPTIMIZERS = {
    "adamw": {"name": "adamw", "lr": 3e-3},
    "mgup_adamw": {"name": "mgup_adamw", "lr": 3e-3},
    "alpha_adam_smoothed": {"name": "alpha_adam", "lr": 3e-3, "alpha_ema": 0.9},  # float state alpha_bar
    "mars_m_exact": {"name": "mars_m", "lr": 3e-3, "is_approx": False},  # look-ahead loop, previous_grad state
}


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_reproduces_the_uninterrupted_run_exactly(
    optimizer: str, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config(optimizer=OPTIMIZERS[optimizer])
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_pretrain("--config", config, "--out", full)
    run_pretrain("--resume", full / "checkpoints/step_0000003", "--out", resumed)
    a = checkpoint_params(full / "checkpoints/step_0000006", config)
    b = checkpoint_params(resumed / "checkpoints/step_0000006", config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _timeless(read_metrics(resumed / "metrics.jsonl")) == _timeless(read_metrics(full / "metrics.jsonl")[3:])


def test_resume_in_place_keeps_history_and_can_extend(make_config: Callable[..., Path], tmp_path: Path) -> None:
    config, out = make_config(), tmp_path / "run"
    run_pretrain("--config", config, "--out", out)
    first = read_metrics(out / "metrics.jsonl")
    run_pretrain("--resume", out / "checkpoints/step_0000003")
    again = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in again] == [r["loss"] for r in first]
    run_pretrain("--resume", out, "--steps", "8")  # newest checkpoint (step 6), two more steps
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads((out / "checkpoints/step_0000008/trainer.json").read_text())["data"] == {
        "seed": 0, "step": 8, "sha256": json.loads((out / "data.json").read_text())["sha256"]}


def test_checkpoints_are_complete_and_pruned(make_config: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pretrain("--config", make_config(train={"checkpoint_every": 2, "keep_last": 2}), "--out", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    assert checkpoint.resolve(out) == out / "checkpoints/step_0000006"
    with pytest.raises(LaunchError, match="no checkpoint there"):
        checkpoint.resolve(tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "6"], "is at step 6 and train.steps is 6: nothing to do"),
        (["--config", "{other_model}", "--steps", "8"], "model differs from checkpoint"),
        (["--data", "{text}", "--steps", "8"], "the corpus differs from the one checkpoint"),
    ],
)
def test_resume_refuses_a_different_run(
    argv: list[str], message: str, make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    run_pretrain("--config", make_config(), "--out", out)
    text = tmp_path / "text.txt"
    text.write_text("some other text " * 500)
    other_model = make_config("other", model={"size": "nano", "n_layer": 1})
    argv = [a.format(other_model=other_model, text=text) for a in argv]
    data_before = (out / "data.json").read_text()
    capsys.readouterr()
    assert pretrain.main(["--resume", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert (out / "data.json").read_text() == data_before and len(read_metrics(out / "metrics.jsonl")) == 6
