"""Train several configs on the same data and seed, then plot their loss curves together.

    python -m launch.compare --configs configs/tiny_adamw.json configs/tiny_mgup_adamw.json [--out DIR]
        [--steps N] [--data PATH] [--seed S] [--nproc N]

Runs go one after another into ``OUT/<label>/`` (label: the config's ``name``, else its file stem), in this
process when ``--nproc`` is 1 and under ``torch.distributed.run`` otherwise. Then ``OUT/compare.png`` shows
every run's train and val loss, and the table of final losses is printed and written to ``OUT/compare.md``.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from launch import pretrain
from launch.config import load_config
from launch.errors import LaunchError, exit_status
from launch.metrics import read_metrics
from launch.plots import plot_compare


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise LaunchError(f"{message} (see --help)")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = _Parser(prog="python -m launch.compare", description="Train configs on the same data and compare losses.")
    parser.add_argument("--configs", nargs="+", required=True, help="JSON run configs")
    parser.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    parser.add_argument("--steps", type=int, help="override train.steps for every run")
    parser.add_argument("--data", help="UTF-8 text file or folder instead of the embedded corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed for every run (default 0)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (default 1: in this process)")
    return parser.parse_args(argv)


def _labels(configs: Sequence[str]) -> list[str]:
    """One label per config (validating each config first); duplicates are an error."""
    labels = [load_config(path).name or Path(path).stem for path in configs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise LaunchError(f"several configs share the label(s) {duplicates}; give them distinct \"name\"s")
    return labels


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_one(config: str, out: Path, args: argparse.Namespace) -> None:
    argv = ["--config", config, "--out", str(out), "--seed", str(args.seed)]
    argv += ["--steps", str(args.steps)] if args.steps is not None else []
    argv += ["--data", args.data] if args.data is not None else []
    if args.nproc == 1:
        if pretrain.main(argv) != 0:
            raise LaunchError(f"the run of {config} failed (see the error above)")
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(_free_port()), "-m", "launch.pretrain", *argv]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise LaunchError(f"the run of {config} failed with exit status {result.returncode}")


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A Markdown table with one row per run: optimizer, steps, final losses, throughput, time."""
    lines = ["| run | optimizer | steps | final train loss | final val loss | tokens/s | time (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, s in summaries.items():
        val = "n/a" if s["final_val_loss"] is None else f"{s['final_val_loss']:.4f}"
        lines.append(f"| {label} | {s['optimizer']} | {s['steps']} | {s['final_loss']:.4f} | {val} | "
                     f"{s['tokens_per_s']:,.0f} | {s['time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def compare(args: argparse.Namespace) -> str:
    """Runs every config, writes the plot and table; returns the table."""
    if args.nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {args.nproc}")
    labels = _labels(args.configs)
    out = Path(args.out)
    for config, label in zip(args.configs, labels):
        _run_one(config, out / label, args)
    summaries = {label: json.loads((out / label / "summary.json").read_text()) for label in labels}
    metrics = {label: read_metrics(out / label / "metrics.jsonl") for label in labels}
    plot_compare(metrics, out / "compare.png", f"{len(labels)} runs, seed {args.seed}")
    table = markdown_table(summaries)
    (out / "compare.md").write_text(table, encoding="utf-8")
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit status (2 for usage/config errors and failed runs)."""
    return exit_status(lambda: print(compare(parse_args(argv)), end=""))


if __name__ == "__main__":
    sys.exit(main())
