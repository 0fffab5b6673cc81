"""Test-only fault injection: a rank that kills itself mid-training, once, to exercise crash and resume.

Environment variables (read at every step; unset in normal runs, so this costs one dictionary lookup):

- ``MGUP_FAULT_KILL_AT_STEP=N``: right after optimizer step ``N`` (before that step's logging and
  checkpoint), the chosen rank sends itself SIGKILL, as an out-of-memory kill or a lost node would;
- ``MGUP_FAULT_RANK=R`` (default 1): the rank that dies.

Only on a launcher's first attempt: torchrun's ``TORCHELASTIC_RESTART_COUNT`` (0, or unset, on the first
attempt) keeps a restarted job (``--max-restarts``) from dying again. Not a user feature: the crash-and-resume
tests use it, and it is documented in README's launcher section as a testing hook.
"""
from __future__ import annotations

import os
import signal
from typing import Mapping, Optional

KILL_AT_STEP = "MGUP_FAULT_KILL_AT_STEP"
FAULT_RANK = "MGUP_FAULT_RANK"
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"


def kill_due(step: int, rank: int, environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when ``environ`` (default `os.environ`) asks rank ``rank`` to die after ``step`` on this attempt."""
    environ = os.environ if environ is None else environ
    target = environ.get(KILL_AT_STEP)
    if target is None or int(environ.get(RESTART_COUNT, "0")) > 0:
        return False
    return step == int(target) and rank == int(environ.get(FAULT_RANK, "1"))


def maybe_kill(step: int, rank: int) -> None:
    """SIGKILLs this process when `kill_due` says so (no cleanup, no exit handlers: a hard crash)."""
    if kill_due(step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
