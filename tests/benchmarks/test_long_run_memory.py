"""Smoke test of the long-run memory benchmark: a few steps at W=2, its RSS sampling and its RESULTS section."""
from pathlib import Path

from benchmarks.long_run_memory import SECTION, main, rss_bytes, summarize


def test_rss_is_read_from_proc() -> None:
    before = rss_bytes()
    block = bytearray(64 << 20)  # touched pages count as resident
    assert rss_bytes() - before >= 32 << 20 and len(block) == 64 << 20


def test_summary_measures_growth_after_warm_up() -> None:
    mib = 1 << 20
    row = summarize("x", 0, [(1, 100 * mib), (10, 200 * mib), (20, 203 * mib), (30, 201 * mib)], 10, 1.0)
    assert (row.warmup_mib, row.final_mib, row.max_growth_mib) == (200, 201, 3)
    assert row.growth_per_1k_steps_mib == 3 * 1000 / 20


def test_short_run_writes_only_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Step overhead\n\nkept as is\n", encoding="utf-8")
    argv = ["--optimizers", "mgup_adamw", "--steps", "6", "--every", "2", "--results", str(results)]
    rows = main(argv)
    assert [(r.optimizer, r.rank) for r in rows] == [("mgup_adamw", 0), ("mgup_adamw", 1)]
    assert all(r.final_mib > 10 and r.max_growth_mib >= 0 for r in rows)
    text = results.read_text(encoding="utf-8")
    assert text.count(SECTION) == 1 and "## Step overhead\n\nkept as is" in text
    assert "python -m benchmarks.long_run_memory --optimizers mgup_adamw --steps 6" in text
