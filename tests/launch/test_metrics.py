"""metrics.jsonl: fresh runs start the file anew, in-place resumes keep rows up to the resumed step."""
from __future__ import annotations

import json
from pathlib import Path

from launch.metrics import MetricsLog, read_metrics, write_json


def test_fresh_log_replaces_and_resumed_log_truncates(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, keep_until=None)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    resumed = MetricsLog(tmp_path, keep_until=2)
    resumed.log({"step": 3, "loss": 0.25})
    expected = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    assert read_metrics(tmp_path / "metrics.jsonl") == expected
    assert resumed.rows == read_metrics(tmp_path / "metrics.jsonl")
    MetricsLog(tmp_path, keep_until=None)
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_write_json_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
