"""`python -m launch.compare`: several configs on the same data and seed, one plot and one table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from launch import compare
from launch.metrics import read_metrics


def test_compare_two_optimizers(
    make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lion = {"name": "lion", "lr": 3e-4}
    configs = [make_config("a", name="adamw_run"), make_config("b", optimizer=lion, name="lion_run")]
    out = tmp_path / "cmp"
    assert compare.main(["--configs", *map(str, configs), "--out", str(out), "--steps", "4", "--seed", "3"]) == 0
    table = (out / "compare.md").read_text()
    assert table.splitlines()[0].startswith("| run | optimizer | steps | final train loss | final val loss")
    for label, optimizer in (("adamw_run", "adamw"), ("lion_run", "lion")):
        rows = read_metrics(out / label / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert f"| {label} | {optimizer} | 4 | {rows[-1]['loss']:.4f} | {rows[-1]['val_loss']:.4f} |" in table
        assert json.loads((out / label / "config.json").read_text())["train"]["seed"] == 3
    data = [json.loads((out / label / "data.json").read_text())["sha256"] for label in ("adamw_run", "lion_run")]
    assert data[0] == data[1]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert table in capsys.readouterr().out


def test_compare_rejects_duplicate_labels_before_running(
    make_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    configs = [make_config("a", name="same"), make_config("b", name="same")]
    assert compare.main(["--configs", *map(str, configs), "--out", str(tmp_path / "cmp")]) == 2
    assert "share the label(s) ['same']" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_rejects_bad_arguments(make_config: Callable[..., Path], capsys: pytest.CaptureFixture) -> None:
    assert compare.main(["--configs", str(make_config()), "--nproc", "0"]) == 2
    assert capsys.readouterr().err == "error: --nproc must be >= 1, got 0\n"
    assert compare.main([]) == 2
    assert "the following arguments are required: --configs" in capsys.readouterr().err
