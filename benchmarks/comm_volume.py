"""Communication volume, optimizer-state memory per rank, and step time of `ZeroEngine` on a small GPT shape.

For every optimizer, both layouts (flat, layer-wise) and W in {2, 4}, one ZeRO stage-2 step is measured on
W gloo ranks of this machine: bytes sent per rank per step by kind (from `Collectives.stats`), the extra over
ZeRO AdamW on the same layout (whose traffic is the gradient reduce-scatter and the parameter all-gather),
optimizer-state bytes per rank against total/W, and step time at W=1 and W=2 side by side.

    python -m benchmarks.comm_volume [--layers 4] [--dim 256] [--out benchmarks/RESULTS.md]

Targets (issue 7): MGUP/AlphaAdam extra < 1% of parameter bytes; Muon family extra <= 2x matrix bytes in the
NS dtype on the flat layout and 0 on the layer-wise layout; state per rank within 5% of total/W.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import mgup_dist
from mgup_dist.optim import OPTIMIZERS
from mgup_dist.spawn import run_distributed
from mgup_dist.zero import ZeroEngine
from benchmarks.results_page import replace_section

MUON_FAMILY = ("muon", "mgup_muon", "mars_m")


class GPTShapes(nn.Module):
    """The parameters of a GPT-2-style model (tied embedding, fused QKV, 4x MLP, LayerNorms); no forward."""

    def __init__(self, layers: int, dim: int, vocab: int = 256, block: int = 128) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        blocks = []
        for _ in range(layers):
            blocks += [nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.LayerNorm(dim),
                       nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(dim)


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = mgup_dist.muon_param_groups(model) if name in MUON_FAMILY else model.parameters()
    return mgup_dist.build_optimizer(name, params, lr=1e-3)


@dataclass
class Measurement:
    name: str
    layout: str
    world_size: int
    bytes_by_kind: dict[str, int]
    state_bytes: int
    step_s: float


def _measure(rank: int, world_size: int, names: list[str], layouts: list[str], layers: int, dim: int,
             steps: int) -> list[Measurement]:
    out = []
    for layout in layouts:
        for name in names:
            torch.manual_seed(0)
            model = GPTShapes(layers, dim)
            engine = ZeroEngine(model, _optimizer(name, model), stage=2, layout=layout)
            times = []
            for step in range(steps + 1):
                for p in model.parameters():
                    p.grad = torch.randn_like(p)
                engine.comm.reset_stats()
                start = time.perf_counter()
                engine.step()
                if step:  # the first step allocates state
                    times.append(time.perf_counter() - start)
            kinds = {kind: s.bytes for kind, s in engine.comm.stats.items()}
            out.append(Measurement(name, layout, world_size, kinds, engine.state_bytes(), statistics.median(times)))
    return out


def _param_bytes(layers: int, dim: int) -> tuple[int, int, int]:
    """(all parameter bytes, matrix-path bytes in fp32, matrix-path element count)."""
    model = GPTShapes(layers, dim)
    groups = mgup_dist.muon_param_groups(model)
    matrix = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    return 4 * total, 4 * matrix, matrix


def _table(rows: list[Measurement], layers: int, dim: int) -> str:
    param_bytes, _, matrix_elems = _param_bytes(layers, dim)
    base = {(m.layout, m.world_size): sum(m.bytes_by_kind.values()) for m in rows if m.name == "adamw"}
    lines = [
        "| optimizer | layout | W | bytes/step/rank | extra vs ZeRO AdamW | extra / param bytes | extra / bf16 matrix bytes | collectives |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        total = sum(m.bytes_by_kind.values())
        extra = total - base[(m.layout, m.world_size)]
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(m.bytes_by_kind.items()))
        lines.append(
            f"| {m.name} | {m.layout} | {m.world_size} | {total:,} | {extra:,} | {extra / param_bytes:.3%} "
            f"| {extra / (2 * matrix_elems):.2f}x | {kinds} |"
        )
    return "\n".join(lines)


def _memory_table(rows: list[Measurement], single: dict[str, int]) -> str:
    lines = ["| optimizer | layout | W | state bytes on rank 0 | total (W=1) / W | ratio |", "|---|---|---|---|---|---|"]
    for m in rows:
        ideal = single[m.name] / m.world_size
        lines.append(f"| {m.name} | {m.layout} | {m.world_size} | {m.state_bytes:,} | {ideal:,.0f} | {m.state_bytes / ideal:.3f} |")
    return "\n".join(lines)


def _time_table(w1: list[Measurement], w2: list[Measurement]) -> str:
    lines = ["| optimizer | step W=1 (ms) | step W=2 (ms) | W=2 / W=1 |", "|---|---|---|---|"]
    by_name = {m.name: m for m in w2 if m.layout == "flat"}
    for m in w1:
        other = by_name[m.name]
        lines.append(f"| {m.name} | {m.step_s * 1e3:.1f} | {other.step_s * 1e3:.1f} | {other.step_s / m.step_s:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", default=None, help="markdown file whose 'Communication volume' section is replaced")
    args = parser.parse_args(argv)
    names = args.optimizers.split(",")
    if "adamw" not in names:
        names.insert(0, "adamw")
    layouts = ["flat", "layerwise"]
    w1 = run_distributed(1, _measure, names, ["flat"], args.layers, args.dim, args.steps)[0]
    rows = [m for w in (2, 4) for m in run_distributed(w, _measure, names, layouts, args.layers, args.dim, args.steps)[0]]
    single = {m.name: m.state_bytes for m in w1}
    command = "python -m benchmarks.comm_volume " + " ".join(argv if argv is not None else [])
    report = "\n\n".join([
        f"Command: `{command.strip()}`  \nDate: {datetime.date.today()}; machine: {platform.machine()} "
        f"{platform.processor() or ''}, {torch.get_num_threads()} threads available, 1 thread per rank, gloo; "
        f"model: GPT shape, {args.layers} layers, dim {args.dim}, ZeRO stage 2; Muon family in bf16 NS.",
        "Bytes sent per rank per step (rank 0):\n\n" + _table(rows, args.layers, args.dim),
        "Optimizer-state bytes per rank (rank 0):\n\n" + _memory_table(rows, single),
        "Step time, one process vs two ranks on this 2-core machine (flat layout; CPU timings are noisy):\n\n"
        + _time_table(w1, rows),
    ])
    print(report)
    if args.out:
        replace_section(args.out, "Communication volume, memory per rank, step time (ZeroEngine)", report)
    return report


if __name__ == "__main__":
    main()
