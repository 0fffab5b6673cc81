"""The convergence benchmark's arithmetic on synthetic losses: mean ± std, t critical values, lr selection,
paired differences and verdicts, and the tables built from them."""
from __future__ import annotations

import math

import pytest

from benchmarks import convergence_stats as stats


def test_mean_std_uses_the_sample_standard_deviation() -> None:
    mean, std = stats.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-12)  # squared deviations 5 over n - 1 = 3
    assert stats.mean_std([2.0]) == (2.0, None)
    assert all(math.isnan(v) for v in stats.mean_std([1.0, math.nan]))
    with pytest.raises(ValueError, match="at least one value"):
        stats.mean_std([])


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (10, 2.2281), (11, 2.2010), (20, 2.0860),
                                          (30, 2.0423), (120, 1.9799)])
def test_t_critical_matches_published_quantiles(df: int, expected: float) -> None:
    assert stats.t_critical(df) == pytest.approx(expected, abs=1e-3)


def test_t_critical_rejects_zero_degrees_of_freedom() -> None:
    with pytest.raises(ValueError, match="df >= 1"):
        stats.t_critical(0)


def test_select_lr_takes_the_lowest_finite_loss_and_the_smaller_lr_on_ties() -> None:
    assert stats.select_lr({1e-3: 3.0, 2e-3: 2.5, 4e-3: math.nan}) == 2e-3
    assert stats.select_lr({1e-3: 3.0, 2e-3: None, 4e-3: 2.9}) == 4e-3
    assert stats.select_lr({4e-3: 2.5, 1e-3: 2.5, 2e-3: 2.7}) == 1e-3
    assert stats.select_lr({4e-3: math.inf, 2e-3: math.nan}) == 2e-3  # every run diverged: the smallest lr
    with pytest.raises(ValueError):
        stats.select_lr({})


def test_grid_note_flags_selections_at_an_edge() -> None:
    finals = {1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.6}
    assert stats.grid_note(2e-3, finals) == "inside the grid"
    assert stats.grid_note(1e-3, finals) == "lowest lr of the grid"
    assert stats.grid_note(4e-3, finals) == "highest lr of the grid"
    assert stats.grid_note(1e-3, {1e-3: math.nan}) == "every lr diverged"


def test_compare_pair_is_paired_by_seed() -> None:
    cand = {0: 2.00, 1: 2.10, 2: 2.20, 7: 1.0}  # seed 7 has no baseline run: left out
    base = {0: 2.10, 1: 2.20, 2: 2.25}
    result = stats.compare_pair("mgup", "adamw", cand, base)
    diffs = [-0.10, -0.10, -0.05]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert result.seeds == (0, 1, 2)
    assert result.candidate_mean == pytest.approx(2.10) and result.baseline_mean == pytest.approx(6.55 / 3)
    assert result.candidate_std == pytest.approx(0.1) and result.baseline_std == pytest.approx(0.0763763, rel=1e-5)
    assert result.diff_mean == pytest.approx(mean)
    assert result.diff_halfwidth == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    assert result.verdict == "better"  # -0.0833 + 0.0717 < 0, although the unpaired stds overlap
    assert stats.claim_status(result) == "reproduced"


def test_compare_pair_verdicts() -> None:
    noisy = stats.compare_pair("a", "b", {0: 2.0, 1: 2.3}, {0: 2.1, 1: 2.1})
    assert noisy.verdict == "within noise" and stats.claim_status(noisy) == "not reproduced: within noise"
    worse = stats.compare_pair("a", "b", {0: 2.2, 1: 2.31, 2: 2.4}, {0: 2.1, 1: 2.2, 2: 2.3})
    assert worse.verdict == "worse" and stats.claim_status(worse) == "not reproduced: worse"
    single = stats.compare_pair("a", "b", {0: 2.0}, {0: 2.1})
    assert single.diff_halfwidth is None and single.verdict == "n/a"
    diverged = stats.compare_pair("a", "b", {0: 2.0, 1: math.nan}, {0: 2.1, 1: 2.2})
    assert diverged.verdict == "n/a" and stats.claim_status(diverged).startswith("not testable")
    with pytest.raises(ValueError, match="no seed in common"):
        stats.compare_pair("a", "b", {0: 1.0}, {1: 1.0})


def test_verdict_needs_the_interval_to_exclude_zero() -> None:
    assert stats.verdict(-0.02, 0.01) == "better"
    assert stats.verdict(0.02, 0.01) == "worse"
    assert stats.verdict(-0.01, 0.01) == "within noise"
    assert stats.verdict(-0.5, None) == "n/a"


def test_tables() -> None:
    pair = stats.compare_pair("mgup_adamw", "adamw", {0: 2.0, 1: 2.1}, {0: 2.05, 1: 2.2})
    table = stats.pairs_table([pair], {"mgup_adamw": 4e-3, "adamw": 2e-3}, ["claimed better"]).splitlines()
    assert len(table) == 3 and table[0].count("|") == 9
    assert table[2].startswith("| mgup_adamw (0.004) | adamw (0.002) | 2.0500 ± 0.0707 | 2.1250 ± 0.1061 | -0.0750 ± ")
    assert "| claimed better | " in table[2]
    sweep = stats.sweep_table({"adamw": {1e-3: 2.3, 2e-3: math.nan}}, {"adamw": 1e-3}, 0).splitlines()
    assert sweep[2:] == ["| adamw | 0.001 | **2.3000** | yes | lowest lr of the grid |",
                         "| adamw | 0.002 | diverged |  |  |"]
    seeds = stats.seeds_table({"adamw": {0: 2.0, 1: 2.2}}, {"adamw": 1e-3}).splitlines()
    assert seeds[0] == "| optimizer | lr | seed 0 | seed 1 | mean ± std |"
    assert seeds[2] == "| adamw | 0.001 | 2.0000 | 2.2000 | 2.1000 ± 0.1414 |"
