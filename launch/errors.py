"""The one exception type for usage mistakes: bad command lines, configs, paths and launch environments.

Entry points (`launch.pretrain`, `launch.compare`) catch it and print a single ``error: ...`` line to stderr
with a non-zero exit status, instead of a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class LaunchError(ValueError):
    """A mistake the user can fix (the message names the key, path or value at fault)."""


def exit_status(action: Callable[[], object]) -> int:
    """Runs an entry point's ``action``: 0 on success, 2 after printing ``error: <message>`` for a `LaunchError`."""
    try:
        action()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
