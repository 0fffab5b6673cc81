"""Convergence evidence: each selective optimizer against its base optimizer, at learning rates tuned by a sweep.

Run from the repository root::

    python -m benchmarks.convergence --budget full --jobs 2

The plan (``configs/convergence/<budget>.json``, see `benchmarks.convergence_plan`) names a small GPT run on
the embedded corpus, the optimizers with their fixed hyperparameters and lr grids, the seeds and the pairs.
For every optimizer, each lr of its grid is trained on the sweep seed (the plan's first seed); the lr with
the lowest final validation loss is selected, and trained on the other seeds too (the sweep run counts as
one seed). Seed ``s`` fixes the initialisation, the data order and the validation windows, the same for
every optimizer, so pairs are compared seed by seed. Runs are ``launch.pretrain`` in ``--jobs`` worker
processes of one thread each (`benchmarks.convergence_runs`); their folders under ``--work`` make the
benchmark resumable.

Outputs in ``--out``: ``sweep.json``/``sweep.md``, ``convergence.json``/``convergence.md`` (pairs and
per-seed tables) and one ``<candidate>_vs_<baseline>.png`` per pair; the ``Convergence`` section of
``--results`` (default ``benchmarks/RESULTS.md``) gets the tables, plots, command, machine and date.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from benchmarks import convergence_stats as stats
from benchmarks.convergence_plan import Plan, load_plan
from benchmarks.convergence_plots import plot_pair
from benchmarks.convergence_runs import RunQueue, RunSpec, run_folder
from benchmarks.results_page import RESULTS, replace_section
from benchmarks.step_overhead import cpu_name
from launch.config import parse_config
from launch.metrics import write_json
from launch.optim_factory import is_muon_family

SECTION = "Convergence"
DEFAULT_OUT = Path("benchmarks/convergence_results")
DEFAULT_WORK = Path("runs/convergence")
Results = dict[tuple[str, float, int], dict[str, Any]]


def spec(plan: Plan, work: Path, optimizer: str, lr: float, seed: int) -> RunSpec:
    return RunSpec(optimizer, lr, seed, plan.run_config(optimizer, lr, seed), run_folder(work, optimizer, lr, seed))


class SeedFollowUp:
    """`RunQueue` follow-up: once all of an optimizer's sweep runs are in, its selected lr on the other seeds."""

    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan, self.work = plan, work
        self.sweep: dict[str, dict[float, Optional[float]]] = {opt: {} for opt in plan.optimizers}

    def __call__(self, done: RunSpec, result: dict[str, Any]) -> Iterable[RunSpec]:
        if done.seed != self.plan.sweep_seed or done.lr not in self.plan.lrs[done.optimizer]:
            return []
        finals = self.sweep[done.optimizer]
        finals[done.lr] = result["summary"]["final_val_loss"]
        if len(finals) < len(self.plan.lrs[done.optimizer]):
            return []
        lr = stats.select_lr(finals)
        return [spec(self.plan, self.work, done.optimizer, lr, s) for s in self.plan.seeds[1:]]


def run_plan(plan: Plan, work: Path, jobs: int) -> tuple[Results, int]:
    """Trains (or takes from ``work``) every run of ``plan``; returns the results and how many were trained.
    The Muon family's sweep goes first and seed runs jump the queue, so the long runs do not come last."""
    slow_first = sorted(plan.optimizers, key=lambda opt: not is_muon_family(opt))  # Newton–Schulz: the long runs
    sweep = [spec(plan, work, opt, lr, plan.sweep_seed) for opt in slow_first for lr in plan.lrs[opt]]
    total = len(sweep) + len(plan.optimizers) * (len(plan.seeds) - 1)
    queue = RunQueue(jobs, SeedFollowUp(plan, work), total)
    return queue.run(sweep), queue.trained


@dataclasses.dataclass(frozen=True)
class Summary:
    """The numbers of a finished plan: sweep finals, selected lrs, per-seed finals at them, pair statistics."""

    sweep: dict[str, dict[float, Optional[float]]]
    selected: dict[str, float]
    finals: dict[str, dict[int, Optional[float]]]
    pairs: list[stats.PairStats]


