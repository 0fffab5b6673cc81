"""In-process A/B of two builds of the native kernels on the GPT-2-small MGUP-AdamW step.

Run from the repository root, with the other build's checkout next to it (here the commit before a change)::

    git worktree add /tmp/before HEAD~1
    python -m benchmarks.native_ab --a /tmp/before --b . --rounds 30

Builds each checkout's `mgup_dist/native` sources into its own library, then steps three optimizers over one
GPT-2-small parameter set (`benchmarks.step_overhead`): our AdamW, and two MGUP-AdamW optimizers whose kernels are
build A's and build B's (`mgup_dist.native.using`), in rotating order, ``--rounds`` times. A shared machine's load
drifts by tens of percent over seconds; steps taken a few hundred milliseconds apart share it, so the per-round
difference B − A resolves changes of a few milliseconds that separate runs cannot. Both builds run under this
checkout's Python side: their exported C signatures must be this checkout's (`mgup_dist.native.SIGNATURES`).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.step_overhead import GPT2_SMALL, SMOKE, GPT2Parameters, set_gradients, timed_step
from mgup_dist import native
from mgup_dist.optim import build_optimizer

NATIVE_DIR = Path("mgup_dist") / "native"


def load_build(checkout: Path, target: Path) -> ctypes.CDLL:
    """The library built from ``checkout``'s native sources into ``target``."""
    sources = checkout / NATIVE_DIR
    missing = [path.name for path in native.SOURCES if not (sources / path.name).is_file()]
    if missing:
        raise SystemExit(f"{checkout} has no native sources {missing} under {NATIVE_DIR}")
    return native.load(native.build(target, source_dir=sources))


def rounds_of(libraries: Sequence[ctypes.CDLL], rounds: int, warmup: int, small: bool) -> list[list[float]]:
    """Seconds per step: row 0 our AdamW, row 1 + i MGUP-AdamW on ``libraries[i]``; each round steps them all
    once, starting one further along each round."""
    model = GPT2Parameters(SMOKE if small else GPT2_SMALL)
    set_gradients(model)
    optimizers = [build_optimizer("adamw", model.parameters())]
    optimizers += [build_optimizer("mgup_adamw", model.parameters()) for _ in libraries]
    kernels = [libraries[0], *libraries]

    def step(index: int) -> float:
        with native.using(kernels[index]):
            return timed_step(optimizers[index])

    for _ in range(warmup):
        for index in range(len(optimizers)):
            step(index)
    times: list[list[float]] = [[] for _ in optimizers]
    for round_ in range(rounds):
        for offset in range(len(optimizers)):
            index = (round_ + offset) % len(optimizers)
            times[index].append(step(index))
    return times


def report(times: list[list[float]], labels: Sequence[str]) -> str:
    """Medians, ratios to AdamW, and the per-round difference B − A."""
    adamw = statistics.median(times[0])
    lines = [f"our AdamW: {adamw * 1e3:.1f} ms (median of {len(times[0])})"]
    for label, row in zip(labels, times[1:]):
        paired = statistics.median(x / y for x, y in zip(row, times[0]))
        lines.append(f"MGUP-AdamW, build {label}: {statistics.median(row) * 1e3:.1f} ms, "
                     f"{statistics.median(row) / adamw:.3f}x AdamW (per round {paired:.3f}x)")
    differences = [(b - a) * 1e3 for a, b in zip(times[1], times[2])]
    low, middle, high = statistics.quantiles(differences, n=4) if len(differences) > 1 else differences * 3
    lines.append(f"B - A per round: median {middle:+.2f} ms (quartiles {low:+.2f} to {high:+.2f})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout whose kernels are build A")
    parser.add_argument("--b", type=Path, default=Path("."), help="checkout whose kernels are build B (default .)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of one step each (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2-shaped set, for smoke tests")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.warmup < 0 or args.threads < 1:
        parser.error("--rounds must be >= 2, --warmup >= 0, --threads >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Builds both libraries, runs the rounds, prints and returns the report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mgup-native-ab-") as scratch:
        libraries = [load_build(checkout.resolve(), Path(scratch) / label) for label, checkout in
                     (("a", args.a), ("b", args.b))]
        result = report(rounds_of(libraries, args.rounds, args.warmup, args.small), ("A", "B"))
    print(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
