"""Load balance of the Newton–Schulz owner plan (planner only, no communication or NS is run).

For the ≥2-D block weights of GPT-2 small/medium/XL (nanoGPT layout) and a 7B LLaMA-like model — the
matrices `muon_param_groups` routes to the matrix path (embeddings and the head excluded) — plans owners
with `balanced_owners` at several world sizes and reports max/mean NS cost per rank (`ns_cost`), next to the
best any plan can reach (``max(largest matrix, mean)/mean``) and a round-robin baseline.

    python -m benchmarks.owner_balance                       # all models, W = 8, 64, 512; updates RESULTS.md
    python -m benchmarks.owner_balance --models gpt2-small --world-sizes 8 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from benchmarks.results_page import RESULTS, replace_section
from mgup_dist.shard.planner import balanced_owners, ns_cost, plan_summary

TITLE = "Owner-plan balance"
SECTION = f"## {TITLE}"
WORLD_SIZES = (8, 64, 512)
TARGET = 1.10


def gpt2_matrices(layers: int, d: int) -> list[tuple[int, int]]:
    """nanoGPT block weights (out, in): attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per layer."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def llama_matrices(layers: int, d: int, ffn: int) -> list[tuple[int, int]]:
    """LLaMA block weights (out, in): q, k, v, o projections, then gate, up, down per layer."""
    return [(d, d)] * 4 * layers + [(ffn, d), (ffn, d), (d, ffn)] * layers


MODELS = {
    "gpt2-small": gpt2_matrices(12, 768),
    "gpt2-medium": gpt2_matrices(24, 1024),
    "gpt2-xl": gpt2_matrices(48, 1600),
    "llama-7b": llama_matrices(32, 4096, 11008),
}


@dataclass(frozen=True)
class Row:
    model: str
    matrices: int
    world_size: int
    imbalance: float
    bound: float
    round_robin: float
    planner_ms: float

    @property
    def note(self) -> str:
        if self.matrices < self.world_size:
            return "more ranks than matrices: the largest matrix sets the floor"
        if self.imbalance <= TARGET:
            return "meets target"
        if self.imbalance <= self.bound * (1 + 1e-12):
            return f"above target {TARGET:.2f}, but optimal (equals the lower bound)"
        return f"above target {TARGET:.2f}"


def measure(model: str, world_size: int) -> Row:
    """Plans ``model``'s matrices over ``world_size`` ranks and summarises the load."""
    costs = [ns_cost(rows, cols) for rows, cols in MODELS[model]]
    start = time.perf_counter()
    owners = balanced_owners(costs, world_size)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    summary = plan_summary(costs, owners, world_size)
    round_robin = plan_summary(costs, [i % world_size for i in range(len(costs))], world_size)
    return Row(model, len(costs), world_size, summary.imbalance, summary.bound, round_robin.imbalance, elapsed_ms)


def table(rows: Sequence[Row]) -> str:
    """Markdown table of ``rows``."""
    lines = [
        "| model | matrices | W | max/mean (plan) | lower bound | round-robin | planner ms | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r.model} | {r.matrices} | {r.world_size} | {r.imbalance:.3f} | {r.bound:.3f} | {r.round_robin:.3f} "
        f"| {r.planner_ms:.2f} | {r.note} |"
        for r in rows
    ]
    return "\n".join(lines)


def section(rows: Sequence[Row], command: str) -> str:
    """The RESULTS.md section's body: command, date, what is measured, the table."""
    today = datetime.date.today().isoformat()
    return (
        f"Command: `{command}` ({today}). Planner only: `balanced_owners` (LPT, replaced by MULTIFIT where that "
        "is better) over the ≥2-D block weights (embeddings and head excluded, as `muon_param_groups` does), cost "
        "per matrix `max(m,n)·min(m,n)²`. max/mean is the most loaded rank's NS cost over the mean; 'lower bound' "
        "is the floor for any plan (`PlanSummary.bound`: mean, largest matrix, or the W-th plus (W+1)-th largest, "
        "which must share a rank); round-robin assigns matrix i to rank i mod W. Planner ms is one uncached "
        "call (the orthogonalizer memoises plans, so a run pays it once). "
        f"Target: ≤ {TARGET:.2f} where matrices outnumber ranks. Where ranks outnumber matrices, some ranks idle and "
        "the largest matrix sets the step time: the sharded (Gram) mode of `DistributedOrthogonalizer` is the "
        "lever there, not the plan.\n\n" + table(rows) + "\n"
    )


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=list(WORLD_SIZES))
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is updated")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = [measure(model, w) for model in args.models for w in args.world_sizes]
    print(table(rows))
    if not args.no_write:
        command = "python -m benchmarks.owner_balance " + " ".join(argv if argv is not None else sys.argv[1:])
        replace_section(args.results, TITLE, section(rows, command.strip()))
    return rows


if __name__ == "__main__":
    main()
