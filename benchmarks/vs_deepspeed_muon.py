"""Our Muon and MGUP-Muon against DeepSpeed's own Muon, all under DeepSpeed ZeRO-2, on one small GPT.

Three variants train the same `launch.model.GPT` (same seed, same batches) on W gloo ranks of this machine (CPU,
1 intra-op thread per rank), side by side in the same processes, their steps interleaved (step 1 of every
variant, then step 2, ...) so that load from other processes on a shared machine affects all of them alike:

- ``deepspeed_muon``: plain ``deepspeed.initialize`` with ``"optimizer": {"type": "Muon", ...}`` (DeepSpeed's
  ``MuonWithAuxAdam``; at ZeRO-1/2 it runs ``muon_update`` on whole matrices while building each rank's gradient
  partition, after an all-reduce of every matrix that straddles a partition boundary);
- ``muon`` / ``mgup_muon``: ours, through `mgup_dist.deepspeed.initialize` (``"type": "mgup_dist.Muon"`` /
  ``"MGUPMuon"``): DeepSpeed reduce-scatters the gradients, our rules step the flat partitions, and each matrix is
  orthogonalised once, on one owner rank (`mgup_dist.shard.orthogonalize`).

Measured per variant, on every rank, over ``--steps`` timed training steps (forward, backward, ``engine.step``)
after ``--warmup`` untimed ones (which also absorb DeepSpeed's ``torch.compile`` of ``muon_update``):

- step time: the median over the timed steps of the slowest rank's time (ratio: ours / DeepSpeed's), and the
  minimum, which other load on a shared machine inflates least;
- bytes communicated per rank per step: every ``torch.distributed`` collective is wrapped (before DeepSpeed's
  comm layer caches its function handles) and counted with `Collectives`' convention: all-reduce the tensor's
  bytes, reduce-scatter the input minus the kept chunk, all-gather the local input, all-to-all the bytes sent to
  other ranks, reduce/broadcast the tensor's bytes on the sending ranks; nested calls count once (outermost);
- Newton–Schulz calls per rank per step: ours by wrapping `newton_schulz` where our ops call it
  (`mgup_dist.ops.local`, `mgup_dist.shard.orthogonalize`); DeepSpeed's by wrapping
  ``original_muon.muon_update`` (stage_1_and_2 imports it from that module at each call), which runs exactly one
  ``zeropower_via_*`` per call for a 2-D matrix without ``muon_num_heads`` or expert groups, as here. The
  ``zeropower_via_*`` functions are wrapped too with ``--eager`` (no ``torch.compile``), and their count is
  checked to equal the ``muon_update`` count. "Redundant" Newton–Schulz is a matrix orthogonalised on more than
  one rank.

Aligned settings: the same matrices take the Muon path (`mgup_dist.muon_param_groups`: DeepSpeed's own tagging
would also send the position embedding ``wpe`` and the tied token embedding ``wte`` to Muon, since it excludes
names containing "embed"/"lm_head" only, so the benchmark tags parameters itself); momentum 0.95 with Nesterov
(DeepSpeed's EMA momentum ``m ← βm + (1-β)g`` and Nesterov ``lerp`` give ``(1-β)`` times our sum-momentum input,
which Newton–Schulz normalises away); NS5 with the same coefficients and eps, 5 steps, in bf16 (DeepSpeed
``ns_method: "standard"``; its default ``"gram"`` runs a different iteration in fp16/fp32); decoupled weight decay
0.1 on every parameter; AdamW betas (0.9, 0.95), eps 1e-8 for the non-matrix parameters; no clipping. Not
alignable: the update scale (DeepSpeed ``sqrt(max(1, rows/cols))``, ours Moonlight's ``0.2·sqrt(max(rows, cols))``);
DeepSpeed's Muon lr is set so that square ``dim × dim`` matrices take equal steps. None of this changes the
amount of work or communication.

    python -m benchmarks.vs_deepspeed_muon [--layers 4] [--dim 256] [--steps 10] [--out benchmarks/RESULTS.md]

The default model is small (dim 256), where Newton–Schulz is ~30% of a step. At GPT-2-small width, where it
dominates as it does in LLM pretraining, run ``--layers 2 --dim 768 --heads 12 --steps 8 --warmup 2``; a model
shape other than the default writes its own RESULTS section (`section_title`).

Target (issue 3): not slower than DeepSpeed's Muon, with no redundant Newton–Schulz.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.collective_counter import CollectiveCounter, CallCounter
from benchmarks.results_page import replace_section
from mgup_dist.spawn import run_distributed

VARIANTS = ("deepspeed_muon", "muon", "mgup_muon")
SECTION = "Muon under DeepSpeed ZeRO-2: ours vs DeepSpeed's Muon"
DEFAULT_SHAPE = (4, 256, 4, 64)  # layers, dim, heads, block
LR, MOMENTUM, WEIGHT_DECAY, BETAS, EPS = 2e-3, 0.95, 0.1, (0.9, 0.95), 1e-8


@dataclass(frozen=True)
class Settings:
    """Model shape, batch and measurement settings of one benchmark run."""

    layers: int
    dim: int
    heads: int
    block: int
    micro_batch: int
    warmup: int
    steps: int
    eager: bool


@dataclass
class RankResult:
    """One variant on one rank: per-step times (s), bytes and NS calls of every timed step, the shapes this rank
    orthogonalised in the last timed step, and the final loss."""

    variant: str
    times: list[float]
    bytes_by_kind: dict[str, int]
    ns_calls: list[int]
    ns_shapes: list[tuple[int, ...]]
    zeropower_calls: list[int]
    loss: float


def _config(variant: str, settings: Settings) -> dict[str, Any]:
    if variant == "deepspeed_muon":
        optimizer = {"type": "Muon", "params": {
            "muon_lr": LR * 0.2 * math.sqrt(settings.dim), "adam_lr": LR, "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY, "ns_method": "standard", "betas": list(BETAS), "eps": EPS,
        }}
    else:
        name = "mgup_dist.Muon" if variant == "muon" else "MGUPMuon"
        optimizer = {"type": name, "params": {
            "lr": LR, "momentum": MOMENTUM, "nesterov": True, "weight_decay": WEIGHT_DECAY, "ns_steps": 5,
            "ns_dtype": "bfloat16", "adamw_betas": list(BETAS), "adamw_eps": EPS,
        }}
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1, "zero_optimization": {"stage": 2},
        "optimizer": optimizer,
    }


def _tag_like_ours(model: torch.nn.Module) -> None:
    """``use_muon`` on every parameter, as `muon_param_groups` splits them (replaces DeepSpeed's tagging)."""
    from mgup_dist.optim.param_groups import muon_param_groups

    for group in muon_param_groups(model):
        for param in group["params"]:
            param.use_muon = group["use_muon"]


def _engine(variant: str, settings: Settings) -> Any:
    import deepspeed

    from launch.model import GPT, GPTShape
    from mgup_dist import deepspeed as mgup_deepspeed

    torch.manual_seed(0)
    model = GPT(GPTShape(settings.layers, settings.heads, settings.dim, settings.block))
    config = _config(variant, settings)
    if variant != "deepspeed_muon":
        return mgup_deepspeed.initialize(model=model, config=config)[0]
    original = deepspeed.set_optimizer_flags
    deepspeed.set_optimizer_flags = lambda _config, module: _tag_like_ours(module)
    try:
        return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)[0]
    finally:
        deepspeed.set_optimizer_flags = original


