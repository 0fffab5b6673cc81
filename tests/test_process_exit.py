"""`exit_without_teardown`: the status reaches the parent, buffered output and log records are flushed, and no
atexit handler (interpreter teardown) runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, logging, sys
from mgup_dist.process_exit import exit_without_teardown
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
atexit.register(print, "teardown ran")
logging.getLogger("job").info("last record")
sys.stdout.write("buffered, no newline")
exit_without_teardown(3)
"""


def test_exit_flushes_output_and_logs_and_skips_teardown(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert log.read_text() == "INFO:job:last record\n"
