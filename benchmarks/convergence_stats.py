"""The arithmetic of the convergence benchmark: learning-rate selection, mean ± std over seeds, paired
differences with a 95% confidence interval, verdicts, and the Markdown tables.

Losses are final validation losses (nats per byte; lower is better). A run whose final loss is missing or
not finite counts as diverged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

# Two-sided 95% Student-t critical values for 1..10 degrees of freedom; larger df use `_t_expansion`.
_T95 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281)
_Z975 = 1.959964


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def t_critical(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df >= 1`` degrees of freedom (tabulated up to
    10; above, the Cornish–Fisher expansion to 1/df³, within 2e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"t_critical needs df >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n − 1 in the denominator; None for a single value). A NaN among
    ``values`` makes both NaN."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def select_lr(finals: Mapping[float, Optional[float]]) -> float:
    """The lr with the lowest finite final loss (ties: the smaller lr); the smallest lr if every run diverged."""
    if not finals:
        raise ValueError("select_lr needs at least one learning rate")
    finite = [(loss, lr) for lr, loss in finals.items() if _finite(loss)]
    return min(finite)[1] if finite else min(finals)


def grid_note(selected: float, finals: Mapping[float, Optional[float]]) -> str:
    """Where ``selected`` sits in its grid: an edge means the true optimum may lie outside it."""
    if not any(_finite(v) for v in finals.values()):
        return "every lr diverged"
    if len(finals) > 1 and selected == min(finals):
        return "lowest lr of the grid"
    if len(finals) > 1 and selected == max(finals):
        return "highest lr of the grid"
    return "inside the grid"


@dataclass(frozen=True)
class PairStats:
    """``candidate`` against ``baseline`` over the ``seeds`` both have. ``diff_*`` is the paired difference
    candidate − baseline per seed (same data order, initialisation and validation windows): its mean and the
    half-width of its 95% t-interval (None with one seed or a diverged run)."""

    candidate: str
    baseline: str
    seeds: tuple[int, ...]
    candidate_mean: float
    candidate_std: Optional[float]
    baseline_mean: float
    baseline_std: Optional[float]
    diff_mean: float
    diff_halfwidth: Optional[float]
    verdict: str


def verdict(diff_mean: float, halfwidth: Optional[float]) -> str:
    """``better`` / ``worse`` when the 95% interval of candidate − baseline lies below / above zero, else
    ``within noise``; ``n/a`` without an interval."""
    if halfwidth is None or not math.isfinite(diff_mean) or not math.isfinite(halfwidth):
        return "n/a"
    if diff_mean + halfwidth < 0:
        return "better"
    if diff_mean - halfwidth > 0:
        return "worse"
    return "within noise"


def compare_pair(candidate: str, baseline: str, cand: Mapping[int, Optional[float]],
                 base: Mapping[int, Optional[float]]) -> PairStats:
    """Paired statistics of two optimizers' final losses by seed (seeds present in both)."""
    seeds = tuple(sorted(set(cand) & set(base)))
    if not seeds:
        raise ValueError(f"{candidate} and {baseline} have no seed in common")
    c = [cand[s] if _finite(cand[s]) else math.nan for s in seeds]
    b = [base[s] if _finite(base[s]) else math.nan for s in seeds]
    (cm, cs), (bm, bs) = mean_std(c), mean_std(b)
    diffs = [x - y for x, y in zip(c, b, strict=True)]
    dm, ds = mean_std(diffs)
    halfwidth = None if ds is None or math.isnan(ds) else t_critical(len(seeds) - 1) * ds / math.sqrt(len(seeds))
    return PairStats(candidate, baseline, seeds, cm, cs, bm, bs, dm, halfwidth, verdict(dm, halfwidth))


def claim_status(stats: PairStats) -> str:
    """Whether a claim that the candidate beats the baseline held here."""
    return {"better": "reproduced", "worse": "not reproduced: worse", "within noise":
            "not reproduced: within noise"}.get(stats.verdict, "not testable (one seed or a diverged run)")


def fmt_loss(mean: float, std: Optional[float]) -> str:
    """``mean ± std`` with 4 decimals (``mean`` alone without a std; ``diverged`` for NaN)."""
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def pairs_table(pairs: Sequence[PairStats], lrs: Mapping[str, float], claims: Sequence[str]) -> str:
    """Markdown: one row per pair with both sides' mean ± std, the paired difference, verdict and claim."""
    lines = ["| candidate (lr) | baseline (lr) | candidate val loss | baseline val loss | "
             "difference (95% CI) | verdict | paper claim | claim here |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for stats, claim in zip(pairs, claims, strict=True):
        diff = "n/a" if not math.isfinite(stats.diff_mean) else (
            f"{stats.diff_mean:+.4f}" + ("" if stats.diff_halfwidth is None else f" ± {stats.diff_halfwidth:.4f}"))
        lines.append(
            f"| {stats.candidate} ({lrs[stats.candidate]:g}) | {stats.baseline} ({lrs[stats.baseline]:g}) "
            f"| {fmt_loss(stats.candidate_mean, stats.candidate_std)} "
            f"| {fmt_loss(stats.baseline_mean, stats.baseline_std)} | {diff} | {stats.verdict} | {claim} "
            f"| {claim_status(stats)} |"
        )
    return "\n".join(lines) + "\n"


def sweep_table(sweep: Mapping[str, Mapping[float, Optional[float]]], selected: Mapping[str, float],
                seed: int) -> str:
    """Markdown: the sweep-seed final validation loss of every (optimizer, lr); the selected lr in bold."""
    lines = [f"| optimizer | lr | final val loss (seed {seed}) | selected | note |", "|---|---:|---:|---|---|"]
    for opt, finals in sweep.items():
        note = grid_note(selected[opt], finals)
        for lr, loss in sorted(finals.items()):
            chosen = lr == selected[opt]
            value = f"{loss:.4f}" if _finite(loss) else "diverged"
            lines.append(f"| {opt} | {lr:g} | {f'**{value}**' if chosen else value} | "
                         f"{'yes' if chosen else ''} | {note if chosen else ''} |")
    return "\n".join(lines) + "\n"


def seeds_table(finals: Mapping[str, Mapping[int, Optional[float]]], selected: Mapping[str, float]) -> str:
    """Markdown: each optimizer's final validation loss per seed at its selected lr, and mean ± std."""
    seeds = sorted({s for per_seed in finals.values() for s in per_seed})
    lines = [f"| optimizer | lr | {' | '.join(f'seed {s}' for s in seeds)} | mean ± std |",
             "|---|---:|" + "---:|" * len(seeds) + "---:|"]
    for opt, per_seed in finals.items():
        cells = [f"{per_seed[s]:.4f}" if _finite(per_seed.get(s)) else "diverged" if s in per_seed else "—"
                 for s in seeds]
        values = [per_seed[s] if _finite(per_seed[s]) else math.nan for s in sorted(per_seed)]
        lines.append(f"| {opt} | {selected[opt]:g} | {' | '.join(cells)} | {fmt_loss(*mean_std(values))} |")
    return "\n".join(lines) + "\n"
