"""Entry point: GPT pretraining with an mgup_dist optimizer.

    python -m launch.pretrain --config configs/NAME.json [--data PATH] [--steps N] [--out DIR] [--resume DIR|auto] [--seed S]
    torchrun --nproc_per_node N -m launch.pretrain ...        (also: deepspeed --num_gpus N, mpirun -np N)

Everything is validated before work starts; a usage or config mistake prints one ``error: ...`` line on
stderr and exits with status 2. Outputs in ``--out`` (default ``runs/<config name>``): ``config.json``
(resolved config), ``data.json`` (corpus split and sha256), ``metrics.jsonl``, ``loss.png``,
``summary.json`` and ``checkpoints/``. ``--resume DIR`` takes a checkpoint folder or a run folder (its newest
checkpoint); without ``--config`` the checkpoint's own config is used, and the run continues in that folder
unless ``--out`` is given. ``--resume auto`` continues in the output folder from its newest complete checkpoint
when there is one and starts afresh from ``--config`` otherwise, so the same command line serves the first
attempt and every restart (``torchrun --max-restarts``); when that checkpoint is already at ``train.steps``
it prints that the run is complete and exits with status 0. Every checkpoint is verified against its manifest
before it is used.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from launch import checkpoint
from launch.backends import backend_class
from launch.config import RunConfig, config_to_dict, load_config, parse_config
from launch.corpus import load_corpus
from launch.dist_env import configure_threads, detect, init_process_group, shutdown
from launch.errors import LaunchError, exit_status
from launch.metrics import write_json
from launch.trainer import RunPlan, Trainer
from mgup_dist.process_exit import exit_without_teardown

_MUST_MATCH_ON_RESUME = ("model", "optimizer")
AUTO = "auto"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise LaunchError(f"{message} (see --help)")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = _Parser(prog="python -m launch.pretrain", description="Pretrain a byte-level GPT with mgup_dist.")
    parser.add_argument("--config", help="JSON run config (optional with --resume)")
    parser.add_argument("--data", help="UTF-8 text file or folder instead of the embedded stdlib corpus")
    parser.add_argument("--steps", type=int, help="override train.steps (total optimizer steps)")
    parser.add_argument("--out", help="output folder (default runs/<config name>)")
    parser.add_argument("--resume", help="checkpoint folder, run folder (its newest checkpoint), or 'auto': the "
                        "output folder's newest checkpoint if there is one, else a fresh start")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _override(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``cfg`` with the command-line overrides applied, validated again."""
    train = dataclasses.replace(
        cfg.train,
        **{k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None},
    )
    data = dataclasses.replace(cfg.data, path=args.data) if args.data is not None else cfg.data
    return parse_config(config_to_dict(dataclasses.replace(cfg, train=train, data=data)))


def _check_resumable(cfg: RunConfig, saved: RunConfig, ckpt: Path) -> None:
    step = checkpoint.read_trainer_state(ckpt)["step"]
    if step >= cfg.train.steps:
        raise LaunchError(
            f"checkpoint {ckpt} is at step {step} and train.steps is {cfg.train.steps}: nothing to do; "
            "pass a larger --steps"
        )
    new, old = config_to_dict(cfg), config_to_dict(saved)
    pairs = [(key, new[key], old[key]) for key in _MUST_MATCH_ON_RESUME]
    pairs += [("batch.global_batch", cfg.batch.global_batch, saved.batch.global_batch),
              ("train.seed", cfg.train.seed, saved.train.seed)]
    for key, mine, theirs in pairs:
        if mine != theirs:
            raise LaunchError(f"{key} differs from checkpoint {ckpt}: {mine} here, {theirs} there")


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise LaunchError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
    return out


def _auto_checkpoint(args: argparse.Namespace) -> Optional[Path]:
    """``--resume auto``: the newest complete checkpoint of the output folder, or None (a fresh start)."""
    if args.out is None and args.config is None:
        raise LaunchError("--resume auto needs --out (or --config, whose name gives the default output folder)")
    out = Path(args.out) if args.out else _default_out(load_config(args.config), args.config)
    return checkpoint.latest(out)


