"""Smoke test of the communication-volume benchmark on a tiny shape (no timing assertions), and the
invariants its report rests on: a layer-wise layout adds no bytes for Muon over ZeRO AdamW."""
from benchmarks.comm_volume import Measurement, _table, main


def test_runs_and_reports_every_optimizer(tmp_path) -> None:
    out = tmp_path / "RESULTS.md"
    report = main(["--layers", "1", "--dim", "16", "--steps", "1", "--optimizers", "adamw,mgup_adamw,muon", "--out", str(out)])
    for name in ("adamw", "mgup_adamw", "muon"):
        assert f"| {name} | flat | 2 |" in report and f"| {name} | layerwise | 4 |" in report
    assert "## Communication volume" in out.read_text()


def test_extra_is_measured_against_adamw_on_the_same_layout() -> None:
    rows = [
        Measurement("adamw", "layerwise", 2, {"all_gather": 100}, 0, 1.0),
        Measurement("muon", "layerwise", 2, {"all_gather": 100}, 0, 1.0),
        Measurement("adamw", "flat", 2, {"all_gather": 100}, 0, 1.0),
        Measurement("muon", "flat", 2, {"all_gather": 100, "all_to_all": 50}, 0, 1.0),
    ]
    table = _table(rows, layers=1, dim=16)
    assert "| muon | layerwise | 2 | 100 | 0 |" in table
    assert "| muon | flat | 2 | 150 | 50 |" in table
