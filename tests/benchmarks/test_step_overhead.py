"""Smoke test of the step-overhead benchmark on tiny GPT-2 shapes: it runs every optimizer and the
baselines, and writes its section of the results page (no timing assertions)."""
import os

from benchmarks.step_overhead import PORTABLE, PORTABLE_ADAMW, SECTION, TOPK_BASELINE, TORCH_ADAMW, main
from mgup_dist.optim import OPTIMIZERS


def test_runs_every_optimizer_and_writes_its_section(tmp_path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    report = main(["--small", "--steps", "1", "--threads", "1", "--out", str(out)])
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| optimizer")]
    assert [row.split(" | ")[0][2:] for row in rows] == [TORCH_ADAMW, *OPTIMIZERS, PORTABLE_ADAMW, PORTABLE, TOPK_BASELINE]
    text = out.read_text()
    assert f"## {SECTION}\n" in text and "## Other\n\nkept" in text and report.splitlines()[0] in text
    assert "python -m benchmarks.step_overhead --small --steps 1 --threads 1" in text
    assert "native kernels on" in text
    assert "Interleaved (10 pairs of steps" in report
    assert os.environ.get("MGUP_DIST_NATIVE") != "0"  # the portable variant's setting did not leak
