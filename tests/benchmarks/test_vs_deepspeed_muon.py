"""Smoke test of the DeepSpeed-Muon comparison at a tiny size (no timing assertions): the table has a row per
variant, our Newton–Schulz calls over the ranks add up to the model's matrices (none redundant), bytes are
counted for every variant, and the report lands in its RESULTS section. Plus the summary arithmetic."""
from benchmarks.vs_deepspeed_muon import (
    DEFAULT_SHAPE, SECTION, RankResult, Settings, main, matrix_count, section_title, summarize,
)

TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--block", "16", "--micro-batch", "2", "--warmup", "0",
        "--steps", "1", "--eager", "--variants", "deepspeed_muon,muon"]


def test_tiny_run_reports_rows_and_no_redundant_newton_schulz(tmp_path) -> None:
    out = tmp_path / "RESULTS.md"
    report = main([*TINY, "--out", str(out)])
    matrices = matrix_count(Settings(1, 32, 2, 16, 2, 0, 1, True))
    assert matrices == 4
    main_table = report.split("Collectives and Newton")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in main_table.splitlines() if line.startswith(("| deepspeed_muon |", "| muon |"))}
    assert set(rows) == {"deepspeed_muon", "muon"}
    ours = [int(n) for n in rows["muon"][6].split(" / ")]
    assert len(ours) == 2 and sum(ours) == matrices and rows["muon"][7] == "0"
    theirs = [int(n) for n in rows["deepspeed_muon"][6].split(" / ")]
    assert sum(theirs) >= matrices and int(rows["deepspeed_muon"][7]) == sum(theirs) - matrices
    for row in rows.values():
        assert all(int(b.replace(",", "")) > 0 for b in row[5].split(" / "))
    assert f"## {SECTION} (1 layers, dim 32, 2 heads, block 16)" in out.read_text() and "python -m benchmarks.vs_deepspeed_muon" in out.read_text()


def _result(variant: str, times: list[float], ns: int) -> RankResult:
    return RankResult(variant, times, {"all_reduce": 8}, [ns] * len(times), [], [ns] * len(times), 1.0)


def test_summary_uses_the_slowest_rank_and_counts_redundant_calls() -> None:
    results = [
        [_result("deepspeed_muon", [1.0, 3.0, 2.0], 3), _result("muon", [1.0, 1.0, 1.0], 2)],
        [_result("deepspeed_muon", [2.0, 1.0, 2.0], 3), _result("muon", [0.5, 3.0, 0.5], 2)],
    ]
    ds, ours = summarize(results, ["deepspeed_muon", "muon"], matrices=4)
    assert ds.step_ms == 2000.0 and ds.min_ms == 2000.0 and ds.ns_per_rank == [3, 3] and ds.redundant == 2
    assert ours.step_ms == 1000.0 and ours.ratio == 0.5 and ours.min_ms == 1000.0 and ours.min_ratio == 0.5
    assert ours.redundant == 0 and ours.bytes_per_rank == [8, 8]


def test_default_shape_keeps_the_plain_section_title() -> None:
    assert section_title(Settings(*DEFAULT_SHAPE, 4, 3, 10, False)) == SECTION
    assert section_title(Settings(2, 768, 12, 64, 4, 2, 8, False)).endswith("(2 layers, dim 768, 12 heads, block 64)")
