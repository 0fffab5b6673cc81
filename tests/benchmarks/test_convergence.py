"""The convergence benchmark end to end on the quick budget (nano GPT, a few steps, in this process), its
resumption from stored results, and its lr selection and seed follow-up on synthetic results."""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import convergence
from benchmarks.convergence_plan import load_plan
from benchmarks.convergence_runs import RESULT_FILE, RunQueue, cached_result, run_folder


def _run(tmp_path: Path) -> tuple[convergence.Summary, list[str]]:
    argv = ["--budget", "quick", "--jobs", "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "RESULTS.md")]
    return convergence.main(argv), argv


def _stored_final(tmp_path: Path, optimizer: str, lr: float, seed: int) -> float:
    result = json.loads((run_folder(tmp_path / "work", optimizer, lr, seed) / RESULT_FILE).read_text())
    return result["summary"]["final_val_loss"]


def test_quick_budget_end_to_end_and_resume(tmp_path: Path) -> None:
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n## Other\n\nkept\n")
    plan = load_plan("quick")
    summary, argv = _run(tmp_path)
    out = tmp_path / "out"

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["trained"] == 6  # 2 optimizers x 2 lrs on seed 0, then each selected lr on seed 1
    rows = sweep["sweep"]
    assert [(r["optimizer"], r["lr"]) for r in rows] == [(o, lr) for o in plan.optimizers for lr in plan.lrs[o]]
    for opt in plan.optimizers:
        mine = [r for r in rows if r["optimizer"] == opt]
        best = min(mine, key=lambda r: r["final_val_loss"])
        assert [r["lr"] for r in mine if r["selected"]] == [best["lr"]] == [summary.selected[opt]]
        assert best["final_val_loss"] == _stored_final(tmp_path, opt, best["lr"], 0)

    report = json.loads((out / "convergence.json").read_text())
    [pair] = report["pairs"]
    assert (pair["candidate"], pair["baseline"], pair["seeds"]) == ("mgup_adamw", "adamw", [0, 1])
    for side in ("candidate", "baseline"):
        opt, lr = pair[side], summary.selected[pair[side]]
        finals = [_stored_final(tmp_path, opt, lr, seed) for seed in (0, 1)]
        assert pair[f"{side}_mean"] == pytest.approx(sum(finals) / 2, rel=1e-12)
        assert pair[f"{side}_std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2), rel=1e-9)
    assert pair["diff_mean"] == pytest.approx(pair["candidate_mean"] - pair["baseline_mean"], abs=1e-12)
    assert pair["verdict"] in {"better", "worse", "within noise"}

    table = (out / "convergence.md").read_text().splitlines()
    assert table[0].startswith("| candidate (lr) | baseline (lr) |") and len(table[2].split(" | ")) == 8
    assert "| optimizer | lr | seed 0 | seed 1 | mean ± std |" in table
    png = out / "mgup_adamw_vs_adamw.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 150_000
    assert not (run_folder(tmp_path / "work", "adamw", plan.lrs["adamw"][0], 0) / "checkpoints").exists()

    page = (tmp_path / "RESULTS.md").read_text()
    assert "## Other\n\nkept" in page and "## Convergence\n" in page
    assert f"Command: `python -m benchmarks.convergence {' '.join(argv)}`" in page
    assert "![mgup_adamw_vs_adamw](out/mgup_adamw_vs_adamw.png)" in page
    assert f"` on {datetime.date.today().isoformat()}; machine: " in page and "CPUs, torch " in page
    assert "### Learning-rate sweep" in page

    stamp = (run_folder(tmp_path / "work", "adamw", summary.selected["adamw"], 1) / RESULT_FILE).stat().st_mtime_ns
    again, _ = _run(tmp_path)  # every result is stored: nothing is trained again
    assert json.loads((out / "sweep.json").read_text())["trained"] == 0
    assert again == summary
    assert (run_folder(tmp_path / "work", "adamw", summary.selected["adamw"], 1) / RESULT_FILE).stat().st_mtime_ns \
        == stamp


def _fake_result(loss: float) -> dict[str, Any]:
    return {"summary": {"final_val_loss": loss}}


def test_seed_follow_up_waits_for_the_whole_sweep(tmp_path: Path) -> None:
    plan = load_plan("quick")
    follow = convergence.SeedFollowUp(plan, tmp_path)
    low, high = plan.lrs["adamw"]
    assert list(follow(convergence.spec(plan, tmp_path, "adamw", low, 0), _fake_result(3.0))) == []
    [seed_run] = follow(convergence.spec(plan, tmp_path, "adamw", high, 0), _fake_result(2.5))
    assert (seed_run.optimizer, seed_run.lr, seed_run.seed) == ("adamw", high, 1)
    assert seed_run.config == plan.run_config("adamw", high, 1)
    assert list(follow(seed_run, _fake_result(2.4))) == []  # a seed run triggers nothing


def test_summarize_selects_on_the_sweep_seed(tmp_path: Path) -> None:
    plan = load_plan("quick")
    losses = {("adamw", 0.002, 0): 3.0, ("adamw", 0.004, 0): 2.9, ("adamw", 0.004, 1): 3.1,
              ("mgup_adamw", 0.002, 0): 2.8, ("mgup_adamw", 0.004, 0): math.nan, ("mgup_adamw", 0.002, 1): 2.7}
    summary = convergence.summarize(plan, {key: _fake_result(v) for key, v in losses.items()})
    assert summary.selected == {"adamw": 0.004, "mgup_adamw": 0.002}
    assert summary.finals == {"adamw": {0: 2.9, 1: 3.1}, "mgup_adamw": {0: 2.8, 1: 2.7}}
    [pair] = summary.pairs
    assert pair.diff_mean == pytest.approx(-0.25) and pair.candidate_mean == pytest.approx(2.75)


def test_stale_results_are_not_reused_and_bad_jobs_are_rejected(tmp_path: Path) -> None:
    plan = load_plan("quick")
    spec = convergence.spec(plan, tmp_path, "adamw", 0.002, 0)
    spec.folder.mkdir(parents=True)
    (spec.folder / RESULT_FILE).write_text(json.dumps({"config": {**spec.config, "name": "other"}}))
    assert cached_result(spec) is None
    (spec.folder / RESULT_FILE).write_text(json.dumps({"config": spec.config, "summary": {}}))
    assert cached_result(spec) == {"config": spec.config, "summary": {}}
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        RunQueue(0, lambda spec, result: [], 1)
