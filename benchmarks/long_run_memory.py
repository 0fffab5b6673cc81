"""Long-run memory: does a rank's resident memory grow over thousands of ZeRO optimizer steps?

Trains the launcher's GPT (``nano``: 2 layers, 32 wide, block 32) with `ZeroEngine` (stage 2, flat layout) on
W gloo CPU ranks: random byte batches, backward, global-norm clipping to 1.0, step, ``zero_grad``. Every
``--every`` steps each rank samples its resident set size from ``/proc/self/statm`` (resident pages x page
size; no psutil). Reported per optimizer and rank: RSS at the end of warm-up (step ``--warmup``, default a
tenth of the run), final RSS, the largest growth over the warm-up RSS at any later sample, and that growth per
1000 steps. A leak of even a few bytes per step (a kept tensor, a growing list, a cache keyed by step) shows
as steady growth; allocator noise shows as a small plateau.

    python -m benchmarks.long_run_memory                              # 3000 steps, MGUP-AdamW and MGUP-Muon
    python -m benchmarks.long_run_memory --steps 200 --every 50 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

import mgup_dist
from benchmarks.results_page import RESULTS, replace_section
from launch.model import GPT, GPTShape
from mgup_dist.spawn import run_distributed
from mgup_dist.zero import ZeroEngine

TITLE = "Long-run memory"
SECTION = f"## {TITLE}"
SHAPE = GPTShape(n_layer=2, n_head=2, n_embd=32, block_size=32)
BATCH = 4
MIB = 1 << 20


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``: second field, in pages)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    muon = name in ("muon", "mgup_muon", "mars_m")
    params = mgup_dist.muon_param_groups(model) if muon else model.parameters()
    return mgup_dist.build_optimizer(name, params, lr=1e-3, weight_decay=0.01)


def train_and_sample(
    rank: int, world_size: int, name: str, steps: int, every: int
) -> tuple[list[tuple[int, int]], float]:
    """One rank's run: ``[(step, rss bytes)]`` sampled at step 0 (after the first step) and every ``every``
    steps, and the seconds the steps took. Collective (ZeRO)."""
    torch.manual_seed(0)
    model = GPT(SHAPE)
    engine = ZeroEngine(model, _optimizer(name, model), stage=2, layout="flat")
    gen = torch.Generator().manual_seed(100 + rank)
    samples: list[tuple[int, int]] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        tokens = torch.randint(0, 256, (BATCH, SHAPE.block_size + 1), generator=gen)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        engine.clip_grad_norm(1.0)
        engine.step()
        engine.zero_grad()
        if step == 1 or step % every == 0 or step == steps:
            samples.append((step, rss_bytes()))
    return samples, time.perf_counter() - start


@dataclass(frozen=True)
class Row:
    optimizer: str
    rank: int
    warmup_mib: float
    final_mib: float
    max_growth_mib: float
    growth_per_1k_steps_mib: float
    seconds: float


def summarize(name: str, rank: int, samples: Sequence[tuple[int, int]], warmup: int, seconds: float) -> Row:
    """The `Row` of one rank's samples: RSS at the first sample at or after ``warmup``, final RSS, and the
    largest later growth over it (negative growth counts as 0)."""
    base_step, base = next((s, r) for s, r in samples if s >= warmup)
    later = [r for s, r in samples if s >= base_step]
    growth = max(0, max(later) - base)
    span = max(1, samples[-1][0] - base_step)
    return Row(name, rank, base / MIB, samples[-1][1] / MIB, growth / MIB, growth / MIB * 1000 / span, seconds)


def measure(names: Sequence[str], steps: int, every: int, warmup: int, world_size: int) -> list[Row]:
    rows = []
    for name in names:
        for rank, (samples, seconds) in enumerate(run_distributed(world_size, train_and_sample, name, steps, every)):
            rows.append(summarize(name, rank, samples, warmup, seconds))
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = ["| optimizer | rank | RSS after warm-up (MiB) | final RSS (MiB) | max growth after warm-up (MiB) | "
             "growth per 1000 steps (MiB) | time (s) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.optimizer} | {r.rank} | {r.warmup_mib:.1f} | {r.final_mib:.1f} | {r.max_growth_mib:.2f} | "
              f"{r.growth_per_1k_steps_mib:.2f} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def section(rows: Sequence[Row], command: str, steps: int, every: int, warmup: int, world_size: int) -> str:
    machine = f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"
    return (
        f"Command: `{command}` ({datetime.date.today().isoformat()}; {machine}). `ZeroEngine` (stage 2, flat) on "
        f"{world_size} CPU ranks, GPT {SHAPE.n_layer}x{SHAPE.n_embd} (block {SHAPE.block_size}, batch {BATCH} per "
        f"rank), {steps} steps with clipping; resident set size from `/proc/self/statm` every {every} steps. "
        f"Warm-up ends at step {warmup}.\n\n{table(rows)}\n"
    )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_run_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["mgup_adamw", "mgup_muon"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100, help="sample RSS every N steps")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 10)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is updated")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.world_size < 1:
        parser.error("--steps, --every and --world-size must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    rows = measure(args.optimizers, args.steps, args.every, warmup, args.world_size)
    print(table(rows))
    if not args.no_write:
        command = "python -m benchmarks.long_run_memory " + " ".join(argv if argv is not None else sys.argv[1:])
        replace_section(args.results, TITLE, section(rows, command.strip(), args.steps, args.every, warmup,
                                                     args.world_size))
    return rows


if __name__ == "__main__":
    main()