def _default_out(cfg: RunConfig, config_path: str) -> Path:
    return Path("runs") / (cfg.name or Path(config_path).stem)


def plan_run(args: argparse.Namespace) -> Optional[RunPlan]:
    """Resolves config, environment, backend, batch split and folders; raises `LaunchError` on any problem.
    None when ``--resume auto`` finds the run already complete (nothing to do)."""
    auto = args.resume == AUTO
    if auto:
        ckpt = _auto_checkpoint(args)
    else:
        ckpt = checkpoint.resolve(Path(args.resume)) if args.resume else None
    trainer_state = checkpoint.read_trainer_state(ckpt) if ckpt else None
    saved = parse_config(trainer_state["config"]) if trainer_state else None
    if args.config is None and saved is None:
        raise LaunchError("--config is required (unless --resume finds a checkpoint)")
    cfg = _override(load_config(args.config) if args.config else saved, args)
    if trainer_state is not None and saved is not None:
        if auto and trainer_state["step"] >= cfg.train.steps:
            return None
        _check_resumable(cfg, saved, ckpt)
    env = detect(args.local_rank)
    backend = backend_class(cfg.backend)(env, cfg.backend_options)
    _, accum = cfg.batch.split(env.world_size)
    backend.configure(cfg.batch.micro_batch, accum, cfg.train.grad_clip)
    if args.out:
        out = Path(args.out)
    elif ckpt is not None:
        out = ckpt.parent.parent
    else:
        out = _default_out(cfg, args.config)
    return RunPlan(cfg, env, _prepare_out(out), backend, accum, resume=ckpt)


def _describe(plan: RunPlan, corpus_info: dict) -> str:
    cfg, env = plan.cfg, plan.env
    m = cfg.model
    return (
        f"run: GPT {m.n_layer}x{m.n_embd} ({m.n_head} heads, block {m.block_size}), optimizer "
        f"{cfg.optimizer.name}, backend {cfg.backend} on {env.world_size} rank(s) ({env.device.type}), global "
        f"batch {cfg.batch.global_batch} = {env.world_size} x {plan.accum_steps} x {cfg.batch.micro_batch}; corpus "
        f"{corpus_info['train_tokens']:,} train / {corpus_info['val_tokens']:,} val bytes, "
        f"sha256 {corpus_info['sha256'][:12]}"
    )


def _final_line(summary: dict, out: Path) -> str:
    val = summary["final_val_loss"]
    return (
        f"done: steps {summary['start_step']}->{summary['steps']}, train loss {summary['first_loss']:.4f} -> "
        f"{summary['final_loss']:.4f}, val loss {'n/a' if val is None else f'{val:.4f}'}, "
        f"{summary['tokens']:,} tokens in {summary['time_s']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s "
        f"training); outputs in {out}"
    )


def run(plan: RunPlan) -> dict:
    """Trains per ``plan`` on this rank (joining and leaving the process group if the backend needs one)."""
    configure_threads(plan.env)
    if plan.backend.needs_process_group:
        init_process_group(plan.env)
    try:
        corpus = load_corpus(plan.cfg.data)
        trainer = Trainer(plan, corpus)  # restores a checkpoint before any file in the output folder changes
        if plan.env.is_main:
            write_json(plan.out / "config.json", config_to_dict(plan.cfg))
            write_json(plan.out / "data.json", corpus.info)
            print(_describe(plan, corpus.info), flush=True)
        summary = trainer.run()
        if plan.env.is_main:
            print(_final_line(summary, plan.out), flush=True)
    except BaseException:
        shutdown()
        raise
    shutdown(finished=True)
    return summary


def _launch(args: argparse.Namespace) -> Optional[dict]:
    plan = plan_run(args)
    if plan is None:
        print("done: the newest checkpoint is already at train.steps; nothing to do (--resume auto)", flush=True)
        return None
    return run(plan)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit status (2 for usage/config errors)."""
    return exit_status(lambda: _launch(parse_args(argv)))


if __name__ == "__main__":
    exit_without_teardown(main())  # gloo's threads can abort Python's teardown: see mgup_dist.process_exit
