"""Smoke test of the owner-plan balance benchmark: it runs, reports, and rewrites only its own section."""
from pathlib import Path

import pytest

from benchmarks.owner_balance import SECTION, main


def test_small_case_runs_and_updates_only_its_section(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Step overhead\n\nkept as is\n", encoding="utf-8")
    argv = ["--models", "gpt2-small", "--world-sizes", "8", "64", "--results", str(results)]
    rows = main(argv)
    assert [(r.model, r.matrices, r.world_size) for r in rows] == [("gpt2-small", 48, 8), ("gpt2-small", 48, 64)]
    assert all(r.imbalance >= r.bound * (1 - 1e-12) for r in rows)
    assert "| gpt2-small | 48 | 8 |" in capsys.readouterr().out
    main(argv)  # a rerun replaces the section instead of appending a second one
    text = results.read_text(encoding="utf-8")
    assert text.count(SECTION) == 1 and "## Step overhead\n\nkept as is" in text
    assert "python -m benchmarks.owner_balance --models gpt2-small" in text
    assert "more ranks than matrices" in text  # 48 matrices on 64 ranks


def test_no_write_leaves_files_alone(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    main(["--models", "llama-7b", "--world-sizes", "8", "--results", str(results), "--no-write"])
    assert not results.exists()
