"""Training runs of the convergence benchmark: one run per (optimizer, lr, seed), in worker processes.

Each run is ``launch.pretrain`` (the entry point ``launch.compare`` also drives) on a plan's run config, in a
process with ONE intra-op thread, its console output sent to ``<folder>/log.txt``. After it, the run folder
keeps ``result.json`` (config, summary, train and validation curves); its final checkpoint is deleted, as
nothing reads it. A run whose ``result.json`` already holds the same config is not trained again, so an
interrupted benchmark resumes where it stopped.

`RunQueue` runs specs on ``jobs`` spawned worker processes (``jobs`` 1: in this process) and, after each
finished run, asks a ``follow_up`` callback for the runs that became possible (the seed runs of an optimizer
once its whole learning-rate sweep is in); those go to the front of the queue.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
from collections import deque
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm import tqdm

from launch import pretrain
from launch.metrics import read_metrics, write_json

RESULT_FILE = "result.json"
POLL_S = 0.5  # how often the pool loop looks for finished runs


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``config`` (a `launch.config` JSON object) trained into ``folder``."""

    optimizer: str
    lr: float
    seed: int
    config: dict[str, Any]
    folder: Path

    @property
    def key(self) -> tuple[str, float, int]:
        return self.optimizer, self.lr, self.seed


def run_folder(work: Path, optimizer: str, lr: float, seed: int) -> Path:
    """Where the run of (``optimizer``, ``lr``, ``seed``) lives under the work folder."""
    return work / optimizer / f"lr{lr:g}" / f"seed{seed}"


def cached_result(spec: RunSpec) -> Optional[dict[str, Any]]:
    """The stored result of ``spec`` if its folder has one for the same config, else None."""
    path = spec.folder / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return result if result.get("config") == spec.config else None


def _curves(rows: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    return {
        "train": [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None],
        "val": [[r["step"], r["val_loss"]] for r in rows if r.get("val_loss") is not None],
    }


def train_run(spec: RunSpec) -> dict[str, Any]:
    """Trains ``spec`` in this process with one intra-op thread; writes and returns its result
    (``optimizer``, ``lr``, ``seed``, ``config``, ``summary``, ``train`` and ``val`` ``[step, loss]`` lists).
    A failed run raises ``RuntimeError`` naming its log file."""
    torch.set_num_threads(1)
    spec.folder.mkdir(parents=True, exist_ok=True)
    config_path = spec.folder / "input_config.json"
    write_json(config_path, spec.config)
    log = spec.folder / "log.txt"
    argv = ["--config", str(config_path), "--out", str(spec.folder)]
    with open(log, "w", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        status = pretrain.main(argv)
    if status != 0:
        raise RuntimeError(f"the run {spec.config['name']} failed with status {status}; see {log}")
    shutil.rmtree(spec.folder / "checkpoints", ignore_errors=True)
    summary = json.loads((spec.folder / "summary.json").read_text(encoding="utf-8"))
    result = {"optimizer": spec.optimizer, "lr": spec.lr, "seed": spec.seed, "config": spec.config,
              "summary": summary, **_curves(read_metrics(spec.folder / "metrics.jsonl"))}
    write_json(spec.folder / RESULT_FILE, result)
    return result


def _init_worker() -> None:
    torch.set_num_threads(1)


FollowUp = Callable[[RunSpec, dict[str, Any]], Iterable[RunSpec]]


class RunQueue:
    """Runs specs ``jobs`` at a time in queue order; ``follow_up(spec, result)`` after each finished (or cached)
    run returns further specs, queued first. ``total`` sizes the progress bar (runs over the whole plan)."""

    def __init__(self, jobs: int, follow_up: FollowUp, total: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.jobs, self.follow_up, self.total = jobs, follow_up, total
        self.results: dict[tuple[str, float, int], dict[str, Any]] = {}
        self.trained = 0  # runs trained (not taken from the cache) by the last `run`
        self.bar: Optional[tqdm] = None

    def run(self, specs: Iterable[RunSpec]) -> dict[tuple[str, float, int], dict[str, Any]]:
        """Runs ``specs`` and every follow-up; returns each run's result by `RunSpec.key`."""
        pending = deque(specs)
        with tqdm(total=self.total, desc="convergence runs", unit="run") as bar:
            self.bar = bar
            self._drain_cached(pending)
            if pending and self.jobs == 1:
                while pending:
                    spec = pending.popleft()
                    self._finish(spec, train_run(spec), pending, trained=True)
                    self._drain_cached(pending)
            elif pending:
                self._run_pool(pending)
        return self.results

    def _finish(self, spec: RunSpec, result: dict[str, Any], pending: deque, trained: bool) -> None:
        assert self.bar is not None
        self.results[spec.key] = result
        self.trained += trained
        val = result["summary"]["final_val_loss"]
        self.bar.set_postfix_str(f"{spec.config['name']}: val {val if val is None else round(val, 4)}"
                                 f"{'' if trained else ' (cached)'}")
        self.bar.update(1)
        pending.extendleft(reversed(list(self.follow_up(spec, result))))  # follow-ups go first

    def _drain_cached(self, pending: deque) -> None:
        """Takes every queued spec that already has a result (and their cached follow-ups) off the queue."""
        progress = True
        while progress:
            progress = False
            for spec in list(pending):
                cached = cached_result(spec)
                if cached is not None:
                    pending.remove(spec)
                    self._finish(spec, cached, pending, trained=False)
                    progress = True

    def _run_pool(self, pending: deque) -> None:
        """Keeps ``jobs`` workers busy; leaving the pool (at the end, on an error or on Ctrl-C) terminates them."""
        with multiprocessing.get_context("spawn").Pool(self.jobs, initializer=_init_worker) as pool:
            running: dict[AsyncResult, RunSpec] = {}
            while pending or running:
                while pending and len(running) < self.jobs:
                    spec = pending.popleft()
                    running[pool.apply_async(train_run, (spec,))] = spec
                while not any(job.ready() for job in running):
                    next(iter(running)).wait(POLL_S)
                for job in [job for job in running if job.ready()]:
                    self._finish(running.pop(job), job.get(), pending, trained=True)
                self._drain_cached(pending)