def _batch(step: int, rank: int, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 256, (settings.micro_batch, settings.block + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _ns_counters(eager: bool) -> tuple[CallCounter, CallCounter]:
    """Counters wrapped around the Newton–Schulz entry points: (ours and DeepSpeed's ``muon_update``, DeepSpeed's
    ``zeropower_via_*``). The latter are wrapped only when ``eager``: inside the compiled ``muon_update`` a Python
    wrapper would count at trace time only (and could change what is compiled)."""
    from deepspeed.runtime.zero.muon import original_muon

    import mgup_dist.ops.local as local_ops
    import mgup_dist.shard.orthogonalize as orthogonalize

    calls = CallCounter()
    zeropower = CallCounter()
    for module, name in ((local_ops, "newton_schulz"), (orthogonalize, "newton_schulz"),
                         (original_muon, "muon_update")):
        calls.wrap(module, name, shape_arg=0)
    if eager:
        for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
            zeropower.wrap(original_muon, name, shape_arg=0)
    return calls, zeropower


def _measure(rank: int, world_size: int, variants: list[str], settings: Settings) -> list[RankResult]:
    """Worker: trains every variant for warm-up + timed steps on this rank (see the module docstring)."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    if settings.eager:
        torch._dynamo.config.disable = True
    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed's comm layer caches torch.distributed's functions
    import mgup_dist.shard.collectives as collectives

    collectives._all_gather_single = dist.all_gather_single
    collectives._reduce_scatter_single = dist.reduce_scatter_single
    from mgup_dist import deepspeed as mgup_deepspeed

    mgup_deepspeed.skip_shm_build()
    ns, zeropower = _ns_counters(settings.eager)
    engines = [_engine(variant, settings) for variant in variants]
    results = [RankResult(variant, [], {}, [], [], [], float("nan")) for variant in variants]
    for step in range(settings.warmup + settings.steps):
        x, y = _batch(step, rank, settings)
        for engine, result in zip(engines, results):  # interleaved: load changes hit every variant alike
            _timed_step(engine, x, y, counter, ns, zeropower, result if step >= settings.warmup else None)
    for engine in engines:
        engine.destroy()
    return results


def _timed_step(engine: Any, x: torch.Tensor, y: torch.Tensor, counter: CollectiveCounter, ns: CallCounter,
                zeropower: CallCounter, result: RankResult | None) -> None:
    """One training step (forward, backward, ``engine.step``) of ``engine``, recorded into ``result`` unless
    it is None (warm-up)."""
    import torch.distributed as dist

    dist.barrier()
    counter.reset(), ns.reset(), zeropower.reset()
    start = time.perf_counter()
    _, loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    elapsed = time.perf_counter() - start
    if result is not None:
        result.times.append(elapsed)
        result.ns_calls.append(ns.calls)
        result.zeropower_calls.append(zeropower.calls)
        result.bytes_by_kind = dict(counter.bytes_by_kind)
        result.ns_shapes = list(ns.shapes)
        result.loss = loss.item()


@dataclass(frozen=True)
class Row:
    """One variant's table row (aggregated over ranks)."""

    variant: str
    step_ms: float
    ratio: float
    min_ms: float
    min_ratio: float
    bytes_per_rank: list[int]
    ns_per_rank: list[int]
    redundant: int
    loss: float


def summarize(results: list[list[RankResult]], variants: list[str], matrices: int) -> list[Row]:
    """Table rows from every rank's results (``results[rank][i]`` is ``variants[i]``); ``matrices`` is the number
    of Muon-path matrices, so ``redundant`` = NS calls of one step summed over ranks minus ``matrices``."""
    rows = []
    base = base_min = float("nan")
    for i, variant in enumerate(variants):
        per_rank = [results[rank][i] for rank in range(len(results))]
        slowest = [max(times) for times in zip(*(r.times for r in per_rank))]
        step, fastest = statistics.median(slowest), min(slowest)
        if variant == "deepspeed_muon":
            base, base_min = step, fastest
        ns = [r.ns_calls[-1] for r in per_rank]
        rows.append(Row(
            variant, step * 1e3, step / base, fastest * 1e3, fastest / base_min,
            [sum(r.bytes_by_kind.values()) for r in per_rank], ns, sum(ns) - matrices, per_rank[0].loss,
        ))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| variant | step (ms, median) | vs DeepSpeed Muon | step (ms, min) | vs DeepSpeed (min) "
        "| bytes/step per rank | NS calls/step per rank | redundant NS/step | loss after the last step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {row.step_ms:.1f} | {row.ratio:.2f}x | {row.min_ms:.1f} | {row.min_ratio:.2f}x "
            f"| {' / '.join(f'{b:,}' for b in row.bytes_per_rank)} "
            f"| {' / '.join(map(str, row.ns_per_rank))} | {row.redundant} | {row.loss:.4f} |"
        )
    return "\n".join(lines)


def _kinds(results: list[list[RankResult]], variants: list[str]) -> str:
    lines = ["| variant | rank | collectives (bytes/step) | matrices orthogonalised (last step) |", "|---|---|---|---|"]
    for rank, per_variant in enumerate(results):
        for variant, result in zip(variants, per_variant):
            kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(result.bytes_by_kind.items()))
            shapes = ", ".join("x".join(map(str, s)) for s in result.ns_shapes)
            lines.append(f"| {variant} | {rank} | {kinds} | {len(result.ns_shapes)}: {shapes} |")
    return "\n".join(lines)


