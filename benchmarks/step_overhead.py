"""Optimizer step time on a GPT-2-small parameter set, relative to ``torch.optim.AdamW(foreach=True)``.

Run from the repository root::

    python -m benchmarks.step_overhead --threads 2 --steps 5 --out benchmarks/RESULTS.md

Every optimizer of `mgup_dist.optim.OPTIMIZERS` is built with `build_optimizer` at its default
hyperparameters (the Muon family over `muon_param_groups(model)`, so the 2-D block weights take the matrix
path and the embeddings, biases and norms the AdamW path), next to baselines built in this run:
``torch.optim.AdamW(foreach=True)``, MGUP-AdamW whose mask comes from ``torch.topk`` indices, as in the
authors' reference (`TopkOps`), and AdamW and MGUP-AdamW without the native kernels (``MGUP_DIST_NATIVE=0``:
numpy selection passes, the Adam direction and masked update through torch ops), to show what the kernels of
`mgup_dist.native` bring to each. With the kernels, every Adam-family rule forms its direction
``m/(sqrt(v) + eps)`` in one native pass, and MGUP-AdamW forms it inside its first counting pass. The parameters are GPT-2 small's (124M): token
embedding 50257x768 (the tied head), positions 1024x768, 12 blocks of c_attn 768x2304, attention c_proj 768x768, mlp c_fc 768x3072
and c_proj 3072x768 (each with a bias) and two LayerNorms, and a final LayerNorm. Gradients are fixed random
normals, with the embedding rows of tokens absent from a batch (`ABSENT_TOKENS` of the vocabulary) zero, as
in training: zero gradients give zero MGUP scores and so the tie-heavy path of the selection.

Each optimizer runs alone: ``--warmup`` untimed steps, then its timed steps; the table reports the median
and the fastest. The headline ratio is then measured again in ``--pairs`` interleaved pairs of steps
(`paired_ratios`): our AdamW and MGUP-AdamW over one parameter set, stepping in turns, so that the load of a
shared machine, which drifts over seconds, weighs on both steps of a pair alike. The Muon family (Newton–Schulz of every block matrix, slow on a few CPU threads) takes at
most `SLOW_STEPS` timed steps after one warm-up step, so a full run stays within a few minutes; the table
shows the counts. On CPU a step is bound by memory traffic and by the page faults of freshly allocated
temporaries (mgup_dist's single-process steps reuse theirs across tensors and steps, torch's AdamW allocates
its ``sqrt(v)`` list every step); wall-clock times on a shared machine also include other processes' load
(the load average is recorded), which can move the ratios by tens of percent.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from benchmarks.results_page import replace_section
from mgup_dist import native
from mgup_dist.optim import OPTIMIZERS, build_optimizer, muon_param_groups
from mgup_dist.ops.local import LocalOps
from mgup_dist.optim.muon import MuonFamily
from mgup_dist.rules.requests import TopKMask

SECTION = "Step overhead"
ABSENT_TOKENS = 0.6  # fraction of embedding rows whose gradient is zero
SLOW_STEPS = 3  # timed steps of the Muon family (the median then shrugs off one outlier)
TORCH_ADAMW = "torch AdamW (foreach)"
TOPK_BASELINE = "mgup_adamw, torch.topk mask"
PORTABLE = "mgup_adamw, no native kernels"  # MGUP_DIST_NATIVE=0: numpy passes and torch ops instead
PORTABLE_ADAMW = "adamw, no native kernels"
WITHOUT_NATIVE = (PORTABLE_ADAMW, PORTABLE)


@dataclass(frozen=True)
class Shape:
    """GPT-2 dimensions: vocabulary, positions, width, blocks."""

    vocab: int
    positions: int
    width: int
    blocks: int


GPT2_SMALL = Shape(vocab=50257, positions=1024, width=768, blocks=12)
SMOKE = Shape(vocab=512, positions=64, width=64, blocks=2)


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), plus a bias."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(fan_out))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"c_attn": Conv1D(width, 3 * width), "c_proj": Conv1D(width, width)})
        self.mlp = nn.ModuleDict({"c_fc": Conv1D(width, 4 * width), "c_proj": Conv1D(4 * width, width)})


class GPT2Parameters(nn.Module):
    """The parameters of a GPT-2 language model (head tied to ``wte``); no forward pass is needed here."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.width)
        self.wpe = nn.Embedding(shape.positions, shape.width)
        self.h = nn.ModuleList(Block(shape.width) for _ in range(shape.blocks))
        self.ln_f = nn.LayerNorm(shape.width)