def summarize(plan: Plan, results: Results) -> Summary:
    """`Summary` of ``results`` (which must hold every run of ``plan``)."""
    final = {key: r["summary"]["final_val_loss"] for key, r in results.items()}
    sweep = {opt: {lr: final[opt, lr, plan.sweep_seed] for lr in plan.lrs[opt]} for opt in plan.optimizers}
    selected = {opt: stats.select_lr(sweep[opt]) for opt in plan.optimizers}
    finals = {opt: {s: final[opt, selected[opt], s] for s in plan.seeds} for opt in plan.optimizers}
    pairs = [stats.compare_pair(p.candidate, p.baseline, finals[p.candidate], finals[p.baseline])
             for p in plan.pairs]
    return Summary(sweep, selected, finals, pairs)


def pair_plot_name(pair: stats.PairStats) -> str:
    return f"{pair.candidate}_vs_{pair.baseline}.png"


def write_outputs(plan: Plan, summary: Summary, results: Results, out: Path, meta: dict[str, Any]) -> list[Path]:
    """Writes the JSON/Markdown tables and the pair plots into ``out``; returns the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    sweep_rows = [{"optimizer": opt, "lr": lr, "seed": plan.sweep_seed, "final_val_loss": loss,
                   "final_train_loss": results[opt, lr, plan.sweep_seed]["summary"]["final_loss"],
                   "selected": lr == summary.selected[opt]}
                  for opt, finals in summary.sweep.items() for lr, loss in finals.items()]
    write_json(out / "sweep.json", {**meta, "sweep": sweep_rows})
    (out / "sweep.md").write_text(stats.sweep_table(summary.sweep, summary.selected, plan.sweep_seed), "utf-8")
    pairs = [{**dataclasses.asdict(p), "claim": c.claim, "claim_status": stats.claim_status(p)}
             for p, c in zip(summary.pairs, plan.pairs, strict=True)]
    finals = {opt: {"lr": summary.selected[opt], "final_val_loss_by_seed": {str(s): v for s, v in per_seed.items()}}
              for opt, per_seed in summary.finals.items()}
    write_json(out / "convergence.json", {**meta, "optimizers": finals, "pairs": pairs})
    (out / "convergence.md").write_text(_pair_tables(plan, summary), encoding="utf-8")
    steps = next(iter(results.values()))["summary"]["steps"]
    smooth = max(1, steps // 20)
    paths = []
    for pair in summary.pairs:
        sides = {opt: [results[opt, summary.selected[opt], s] for s in plan.seeds]
                 for opt in (pair.candidate, pair.baseline)}
        paths.append(out / pair_plot_name(pair))
        title = (f"{pair.candidate} (lr {summary.selected[pair.candidate]:g}) vs {pair.baseline} "
                 f"(lr {summary.selected[pair.baseline]:g}): mean and min-max over {len(plan.seeds)} seeds")
        plot_pair(sides, paths[-1], title, smooth)
    return paths


def _pair_tables(plan: Plan, summary: Summary) -> str:
    return "\n".join([
        stats.pairs_table(summary.pairs, summary.selected, [p.claim for p in plan.pairs]),
        stats.seeds_table(summary.finals, summary.selected),
    ])


def plain_verdicts(summary: Summary) -> str:
    """One sentence each for the claims that held and those that did not."""
    held = [f"{p.candidate} vs {p.baseline}" for p in summary.pairs if p.verdict == "better"]
    missed = [f"{p.candidate} vs {p.baseline} ({stats.claim_status(p).removeprefix('not reproduced: ')})"
              for p in summary.pairs if p.verdict != "better"]
    lines = [f"**Not reproduced here:** {'; '.join(missed)}."] if missed else []
    if held:
        lines.append(f"**Reproduced here:** {'; '.join(held)}.")
    return " ".join(lines)


def _setup(plan: Plan, results: Results) -> str:
    opt = plan.optimizers[0]
    cfg = parse_config(plan.run_config(opt, plan.lrs[opt][0], plan.sweep_seed))
    m, train, data = cfg.model, cfg.train, cfg.data
    params = next(iter(results.values()))["summary"]["parameters"]
    return (
        f"Setup (plan `{plan.name}`): byte-level GPT, {m.n_layer} layers x {m.n_embd} ({m.n_head} heads, "
        f"context {m.block_size}), {params / 1e6:.2f}M parameters, on {_corpus(data.path, data.max_bytes)} (1 "
        f"file in {data.val_every} held out); {train.steps} steps of {cfg.batch.global_batch} x {m.block_size} "
        f"bytes, warmup {cfg.schedule.warmup_steps}, cosine to {plan.min_lr_ratio:g} x peak lr, grad clip "
        f"{train.grad_clip:g}; validation loss over {train.eval_samples} fixed held-out windows every "
        f"{train.eval_every} steps. Seeds {', '.join(map(str, plan.seeds))}: seed s fixes the initialisation, "
        f"the data order and the validation windows, identical for every optimizer. Learning rate: each "
        f"optimizer's grid is run on seed {plan.sweep_seed}, the lowest final validation loss selects the lr, "
        f"which then runs on the other seeds; the seed-{plan.sweep_seed} run is one of the seeds, so each mean "
        f"leans slightly optimistic (the best of a few noisy draws), alike for both sides of a pair. The Muon "
        f"family (muon, mgup_muon, mars_m) uses one lr for its matrix path and its AdamW path (embeddings, "
        f"norms, biases), the Moonlight convention their 0.2·sqrt(max(A, B)) update scale is built for; the "
        f"sweep moves both. Differences are candidate − baseline per seed: mean ± half-width of the 95% "
        f"t-interval; the verdict is better/worse when that interval excludes 0, else within noise."
    )


def _run_times(plan: Plan, results: Results) -> str:
    """Mean seconds per run of each optimizer: its training loop, evaluations included (start-up excluded)."""
    times = {opt: [r["summary"]["time_s"] for (o, _, _), r in results.items() if o == opt] for opt in plan.optimizers}
    return "Seconds per run (mean; training loop with its evaluations): " + ", ".join(
        f"{opt} {sum(t) / len(t):.0f}" for opt, t in times.items() if t) + "."


def _corpus(path: Optional[str], max_bytes: int) -> str:
    source = "the embedded corpus (the Python standard library's source)" if path is None else f"`{path}`"
    return f"{source}, first {max_bytes:,} bytes"


def _hparams_table(plan: Plan) -> str:
    lines = ["| optimizer | lr grid | fixed hyperparameters |", "|---|---|---|"]
    for opt in plan.optimizers:
        fixed = ", ".join(f"{k}={v}" for k, v in plan.hparams[opt].items()) or "defaults"
        lines.append(f"| {opt} | {', '.join(f'{lr:g}' for lr in plan.lrs[opt])} | {fixed} |")
    return "\n".join(lines) + "\n"


def results_body(plan: Plan, summary: Summary, results: Results, meta: dict[str, Any], plots: list[Path],
                 results_path: Path) -> str:
    """The Markdown of the results page's Convergence section."""
    images = [f"![{p.stem}]({os.path.relpath(p, results_path.parent)})" for p in plots]
    return "\n\n".join([
        f"Command: `{meta['command']}` on {meta['date']}; machine: {meta['machine']}; one intra-op thread per "
        f"run, {meta['jobs']} run(s) at a time; {meta['wall_s'] / 60:.1f} min wall time in this invocation "
        f"({meta['trained']} of {meta['run_count']} runs trained, the rest reused from `{meta['work']}`).",
        _setup(plan, results) + " " + _run_times(plan, results),
        "### Pairs (final validation loss, nats/byte, mean ± std over seeds)",
        _pair_tables(plan, summary).rstrip(),
        plain_verdicts(summary),
        "### Learning-rate sweep",
        stats.sweep_table(summary.sweep, summary.selected, plan.sweep_seed).rstrip(),
        _hparams_table(plan).rstrip(),
        "### Curves (mean line, min–max band over seeds)",
        "\n".join(images),
    ])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="full", help="plan name in configs/convergence (full, quick) or a "
                        "plan .json path (default full)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"tables and plots (default {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"run folders (default {DEFAULT_WORK})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results page whose Convergence section "
                        "is replaced (default benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> Summary:
    """Runs the plan, writes the outputs and the results section; returns the `Summary`."""
    args = parse_args(argv)
    try:
        plan = load_plan(args.budget)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds like Ctrl-C: the worker pool is terminated
    started = time.perf_counter()
    results, trained = run_plan(plan, args.work, args.jobs)
    summary = summarize(plan, results)
    meta = {
        "command": " ".join(["python -m benchmarks.convergence", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_name()}, "
                   f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "jobs": args.jobs, "wall_s": time.perf_counter() - started, "trained": trained, "run_count": len(results),
        "work": str(args.work), "plan": plan.name,
    }
    plots = write_outputs(plan, summary, results, args.out, meta)
    replace_section(args.results, SECTION, results_body(plan, summary, results, meta, plots, args.results))
    print((args.out / "convergence.md").read_text(encoding="utf-8"))
    return summary


if __name__ == "__main__":
    main()