def _check_zeropower(results: list[list[RankResult]], settings: Settings) -> None:
    if not settings.eager:
        return
    for per_variant in results:
        for result in per_variant:
            if result.variant == "deepspeed_muon" and result.zeropower_calls != result.ns_calls:
                raise RuntimeError(
                    f"DeepSpeed ran {result.zeropower_calls} zeropower calls for {result.ns_calls} muon_update calls: "
                    "the muon_update count is no longer its Newton–Schulz count"
                )


def matrix_count(settings: Settings) -> int:
    """Muon-path matrices of the benchmark model."""
    from launch.model import GPT, GPTShape
    from mgup_dist.optim.param_groups import muon_param_groups

    model = GPT(GPTShape(settings.layers, settings.heads, settings.dim, settings.block))
    return sum(len(g["params"]) for g in muon_param_groups(model) if g["use_muon"])


def verdict(rows: list[Row]) -> str:
    ds = next(r for r in rows if r.variant == "deepspeed_muon")
    parts = [f"DeepSpeed's Muon runs {ds.redundant} redundant Newton–Schulz call(s) per step"]
    for row in rows:
        if row.variant == "deepspeed_muon":
            continue
        met = row.ratio <= 1.0 and row.redundant == 0
        parts.append(
            f"{row.variant}: {row.ratio:.2f}x DeepSpeed's median step time ({row.min_ratio:.2f}x of the fastest "
            f"steps), {row.redundant} redundant NS: target {'met' if met else 'NOT met'} (median)"
        )
    return "; ".join(parts) + "."


