"""`python -m launch.pretrain`: the outputs of a run, and one clear error line for every usage mistake."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from launch import pretrain
from launch.config import config_to_dict, load_config
from launch.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def test_single_run_writes_every_output(
    make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config, out = make_config(), tmp_path / "out"
    assert pretrain.main(["--config", str(config), "--out", str(out)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert rows[-1]["lr"] == pytest.approx(3e-4) and rows[-1]["tokens"] == 6 * 8 * 32
    assert json.loads((out / "config.json").read_text()) == config_to_dict(load_config(config))
    data = json.loads((out / "data.json").read_text())
    assert len(data["sha256"]) == 64 and data["train_tokens"] + data["val_tokens"] == 60000
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == rows[-1]["loss"] and summary["final_val_loss"] == rows[-1]["val_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert json.loads((out / "checkpoints/step_0000006/trainer.json").read_text())["data"]["sha256"] == data["sha256"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: steps 0->6, train loss ")


def test_command_line_overrides(make_config: Callable[..., Path], tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("abcdefgh" * 2000)
    out = tmp_path / "out"
    argv = ["--config", str(make_config()), "--out", str(out), "--steps", "4", "--seed", "5", "--data", str(text)]
    assert pretrain.main(argv) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["train"]["steps"], resolved["train"]["seed"], resolved["data"]["path"]) == (4, 5, str(text))
    files = json.loads((out / "data.json").read_text())["files"]
    assert files == [{"path": "corpus.txt", "bytes": 16000, "split": "train+val tail"}]
    assert len(read_metrics(out / "metrics.jsonl")) == 4


def _bad_cases(tmp_path: Path, make_config: Callable[..., Path]) -> dict[str, tuple[list[str], str]]:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = ["--out", str(tmp_path / "out")]
    good = ["--config", str(make_config())]
    return {
        "missing config": (["--config", str(tmp_path / "nope.json"), *out], "config file .*nope.json does not exist"),
        "unknown key": ([f"--config={make_config('k', lr=1)}", *out], "unknown key lr; valid keys: model, optimizer"),
        "unknown optimizer": ([f"--config={make_config('o', optimizer={'name': 'adam9'})}", *out],
                              "unknown optimizer 'adam9'"),
        "batch split": ([f"--config={make_config('b', batch={'micro_batch': 3})}", *out],
                        "global_batch 8 is not divisible"),
        "unwritable out": ([*good, "--out", str(blocker / "sub")], "output directory .* is not writable"),
        "unknown backend": ([f"--config={make_config('h', backend='horovod')}", *out], 'unknown backend "horovod"'),
        "megatron without CUDA": ([f"--config={make_config('f', backend='megatron')}", *out],
                                  "backend megatron needs a CUDA device"),
        "no config": (out, "--config is required"),
        "bad steps": ([*good, "--steps", "many", *out], "argument --steps: invalid int value"),
        "bad resume": (["--resume", str(tmp_path), *out], "no checkpoint there"),
        "too few steps": ([*good, "--steps", "1", *out], "warmup_steps 2 exceeds train.steps 1"),
    }


CASES = ["missing config", "unknown key", "unknown optimizer", "batch split", "unwritable out", "unknown backend",
         "megatron without CUDA", "no config", "bad steps", "bad resume", "too few steps"]


@pytest.mark.parametrize("case", CASES)
def test_usage_errors_print_one_line_and_do_no_work(
    case: str, make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, pattern = _bad_cases(tmp_path, make_config)[case]
    assert pretrain.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]
    assert captured.out == "" and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_errors_from_the_command_line_have_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launch.pretrain", "--config", str(tmp_path / "missing.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: config file {tmp_path / 'missing.json'} does not exist\n"
