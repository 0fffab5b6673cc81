"""Run outputs written by rank 0: ``metrics.jsonl`` (one JSON object per logged step) and JSON files.

A metrics row has ``step``, ``loss`` (mean training loss of that step's global batch), ``lr``,
``tokens_per_s`` (global tokens per second of training time since the previous row), ``tokens``
(cumulative), ``grad_norm``, ``skipped_steps`` (cumulative steps skipped for non-finite gradients), and
``val_loss`` on evaluation steps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (an empty list if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON (atomically: a temporary file renamed over ``path``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


class MetricsLog:
    """Appends rows to ``out/metrics.jsonl``. ``keep_until`` None starts the file afresh; a step number keeps
    the existing rows up to that step (a run resumed into its own folder continues its file)."""

    def __init__(self, out: Path, keep_until: Optional[int]) -> None:
        self.path = out / METRICS_FILE
        kept = [] if keep_until is None else [r for r in read_metrics(self.path) if r["step"] <= keep_until]
        self.rows: list[dict[str, Any]] = kept
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
