"""Checkpoints: resuming continues the very same run (params, optimizer state, data stream), atomically written,
verified against their manifest before use; ``--resume auto``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

import mgup_dist
from launch import checkpoint, pretrain
from launch.backends import backend_class
from launch.config import load_config
from launch.dist_env import detect
from launch.model import GPT
from mgup_dist.manifest import checkpoint_identity
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


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "victim, message",
    [("__0_0.distcp", "file __0_0.distcp does not match its sha256 in manifest.json"),
     ("trainer.json", "file trainer.json does not match its size/sha256 in manifest.json")],
)
def test_damaged_checkpoint_is_refused_before_any_work(
    victim: str, message: str, make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    run_pretrain("--config", make_config(), "--out", out)
    _flip_byte(out / "checkpoints/step_0000003" / victim)
    capsys.readouterr()
    assert pretrain.main(["--resume", str(out / "checkpoints/step_0000003"), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and message in err
    assert not (tmp_path / "again" / "metrics.jsonl").exists()


def test_failed_load_leaves_the_engine_untouched(make_config: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = make_config(optimizer={"name": "mgup_adamw", "lr": 3e-3})
    run_pretrain("--config", config, "--out", out)
    ckpt = out / "checkpoints/step_0000003"
    _flip_byte(ckpt / "__0_0.distcp")
    torch.manual_seed(1)
    model = GPT(load_config(config).model.shape())
    optimizer = mgup_dist.build_optimizer("mgup_adamw", model.parameters())
    engine = backend_class("single")(detect(None, {}), {}).build(model, lambda m: optimizer)
    idx = torch.randint(0, 256, (2, 8))
    engine.model(idx, idx)[1].backward()
    engine.step()
    before = {k: v.clone() for k, v in engine.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(LaunchError, match="does not match its sha256"):
        checkpoint.load(engine, ckpt, checkpoint_identity(model, optimizer))
    after = engine.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


def test_folders_without_a_manifest_are_not_checkpoints(make_config: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pretrain("--config", make_config(), "--out", out)
    (out / "checkpoints/step_0000006/manifest.json").unlink()  # as if the save died before its last write
    (out / "checkpoints/.tmp-step_0000009").mkdir()
    assert checkpoint.list_checkpoints(out) == [out / "checkpoints/step_0000003"]
    assert checkpoint.latest(out) == out / "checkpoints/step_0000003"


def test_resume_auto_starts_fresh_continues_and_stops_when_done(
    make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, config = tmp_path / "run", make_config()
    run_pretrain("--config", config, "--out", out, "--resume", "auto", "--steps", "4")  # no checkpoint: fresh
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    run_pretrain("--config", config, "--out", out, "--resume", "auto")  # newest checkpoint: step 4
    assert json.loads((out / "summary.json").read_text())["start_step"] == 4
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    run_pretrain("--config", config, "--out", out, "--resume", "auto")  # already at train.steps
    assert "nothing to do (--resume auto)" in capsys.readouterr().out
    assert pretrain.main(["--resume", "auto"]) == 2
    assert "--resume auto needs --out" in capsys.readouterr().err