def set_gradients(model: GPT2Parameters, seed: int = 0) -> None:
    """Random normal gradients; the embedding rows of absent tokens get zero."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator).mul_(1e-3)
    absent = torch.rand(model.wte.num_embeddings, generator=generator) < ABSENT_TOKENS
    model.wte.weight.grad[absent] = 0.0


class TopkOps(LocalOps):
    """`LocalOps` whose MGUP mask is built like the authors' reference: ``torch.topk`` indices scattered into
    a mask (its tie order is torch's, not the spec's; only the cost matters here)."""

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor]:
        masks = []
        for request in requests:
            scores = request.score_tensor()
            mask = torch.zeros_like(scores, dtype=torch.bool)
            mask[torch.topk(scores, request.k).indices] = True
            masks.append(mask)
        return masks


def optimizer_factories(model: nn.Module) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """Name -> builder, baselines first."""

    def topk_mgup() -> torch.optim.Optimizer:
        optimizer = build_optimizer("mgup_adamw", model.parameters())
        optimizer.distributor.ops = TopkOps()
        return optimizer

    def ours(name: str) -> Callable[[], torch.optim.Optimizer]:
        def build() -> torch.optim.Optimizer:
            params = muon_param_groups(model) if in_muon_family(name) else model.parameters()
            return build_optimizer(name, params)

        return build

    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        TORCH_ADAMW: lambda: torch.optim.AdamW(model.parameters(), foreach=True),
    }
    factories.update((name, ours(name)) for name in OPTIMIZERS)
    factories[PORTABLE_ADAMW] = ours("adamw")
    factories[PORTABLE] = ours("mgup_adamw")
    factories[TOPK_BASELINE] = topk_mgup
    return factories


@contextlib.contextmanager
def native_setting(name: str) -> Iterator[None]:
    """``MGUP_DIST_NATIVE=0`` while a `WITHOUT_NATIVE` variant steps; the environment as it was otherwise."""
    if name not in WITHOUT_NATIVE:
        yield
        return
    before = os.environ.get("MGUP_DIST_NATIVE")
    os.environ["MGUP_DIST_NATIVE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MGUP_DIST_NATIVE"]
        else:
            os.environ["MGUP_DIST_NATIVE"] = before


def timed_step(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def in_muon_family(name: str) -> bool:
    """Muon, MGUP-Muon, MARS-M: built over `muon_param_groups`; Newton–Schulz of every block matrix
    dominates their step."""
    return name in OPTIMIZERS and issubclass(OPTIMIZERS[name], MuonFamily)


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def measure(shape: Shape, steps: int, warmup: int) -> tuple[int, dict[str, list[float]]]:
    """The parameter count, and the seconds of each timed step per optimizer, in `optimizer_factories`
    order. Each optimizer runs alone, its state freed before the next is built (as in training, one
    optimizer's state per process: with several alive, their heap interplay distorts the fresh-allocation
    costs that dominate a CPU step). The Muon family takes at most one warm-up and `SLOW_STEPS` timed steps."""
    model = GPT2Parameters(shape)
    set_gradients(model)
    times: dict[str, list[float]] = {}
    for name, factory in optimizer_factories(model).items():
        slow = in_muon_family(name)
        optimizer = factory()
        with native_setting(name):
            for _ in range(min(warmup, 1) if slow else warmup):
                optimizer.step()
            times[name] = [timed_step(optimizer) for _ in range(min(steps, SLOW_STEPS) if slow else steps)]
        del optimizer
        gc.collect()
        print(f"{name:32s} ms per step: {[round(t * 1e3) for t in times[name]]}", file=sys.stderr, flush=True)
    return sum(p.numel() for p in model.parameters()), times


def paired_ratios(shape: Shape, pairs: int, warmup: int) -> list[float]:
    """MGUP-AdamW's step time over our AdamW's, per pair of consecutive steps: both optimizers over one
    parameter set, stepping in turns (which goes first alternates), so a slow phase of a shared machine falls on
    both steps of a pair and cancels in its ratio."""
    model = GPT2Parameters(shape)
    set_gradients(model)
    adamw, mgup = (build_optimizer(name, model.parameters()) for name in ("adamw", "mgup_adamw"))
    for _ in range(warmup):
        adamw.step()
        mgup.step()
    ratios = []
    for pair in range(pairs):
        if pair % 2:
            mgup_time, adamw_time = timed_step(mgup), timed_step(adamw)
        else:
            adamw_time, mgup_time = timed_step(adamw), timed_step(mgup)
        ratios.append(mgup_time / adamw_time)
    return ratios


def paired_line(ratios: list[float]) -> str:
    """The paired ratios' median and quartiles, as one sentence."""
    low, middle, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return (
        f"Interleaved ({len(ratios)} pairs of steps, MGUP-AdamW and our AdamW alive together and stepping in "
        f"turns): MGUP-AdamW takes {middle:.2f}x our AdamW's step per pair (quartiles "
        f"{low:.2f}x-{high:.2f}x; target <= 1.3x)."
    )


