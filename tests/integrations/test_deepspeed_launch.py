"""``examples/deepspeed_train.py`` runs under ``torchrun`` with a shipped config (ZeRO-3, MGUP-Muon, bf16).

The deepspeed launcher and mpirun were checked by hand (see the example's docstring for the commands); CI
runs the torchrun case only, to keep its time down.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from tests.integrations.deepspeed_harness import CONFIG_DIR, ROOT

STEPS = 4
NUMBER = r"[-+]?(?:\d+\.\d*(?:e[-+]\d+)?|nan|inf)"


def test_example_trains_under_torchrun_with_identical_parameters_on_every_rank() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "examples" / "deepspeed_train.py"),
        "--deepspeed_config", str(CONFIG_DIR / "zero3_mgup_muon_bf16.json"), "--steps", str(STEPS),
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "optimizer MGUPMuon, ZeRO stage 3, world size 2" in done.stdout
    # Not anchored to line starts: both ranks and DeepSpeed's logger share this pipe, and a log line written in
    # several pieces can land in front of another rank's line (seen under load).
    losses = [float(x) for x in re.findall(rf"step \d+ loss ({NUMBER})", done.stdout)]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), done.stdout
    checksums = dict(re.findall(rf"rank (\d) checksum ({NUMBER})", done.stdout))
    assert sorted(checksums) == ["0", "1"] and checksums["0"] == checksums["1"], done.stdout
