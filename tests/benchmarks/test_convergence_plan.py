"""Convergence plans: the shipped budgets load and validate; a bad plan fails before any run, naming the fault."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.convergence_plan import PLANS, load_plan, parse_plan, resolve_plan_path
from launch.config import parse_config

ISSUE_PAIRS = [("mgup_adamw", "adamw"), ("cmgup_adamw", "adamw"), ("alpha_adam", "adamw"), ("mgup_lion", "lion"),
               ("mgup_muon", "muon"), ("mars_m", "muon")]


def test_full_budget_covers_the_issue() -> None:
    plan = load_plan("full")
    assert [(p.candidate, p.baseline) for p in plan.pairs] == ISSUE_PAIRS
    assert sorted(plan.optimizers) == sorted({name for pair in ISSUE_PAIRS for name in pair})
    assert len(plan.seeds) >= 3 and all(len(lrs) >= 3 for lrs in plan.lrs.values())
    cfg = parse_config(plan.run_config("mars_m", 0.008, 2))
    assert (cfg.optimizer.name, cfg.optimizer.hparams["lr"], cfg.train.seed) == ("mars_m", 0.008, 2)
    assert cfg.schedule.min_lr == pytest.approx(plan.min_lr_ratio * 0.008)
    assert cfg.backend == "single" and cfg.data.path is None  # one process, the embedded corpus


def test_run_configs_differ_only_in_optimizer_and_seed() -> None:
    plan = load_plan("full")
    a, b = plan.run_config("adamw", 0.004, 0), plan.run_config("muon", 0.008, 0)
    for key in ("model", "batch", "train", "data", "backend"):
        assert a[key] == b[key]
    assert plan.run_config("adamw", 0.004, 1)["train"]["seed"] == 1


def test_resolve_plan_path() -> None:
    assert resolve_plan_path("quick") == PLANS / "quick.json"
    assert resolve_plan_path("some/where.json") == Path("some/where.json")


def _quick() -> dict[str, Any]:
    return json.loads((PLANS / "quick.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d.pop("pairs"), "missing key pairs"),
    (lambda d: d.update(seeds=[0, 0]), "distinct"),
    (lambda d: d.update(min_lr_ratio=2), "min_lr_ratio"),
    (lambda d: d["base"].update(optimizer={"name": "adamw"}), 'without "optimizer"'),
    (lambda d: d["optimizers"]["adamw"].update(lrs=[]), "optimizers.adamw.lrs"),
    (lambda d: d["optimizers"]["adamw"].update(lrs=[1e-3, 1e-3]), "duplicates"),
    (lambda d: d["optimizers"]["adamw"]["hparams"].update(lr=1e-3), 'must not set "lr"'),
    (lambda d: d["pairs"][0].update(baseline="lion"), "'lion' is not among the optimizers"),
    (lambda d: d["pairs"][0].update(baseline="mgup_adamw"), "with itself"),
    (lambda d: d["optimizers"]["adamw"]["hparams"].update(betas=[0.9, 1.5]), "the run of adamw at lr 0.002"),
    (lambda d: d["base"]["train"].update(steps=0), "the run of adamw at lr 0.002: train.steps must be >= 1"),
])
def test_bad_plans_are_rejected(edit: Any, message: str) -> None:
    data = copy.deepcopy(_quick())
    edit(data)
    with pytest.raises(ValueError, match="convergence plan") as info:
        parse_plan(data, "bad")
    assert message in str(info.value)


def test_missing_plan_names_the_budgets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist \(budgets: full, quick\)"):
        load_plan("nope")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_plan(str(broken))
