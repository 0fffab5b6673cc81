"""The training loop: data, model, engine, schedule, evaluation, logging and checkpoints of one run.

Every rank runs `Trainer.run`; collectives (DDP's gradient all-reduce, the loss all-reduce on logged steps,
checkpoint barriers) happen at the same points on all ranks. Rank 0 alone writes files and shows progress.
Steps the optimizer skipped for non-finite gradients (`mgup_dist.optim.nonfinite`, identical on every rank)
are reported as ``skipped_steps`` in metrics rows and the summary, and kept across resumes in the trainer state.
Checkpoints record the identity of the model and optimizer (`mgup_dist.manifest.checkpoint_identity`, taken when
the optimizer is built, before an engine wraps it); a resume verifies it with the checkpoint's files first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from launch import checkpoint, faults, optim_factory
from launch.backends.base import Backend, Engine
from launch.batches import Batch, EvalWindows, TrainWindows
from launch.config import RunConfig, config_to_dict
from launch.corpus import Corpus
from launch.dist_env import DistEnv
from launch.errors import LaunchError
from launch.metrics import MetricsLog, write_json
from launch.plots import plot_run
from launch.schedule import LRSchedule
from mgup_dist.manifest import checkpoint_identity


@dataclass(frozen=True)
class RunPlan:
    """Everything resolved and validated before training starts."""

    cfg: RunConfig
    env: DistEnv
    out: Path
    backend: Backend
    accum_steps: int
    resume: Optional[Path] = None


def _all_mean(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``values`` over ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps ``optimizer`` skipped for non-finite gradients (0 for optimizers without the guard)."""
    return int(getattr(optimizer, "skipped_steps", 0))


def _uses_mars_exact(optimizer: torch.optim.Optimizer) -> bool:
    """True when some group runs MARS exact mode, which needs the look-ahead loop (spec §4.5)."""
    return hasattr(optimizer, "update_previous_grad") and any(
        not group.get("is_approx", True) for group in optimizer.param_groups
    )


class _Throughput:
    """Training-only time and tokens (evaluation and checkpoints excluded), overall and since the last log."""

    def __init__(self) -> None:
        self.time = self.tokens = self.interval_time = self.interval_tokens = 0.0

    def add(self, seconds: float, tokens: int) -> None:
        self.time += seconds
        self.tokens += tokens
        self.interval_time += seconds
        self.interval_tokens += tokens

    def interval_rate(self) -> float:
        """Tokens per second since the previous call (or the start), then starts a new interval."""
        rate = self.interval_tokens / self.interval_time if self.interval_time > 0 else 0.0
        self.interval_time = self.interval_tokens = 0.0
        return rate

    def total_rate(self) -> float:
        return self.tokens / self.time if self.time > 0 else 0.0