def table(times: dict[str, list[float]]) -> str:
    """Markdown table: median and fastest step, and the medians' ratios to torch's AdamW(foreach) and to
    mgup_dist's AdamW; then the two target ratios."""
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    lines = [
        "| optimizer | timed steps | median ms | fastest ms | vs torch AdamW (foreach) | vs our AdamW |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, seconds in times.items():
        lines.append(
            f"| {name} | {len(seconds)} | {medians[name] * 1e3:.1f} | {min(seconds) * 1e3:.1f} "
            f"| {medians[name] / medians[TORCH_ADAMW]:.2f}x | {medians[name] / medians['adamw']:.2f}x |"
        )
    mgup = medians["mgup_adamw"]
    lines.append(
        f"\nMGUP-AdamW takes {mgup / medians['adamw']:.2f}x our AdamW's step (target <= 1.3x); the torch.topk "
        f"mask takes {medians[TOPK_BASELINE] / mgup:.2f}x MGUP-AdamW's step (target >= 2x). Without the native "
        f"kernels MGUP-AdamW takes {medians[PORTABLE] / mgup:.2f}x its step with them, and "
        f"{medians[PORTABLE] / medians[PORTABLE_ADAMW]:.2f}x AdamW's step without them."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--steps", type=int, default=5, help=f"timed steps per optimizer (Muon family: at most {SLOW_STEPS})"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (Muon family: at most 1)")
    parser.add_argument(
        "--pairs", type=int, default=10, help="interleaved step pairs of our AdamW and MGUP-AdamW (0: none)"
    )
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2-shaped set, for smoke tests")
    parser.add_argument("--out", type=Path, help="markdown file whose step-overhead section is replaced")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.warmup < 0 or args.pairs < 0:
        parser.error("--threads and --steps must be >= 1, --warmup and --pairs >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark, prints the table and writes it to ``--out``; returns the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = SMOKE if args.small else GPT2_SMALL
    load_before = load_average()
    started = time.perf_counter()
    numel, times = measure(shape, args.steps, args.warmup)
    result = table(times)
    if args.pairs:
        result += "\n\n" + paired_line(paired_ratios(shape, args.pairs, args.warmup))
    print(result)
    if args.out is not None:
        command = " ".join(["python -m benchmarks.step_overhead", *(argv if argv is not None else sys.argv[1:])])
        body = "\n".join([
            f"`{command}` on {datetime.date.today().isoformat()}: {cpu_name()}, {os.cpu_count()} CPUs, "
            f"torch.get_num_threads() = {torch.get_num_threads()}, torch {torch.__version__}, "
            f"{numel:,} parameters ({'smoke shapes' if args.small else 'GPT-2 small'}); native kernels "
            f"{'on' if native.library() is not None else 'OFF (unavailable)'}; load average "
            f"{load_before} before, {load_average()} after; {time.perf_counter() - started:.0f} s in all.",
            "",
            result,
        ])
        replace_section(args.out, SECTION, body)
    return result


if __name__ == "__main__":
    main()
