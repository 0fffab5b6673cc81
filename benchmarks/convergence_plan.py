"""The plan of the convergence benchmark: which optimizers, learning-rate grids, seeds and pairs, on which run.

A plan is a JSON file (``configs/convergence/<budget>.json``) with keys:

- ``base``: a `launch.config` run config without ``optimizer``, ``name`` and ``schedule.min_lr``;
- ``min_lr_ratio``: the cosine floor as a fraction of each run's peak lr (so every point of a sweep decays alike);
- ``seeds``: at least one distinct seed; the first is the sweep seed;
- ``optimizers``: name -> ``{"lrs": [...], "hparams": {...}}`` (every hyperparameter but ``lr``);
- ``pairs``: ``[{"candidate", "baseline", "claim"}]``, both names among ``optimizers``.

`load_plan` checks all of this, and builds and validates the run config of every (optimizer, lr) point with
`launch.config.parse_config`, so a bad plan fails before any training starts.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from launch.config import parse_config

PLANS = Path(__file__).resolve().parent.parent / "configs" / "convergence"


@dataclass(frozen=True)
class Pair:
    """A comparison: ``candidate`` against ``baseline``, and what the papers claim about it."""

    candidate: str
    baseline: str
    claim: str


@dataclass(frozen=True)
class Plan:
    """A validated plan (see the module docstring); ``optimizers`` keeps the file's order."""

    name: str
    base: dict[str, Any]
    min_lr_ratio: float
    seeds: tuple[int, ...]
    lrs: dict[str, tuple[float, ...]]
    hparams: dict[str, dict[str, Any]]
    pairs: tuple[Pair, ...]

    @property
    def sweep_seed(self) -> int:
        return self.seeds[0]

    @property
    def optimizers(self) -> list[str]:
        return list(self.lrs)

    def run_config(self, optimizer: str, lr: float, seed: int) -> dict[str, Any]:
        """The JSON run config of ``optimizer`` at peak ``lr`` and ``seed`` (``launch.pretrain`` format)."""
        config = copy.deepcopy(self.base)
        config["name"] = f"{optimizer}_lr{lr:g}_seed{seed}"
        config["optimizer"] = {"name": optimizer, "lr": lr, **copy.deepcopy(self.hparams[optimizer])}
        config.setdefault("schedule", {})["min_lr"] = self.min_lr_ratio * lr
        config.setdefault("train", {})["seed"] = seed
        return config


def resolve_plan_path(budget: str) -> Path:
    """``configs/convergence/<budget>.json`` for a bare name, else ``budget`` as a path."""
    path = Path(budget)
    return path if path.suffix == ".json" else PLANS / f"{budget}.json"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"convergence plan: {message}")


def _lrs(name: str, entry: Any) -> tuple[float, ...]:
    _require(isinstance(entry, dict) and set(entry) <= {"lrs", "hparams"} and "lrs" in entry,
             f'optimizers.{name} must be an object with "lrs" (and optional "hparams"), got {json.dumps(entry)}')
    lrs = entry["lrs"]
    _require(isinstance(lrs, list) and len(lrs) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in lrs
    ), f"optimizers.{name}.lrs must be a non-empty list of positive numbers, got {json.dumps(lrs)}")
    _require(len(set(lrs)) == len(lrs), f"optimizers.{name}.lrs has duplicates: {lrs}")
    _require("lr" not in entry.get("hparams", {}), f'optimizers.{name}.hparams must not set "lr" (the grid does)')
    return tuple(sorted(float(v) for v in lrs))


def _pairs(data: Any, optimizers: Mapping[str, Any]) -> tuple[Pair, ...]:
    _require(isinstance(data, list) and len(data) > 0, "pairs must be a non-empty list")
    pairs = []
    for entry in data:
        _require(isinstance(entry, dict) and set(entry) == {"candidate", "baseline", "claim"},
                 f'each pair needs exactly "candidate", "baseline", "claim", got {json.dumps(entry)}')
        for role in ("candidate", "baseline"):
            _require(entry[role] in optimizers, f"pair {role} {entry[role]!r} is not among the optimizers")
        _require(entry["candidate"] != entry["baseline"], f"pair compares {entry['candidate']!r} with itself")
        pairs.append(Pair(entry["candidate"], entry["baseline"], str(entry["claim"])))
    return tuple(pairs)


def parse_plan(data: Any, name: str) -> Plan:
    """A validated `Plan` from the JSON value ``data``; ``ValueError`` naming the problem otherwise."""
    known = {"name", "about", "base", "min_lr_ratio", "seeds", "optimizers", "pairs"}
    _require(isinstance(data, dict), "the plan must be a JSON object")
    _require(set(data) <= known, f"unknown keys {sorted(set(data) - known)}; valid keys: {sorted(known)}")
    for key in ("base", "seeds", "optimizers", "pairs"):
        _require(key in data, f"missing key {key}")
    base, seeds, optimizers = data["base"], data["seeds"], data["optimizers"]
    _require(isinstance(base, dict) and not {"optimizer", "name"} & set(base),
             'base must be a run config object without "optimizer" and "name"')
    _require(isinstance(seeds, list) and len(seeds) > 0 and len(set(seeds)) == len(seeds)
             and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
             f"seeds must be a non-empty list of distinct non-negative integers, got {json.dumps(seeds)}")
    ratio = data.get("min_lr_ratio", 0.0)
    _require(isinstance(ratio, (int, float)) and 0 <= ratio <= 1, f"min_lr_ratio must be in [0, 1], got {ratio}")
    _require(isinstance(optimizers, dict) and len(optimizers) > 0, "optimizers must be a non-empty object")
    plan = Plan(
        name=str(data.get("name", name)), base=base, min_lr_ratio=float(ratio), seeds=tuple(seeds),
        lrs={opt: _lrs(opt, entry) for opt, entry in optimizers.items()},
        hparams={opt: dict(entry.get("hparams", {})) for opt, entry in optimizers.items()},
        pairs=_pairs(data["pairs"], optimizers),
    )
    for opt, lrs in plan.lrs.items():
        for lr in lrs:
            try:
                parse_config(plan.run_config(opt, lr, plan.sweep_seed))
            except ValueError as exc:
                raise ValueError(f"convergence plan: the run of {opt} at lr {lr:g}: {exc}") from None
    return plan


def load_plan(budget: str) -> Plan:
    """Reads and validates the plan named ``budget`` (see `resolve_plan_path`)."""
    path = resolve_plan_path(budget)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"convergence plan {path} does not exist (budgets: "
                         f"{', '.join(sorted(p.stem for p in PLANS.glob('*.json')))})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"convergence plan {path} is not valid JSON: {exc}") from None
    return parse_plan(data, path.stem)