class Trainer:
    """One run of `RunPlan` on this rank (construct on every rank, then call `run`)."""

    def __init__(self, plan: RunPlan, corpus: Corpus) -> None:
        cfg, env = plan.cfg, plan.env
        self.plan, self.cfg, self.env = plan, cfg, env
        self.corpus_sha = corpus.info["sha256"]
        block = cfg.model.block_size
        self.windows = TrainWindows(corpus.train, block, cfg.batch.global_batch, cfg.train.seed)
        self.eval_windows = EvalWindows(corpus.val, block, cfg.train.eval_samples, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        model = plan.backend.make_model(cfg.model.shape()).to(env.device)
        self.n_params = model.num_parameters()
        opt = cfg.optimizer
        self.identity: dict[str, Any] = {}

        def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
            optimizer = optim_factory.build(m, opt.name, opt.hparams)
            self.identity = checkpoint_identity(m, optimizer)
            return optimizer

        self.engine: Engine = plan.backend.build(model, make_optimizer)
        peak = optim_factory.peak_lr(opt.name, opt.hparams)
        self.schedule = LRSchedule(
            self.engine.optimizer, peak, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr
        )
        self.mars_exact = _uses_mars_exact(self.engine.optimizer)
        self.step, self.tokens = 0, 0
        if plan.resume is not None:
            self._restore(plan.resume)
        in_place = plan.resume is not None and plan.resume.parent.parent.resolve() == plan.out.resolve()
        self.metrics = MetricsLog(plan.out, self.step if in_place else None) if env.is_main else None
        self.session_rows: list[dict[str, Any]] = []  # this session's metrics rows, kept on every rank

    def _restore(self, ckpt: Path) -> None:
        saved_sha = checkpoint.read_trainer_state(ckpt)["data"]["sha256"]
        if saved_sha != self.corpus_sha:
            raise LaunchError(
                f"the corpus differs from the one checkpoint {ckpt} was trained on (sha256 {self.corpus_sha[:12]} "
                f"here, {saved_sha[:12]} there); pass the same --data and data settings"
            )
        state = checkpoint.load(self.engine, ckpt, self.identity)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if hasattr(self.engine.optimizer, "skipped_steps"):
            self.engine.optimizer.skipped_steps = int(state.get("skipped_steps", 0))

    def _accumulate(self, batches: Iterable[Batch]) -> torch.Tensor:
        """Forward/backward over one step's micro-batches (gradients of the rank mean loss); returns it."""
        total = torch.zeros((), device=self.env.device)
        for i, (x, y) in enumerate(batches):
            with self.engine.micro_step(sync=i == self.plan.accum_steps - 1):
                _, loss = self.engine.model(x, y)
                (loss / self.plan.accum_steps).backward()
            total += loss.detach()
        return total / self.plan.accum_steps

    def _batches(self, step: int) -> Iterable[Batch]:
        env = self.env
        return self.windows.micro_batches(step, env.rank, env.world_size, self.cfg.batch.micro_batch, env.device)

    def _train_step(self, step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step; returns (this rank's mean loss, gradient norm before clipping)."""
        clip = self.cfg.train.grad_clip
        optimizer = self.engine.optimizer
        if self.mars_exact:  # look-ahead gradient on the next batch (spec §4.5)
            self._accumulate(self._batches(step + 1))
            self.engine.clip_grad_norm(clip)
            optimizer.update_previous_grad()  # type: ignore[attr-defined]
            self.engine.zero_grad()
        loss = self._accumulate(self._batches(step))
        grad_norm = self.engine.clip_grad_norm(clip)
        self.engine.step()
        self.engine.zero_grad()
        if self.mars_exact:
            optimizer.update_last_grad()  # type: ignore[attr-defined]
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation windows (all ranks call; all get the value)."""
        self.engine.model.eval()
        env = self.env
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        for x, y in self.eval_windows.micro_batches(env.rank, env.world_size, self.cfg.batch.micro_batch, env.device):
            _, loss = self.engine.model(x, y)
            sums += torch.stack([loss.double() * x.shape[0], torch.tensor(float(x.shape[0]), device=env.device)])
        self.engine.model.train()
        sums = _all_mean(sums)
        return float(sums[0] / sums[1])

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_steps": skipped_steps(self.engine.optimizer),
            "world_size": self.env.world_size,
            "data": {"seed": self.cfg.train.seed, "step": self.step, "sha256": self.corpus_sha},
            "config": config_to_dict(self.cfg),
        }

    def _due(self, every: int) -> bool:
        return self.step == self.cfg.train.steps or (every > 0 and self.step % every == 0)

    def run(self) -> dict[str, Any]:
        """Trains from the current step to ``train.steps``; returns the summary (the same on every rank)."""
        cfg = self.cfg
        tokens_per_step = cfg.batch.global_batch * cfg.model.block_size
        start_step, start_tokens, wall0 = self.step, self.tokens, time.perf_counter()
        clock = _Throughput()
        bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not self.env.is_main, desc="train",
                   unit="step", mininterval=1.0)
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            lr = self.schedule.apply(self.step + 1)
            loss, grad_norm = self._train_step(self.step + 1)
            self.step += 1
            faults.maybe_kill(self.step, self.env.rank)  # test-only hook, inert unless MGUP_FAULT_KILL_AT_STEP is set
            self.tokens += tokens_per_step
            clock.add(time.perf_counter() - t0, tokens_per_step)
            bar.update(1)
            self._after_step(lr, loss, grad_norm, clock, bar)
        bar.close()
        wall = time.perf_counter() - wall0
        summary = self._summary(start_step, self.tokens - start_tokens, wall, clock.total_rate())
        if self.env.is_main:
            self._write_outputs(summary)
        return summary

    def _after_step(self, lr: float, loss: torch.Tensor, grad_norm: float, clock: _Throughput, bar: tqdm) -> None:
        """Logging, evaluation and checkpointing due at the step just taken (all ranks call)."""
        train = self.cfg.train
        row: dict[str, Any] = {}
        if self._due(train.log_every):
            row = {"step": self.step, "loss": float(_all_mean(loss)), "lr": lr, "grad_norm": grad_norm,
                   "tokens": self.tokens, "tokens_per_s": clock.interval_rate(),
                   "skipped_steps": skipped_steps(self.engine.optimizer)}
        if self._due(train.eval_every):
            row = {"step": self.step, **row, "val_loss": self.evaluate()}
        if row:
            self.session_rows.append(row)
            if self.metrics is not None:
                self.metrics.log(row)
        if "loss" in row:
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if self._due(train.checkpoint_every):
            checkpoint.save(self.engine, self.plan.out, self._trainer_state(), self.env.is_main, train.keep_last,
                            self.identity)

    def _summary(self, start_step: int, tokens: int, wall: float, rate: float) -> dict[str, Any]:
        train_rows = [r for r in self.session_rows if "loss" in r]
        val_rows = [r for r in self.session_rows if "val_loss" in r]
        return {
            "steps": self.step, "start_step": start_step,
            "first_loss": train_rows[0]["loss"] if train_rows else None,
            "final_loss": train_rows[-1]["loss"] if train_rows else None,
            "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
            "tokens": tokens, "time_s": wall, "tokens_per_s": rate,
            "skipped_steps": skipped_steps(self.engine.optimizer),
            "world_size": self.env.world_size, "backend": self.cfg.backend,
            "optimizer": self.cfg.optimizer.name, "parameters": self.n_params,
        }

    def _write_outputs(self, summary: dict[str, Any]) -> None:
        assert self.metrics is not None
        write_json(self.plan.out / "summary.json", summary)
        title = f"{self.cfg.name or 'run'}: {self.cfg.optimizer.name}, {self.n_params / 1e6:.2f}M params"
        plot_run(self.metrics.rows, self.plan.out / "loss.png", title)