def section_title(settings: Settings) -> str:
    """The RESULTS section of a run: `SECTION` for the default model shape, else `SECTION` with the shape."""
    if (settings.layers, settings.dim, settings.heads, settings.block) == DEFAULT_SHAPE:
        return SECTION
    return f"{SECTION} ({settings.layers} layers, dim {settings.dim}, {settings.heads} heads, block {settings.block})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    layers, dim, heads, block = DEFAULT_SHAPE
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--block", type=int, default=block)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eager", action="store_true", help="disable torch.compile (DeepSpeed's muon_update)")
    parser.add_argument("--out", default=None, help=f"markdown file whose '{SECTION}' section is replaced")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "deepspeed_muon" not in variants:
        raise ValueError(f"--variants must include deepspeed_muon and come from {VARIANTS}, got {args.variants!r}")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    settings = Settings(args.layers, args.dim, args.heads, args.block, args.micro_batch, args.warmup, args.steps,
                        args.eager)
    load_before = os.getloadavg()[0]
    results = run_distributed(args.world_size, _measure, variants, settings)
    _check_zeropower(results, settings)
    rows = summarize(results, variants, matrix_count(settings))
    command = "python -m benchmarks.vs_deepspeed_muon " + " ".join(argv if argv is not None else sys.argv[1:])
    import deepspeed

    report = "\n\n".join([
        f"Command: `{command.strip()}`  \nDate: {datetime.date.today()}; machine: {platform.machine()} "
        f"{platform.processor() or ''}, {os.cpu_count()} CPU cores, W={args.world_size} gloo ranks with 1 thread "
        f"each; torch {torch.__version__}, DeepSpeed {deepspeed.__version__}"
        f"{', torch.compile disabled (--eager)' if args.eager else ''}; model: launch.model.GPT, {args.layers} "
        f"layers, dim {args.dim}, {args.heads} heads, block {args.block}, micro-batch {args.micro_batch} per rank, "
        f"fp32, DeepSpeed ZeRO stage 2; {args.warmup} warm-up + {args.steps} timed steps "
        f"(forward + backward + step, the slowest rank's time).",
        f"Load average when the run started: {load_before:.1f} (other processes share these cores; the variants' "
        "steps are interleaved so that load hits them alike, and the min column is the least inflated). How it is "
        "measured and which settings are aligned: see the docstring of `benchmarks/vs_deepspeed_muon.py`.",
        table(rows),
        "Collectives and Newton–Schulz per rank (DeepSpeed's Muon orthogonalises every whole matrix on every "
        "rank whose gradient partition holds part of it, after all-reducing such split matrices, so each matrix "
        "that straddles a partition boundary is orthogonalised on both ranks; ours orthogonalises each matrix once, "
        "on one owner, moving only split matrices to it):\n\n" + _kinds(results, variants),
        "Verdict (target: not slower, no redundant Newton–Schulz): " + verdict(rows),
    ])
    print(report)
    if args.out:
        replace_section(args.out, section_title(settings), report)
    return report


if __name__ == "__main__":
    main()
