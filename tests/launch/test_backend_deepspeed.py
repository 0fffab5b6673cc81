"""Backend deepspeed: ZeRO-2 on 2 gloo ranks under torchrun matches the single-process run, and its checkpoint
(the shared reshardable format) resumes at one rank under deepspeed and under backend single; so does a ZeRO-3
run's, also at another zero stage; skipped steps are
counted once per launcher step from DeepSpeed's and our optimizer's counters; option validation and the
DeepSpeed config built from the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from launch.backends import backend_class
from launch.backends.deepspeed import DeepSpeedEngine, deepspeed_config
from launch.dist_env import detect
from launch.errors import LaunchError
from launch.metrics import read_metrics
from tests.distributed import run_distributed
from tests.launch.helpers import run_pretrain
from tests.launch.test_trainer import LOSS_RTOL, REPO, _free_port

ONE = detect(None, {})
OPTIMIZER = {"name": "mgup_adamw", "lr": 3e-3}
TRAIN = {"steps": 8, "checkpoint_every": 4, "eval_every": 4}


def _torchrun(nproc: int, *argv: object) -> subprocess.CompletedProcess[str]:
    """Runs pretrain on ``nproc`` torchrun ranks; returns the finished process (the caller checks its status)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "launch.pretrain", *map(str, argv)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _assert_continues(resumed: list[dict], full: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for key in ("loss", "grad_norm", "val_loss"):
        expected = [r[key] for r in full[4:] if key in r]
        assert [r[key] for r in resumed if key in r] == pytest.approx(expected, rel=LOSS_RTOL)


def test_zero2_two_ranks_matches_single_and_resumes_at_one_rank(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """DeepSpeed averages the accumulated micro-batch gradients over ranks, clips to train.grad_clip and steps
    our rules on its flat partitions: the W=2 run equals the single-process run up to the float32 summation
    order of the gradient mean (tolerance as in test_trainer's DDP test; measured: 1e-7 relative). Its step-4
    checkpoint, in the reshardable format, continues the same run at W=1 under deepspeed and under single."""
    ds = make_config("ds", backend="deepspeed", backend_options={"zero_stage": 2}, optimizer=OPTIMIZER, train=TRAIN)
    single = make_config("single", optimizer=OPTIMIZER, train=TRAIN)
    two, one = tmp_path / "w2", tmp_path / "single"
    started = _torchrun(2, "--config", ds, "--out", two)
    assert started.returncode == 0, started.stderr[-3000:]
    run_pretrain("--config", single, "--out", one)
    full, reference = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert full[-1]["loss"] < full[0]["loss"] - 0.3 and full[-1]["skipped_steps"] == 0
    for key in ("loss", "grad_norm", "val_loss"):
        expected = [r[key] for r in reference if key in r]
        assert [r[key] for r in full if key in r] == pytest.approx(expected, rel=LOSS_RTOL)

    ckpt = two / "checkpoints/step_0000004"
    resumed = _torchrun(1, "--resume", ckpt, "--out", tmp_path / "w1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_continues(read_metrics(tmp_path / "w1" / "metrics.jsonl"), full)
    run_pretrain("--resume", ckpt, "--config", single, "--out", tmp_path / "single_resumed")
    _assert_continues(read_metrics(tmp_path / "single_resumed" / "metrics.jsonl"), full)


def test_zero3_checkpoint_resumes_at_one_rank_at_zero3_zero1_and_under_single(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """At ZeRO-3 the checkpoint holds the gathered whole parameters and the optimizer state and masters by
    parameter, as at stages 1-2: the W=2 run's step-4 checkpoint continues the same run at W=1 under deepspeed
    at stage 3 (the saved config) and at stage 1, and under backend single."""
    options = {"backend": "deepspeed", "optimizer": OPTIMIZER, "train": TRAIN}
    zero3 = make_config("ds3", **options, backend_options={"zero_stage": 3})
    zero1 = make_config("ds1", **options, backend_options={"zero_stage": 1})
    single = make_config("single", optimizer=OPTIMIZER, train=TRAIN)
    started = _torchrun(2, "--config", zero3, "--out", tmp_path / "w2")
    assert started.returncode == 0, started.stderr[-3000:]
    full = read_metrics(tmp_path / "w2" / "metrics.jsonl")
    assert full[-1]["loss"] < full[0]["loss"] - 0.3 and full[-1]["skipped_steps"] == 0

    ckpt = tmp_path / "w2/checkpoints/step_0000004"
    for name, config in (("zero3", ()), ("zero1", ("--config", zero1))):
        resumed = _torchrun(1, "--resume", ckpt, *config, "--out", tmp_path / name)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _assert_continues(read_metrics(tmp_path / name / "metrics.jsonl"), full)
    run_pretrain("--resume", ckpt, "--config", single, "--out", tmp_path / "single")
    _assert_continues(read_metrics(tmp_path / "single" / "metrics.jsonl"), full)


class _FakeDeepSpeed:
    """A DeepSpeed engine stand-in whose ``step`` skips as told: ``"overflow"`` (DeepSpeed's own skip), an int
    (our guard skipping that many param groups) or None (a normal step)."""

    def __init__(self, client: SimpleNamespace, plan: list[object]) -> None:
        self.optimizer = SimpleNamespace()
        self.skipped_steps = 0
        self.client, self.plan = client, plan

    def step(self) -> None:
        outcome = self.plan.pop(0)
        if outcome == "overflow":
            self.skipped_steps += 1
        elif outcome is not None:
            self.client.skipped_steps += outcome

    def get_global_grad_norm(self) -> float:
        return 1.0


def test_skipped_steps_count_each_launcher_step_once() -> None:
    client = SimpleNamespace(skipped_steps=0)
    ds = _FakeDeepSpeed(client, [None, "overflow", 2, None, 1])
    engine = DeepSpeedEngine(ds, client, grad_clip=1.0)  # type: ignore[arg-type]
    counts = []
    for _ in range(5):
        engine.clip_grad_norm(1.0)
        engine.step()
        counts.append(engine.optimizer.skipped_steps)
    assert counts == [0, 1, 2, 2, 3]
    assert ds.plan == []  # step() after clip_grad_norm did not step again


def _skips_of_a_nan_step(rank: int, world_size: int) -> list[int]:
    """Three DeepSpeed ZeRO-2 steps of the nano GPT through the backend, the second with a NaN gradient on
    rank 1 only; ``engine.optimizer.skipped_steps`` after each, and whether the NaN step left the weights alone."""
    import torch

    from launch.model import GPT, GPTShape
    from launch.optim_factory import build

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    backend = backend_class("deepspeed")(detect(None, os.environ), {"zero_stage": 2})
    backend.configure(micro_batch=2, accum_steps=1, grad_clip=1.0)
    torch.manual_seed(0)
    engine = backend.build(GPT(GPTShape(1, 2, 16, 8)), lambda m: build(m, "mgup_adamw", {"lr": 1e-2}))
    counts = []
    for step in range(3):
        tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(10 * step + rank))
        _, loss = engine.model(tokens[:, :-1], tokens[:, 1:])
        (loss * (float("nan") if step == 1 and rank == 1 else 1.0)).backward()
        before = [p.detach().clone() for p in engine.ds.module.parameters()]
        engine.clip_grad_norm(1.0)
        engine.step()
        engine.zero_grad()
        unchanged = all(torch.equal(a, p) for a, p in zip(before, engine.ds.module.parameters()))
        counts.append(engine.optimizer.skipped_steps + (10 if unchanged else 0))
    return counts


def test_a_non_finite_step_is_counted_once_on_every_rank() -> None:
    """DeepSpeed's overflow check skips the whole step (weights unchanged: +10 in the counts) on both ranks."""
    assert run_distributed(2, _skips_of_a_nan_step) == [[0, 11, 1], [0, 11, 1]]


def test_deepspeed_config_follows_the_run() -> None:
    options = {"zero_stage": 3, "bf16": True, "gather_max_numel": 4096}
    config = deepspeed_config(micro_batch=4, world_size=2, grad_clip=0.5, options=options)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 8 and config["managed_gradient_accumulation"] is False
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3} and config["mgup_dist"] == {"gather_max_numel": 4096}
    assert "mgup_dist" not in deepspeed_config(4, 2, 0.5, {**options, "gather_max_numel": None})


def test_option_validation() -> None:
    with pytest.raises(LaunchError, match=r"zero_stage must be one of \[1, 2, 3\], got 0 \(stage 0: use backend ddp\)"):
        backend_class("deepspeed")(ONE, {"zero_stage": 0})
    with pytest.raises(LaunchError, match="zero_stage must be one of"):
        backend_class("deepspeed")(ONE, {"zero_stage": True})
    with pytest.raises(LaunchError, match="bf16 must be true or false"):
        backend_class("deepspeed")(ONE, {"bf16": "yes"})
    with pytest.raises(LaunchError, match="gather_max_numel must be null or an integer >= 1"):
        backend_class("deepspeed")(ONE, {"gather_max_numel": 0})
    with pytest.raises(LaunchError, match="valid: bf16, gather_max_numel, zero_stage"):
        backend_class("deepspeed")(ONE, {"stage": 2})
